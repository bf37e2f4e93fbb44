"""PEFTC_SPARSE, the generic sparse-ΔW adapter: merged and unmerged against dense eager math, stacking
and ``peftc combine`` compose by addition, PERP's masked merge keeps a 2:4 and an unstructured-pruned
base exactly as sparse, refusals name the key, and a broken scatter fails verification."""

from __future__ import annotations

import json

import models
import pytest
import torch
from conftest import adapt, eager, export, run_passes

from peftc import ir
from peftc.errors import InputError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import sparse
from peftc.methods.loading import load_adapter
from peftc.passes import pipelines
from peftc.verification import module_oracle, program_oracle, verify

KEYS = ("lin0.weight", "lin1.weight")


def pruned() -> torch.nn.Module:
    """``models.mlp`` with lin0 pruned 2:4 (two zeros in every four inputs) and lin1 half unstructured."""
    model = models.mlp()
    with torch.no_grad():
        w = model.lin0.weight.view(-1, 4)
        w.scatter_(1, w.abs().argsort(dim=1)[:, :2], 0.0)
        generator = torch.Generator().manual_seed(4)
        model.lin1.weight.mul_(torch.rand(model.lin1.weight.shape, generator=generator) < 0.5)
    return model


def _write(path, deltas: dict[str, torch.Tensor], **config):
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    tensors = {}
    for key, delta in deltas.items():
        tensors[f"{key}.sparse_indices"], tensors[f"{key}.sparse_values"] = sparse.to_sparse(delta)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "PEFTC_SPARSE", "format_version": 1, **config}))
    return path


def _deltas(seed: int) -> dict[str, torch.Tensor]:
    """ΔW on 20 % of each weight's entries, pruned positions included."""
    model, generator = models.mlp(), torch.Generator().manual_seed(seed)
    out = {}
    for key in KEYS:
        shape = model.get_parameter(key).shape
        out[key] = torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.2)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse")
    a, b = _deltas(1), _deltas(2)
    paths = {
        "a": _write(root / "a", a),
        "b": _write(root / "b", b),
        "a-masked": _write(root / "am", a, keep_base_sparsity=True),
    }
    return paths, a, b, export(pruned(), parse_inputs(models.MLP_INPUTS))


def _dense(*deltas, mask: bool = False) -> torch.nn.Module:
    """The expected model, written with plain tensor arithmetic."""
    model = pruned()
    with torch.no_grad():
        for key in KEYS:
            weight = model.get_parameter(key)
            keep = weight.ne(0) if mask else torch.ones_like(weight, dtype=torch.bool)
            for delta in deltas:
                weight += torch.where(keep, delta[key], 0.0)
    return model


def _x():
    return {"x": torch.randn(5, 16, generator=torch.Generator().manual_seed(3))}


def _rel(actual, expected) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("case", ["a", "a+b", "a-masked"])
def test_merged_and_unmerged_match_dense_eager(setup, merge, case):
    paths, a, b, program = setup
    names = {"a": ["a"], "a+b": ["a", "b"], "a-masked": ["a-masked"]}[case]
    optimized, _ = run_passes(adapt(program, *(paths[n] for n in names)), *pipelines.optimize(merge=merge))
    expected_model = _dense(*([a, b] if case == "a+b" else [a]), mask=case == "a-masked")
    with torch.no_grad():
        expected = expected_model(**_x())
        assert _rel(pruned()(**_x()), expected) > 0.05, "the update barely changes the output"
    assert _rel(eager(optimized, _x())["output"], expected) <= 1e-5
    if merge:
        for key in KEYS:
            merged, base = optimized.state_dict[key], pruned().get_parameter(key)
            zeros_kept = torch.equal(merged.eq(0), base.eq(0))
            assert zeros_kept == (case == "a-masked"), key


def test_masked_merge_keeps_two_of_four(setup):
    paths, _, _, program = setup
    optimized, _ = run_passes(adapt(program, paths["a-masked"]), *pipelines.optimize(merge=True))
    groups = optimized.state_dict["lin0.weight"].view(-1, 4)
    assert groups.ne(0).sum(dim=1).max() == 2


def test_combine_reads_sparse_adapters_as_task_vectors(setup):
    from peftc.combine.deltas import TaskVectors

    paths, a, b, program = setup
    table = ir.module_table(program)
    tv = TaskVectors(table, [load_adapter(paths[n], table) for n in ("a", "b")])
    for key in KEYS:
        torch.testing.assert_close(tv.delta(0, key), a[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(tv.delta(1, key), b[key], rtol=0, atol=1e-6)


K = "lin1.weight.sparse_indices"


@pytest.mark.parametrize(
    ("tensors", "config", "match"),
    [
        (
            {K: torch.tensor([0, 256])},
            None,
            r"lin1.weight.sparse_indices: index 256 at position 1 is outside \[0, 256\)",
        ),
        ({K: torch.tensor([3, 3])}, None, r"sparse_indices: index 3 at position 1 is repeated"),
        ({K: torch.tensor([1, 2, 3])}, None, r"lin1.weight.sparse_values: shape \[2\], but the indices are \[3\]"),
        ({"lin1.weight.sparse_values": None}, None, r"lin1.weight has no lin1.weight.sparse_values"),
        ({"lin9.weight.sparse_indices": torch.tensor([0])}, None, r"the base has no tensor 'lin9.weight'"),
        (None, {"keep_base_sparsity": "yes"}, r"keep_base_sparsity 'yes': give true or false"),
    ],
    ids=["range", "duplicate", "values-shape", "no-values", "unknown", "flag"],
)
def test_bad_input_names_the_key(setup, tmp_path, tensors, config, match):
    from conftest import edited_adapter

    program = setup[3]
    two = torch.zeros(8, 32)
    two[0, 0] = two[1, 0] = 1.0  # the adapter edited below: two entries of lin1.weight
    base = _write(tmp_path / "two", {"lin1.weight": two})
    path = edited_adapter(base, tmp_path / "bad", config=config, tensors=tensors)
    with pytest.raises(InputError, match=match):
        load_adapter(path, ir.module_table(program))


def test_mutation_shifted_scatter_fails_verification(setup, monkeypatch):
    paths, a, _, program = setup
    signature = parse_inputs(models.MLP_INPUTS)

    def check():
        merged, _ = run_passes(adapt(program, paths["a"]), *pipelines.optimize(merge=True))
        oracles = {"dense": module_oracle(_dense(a))}
        return verify(program_oracle(merged), signature, oracles, base=program_oracle(program), cases=1)

    assert check().passed
    real = sparse.scatter_add
    monkeypatch.setattr(sparse, "scatter_add", lambda flat, i, v: real(flat, (i + 1) % flat.numel(), v))
    assert not check().passed
