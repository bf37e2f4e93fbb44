"""S²FT: a checkpoint written as the official code writes it (dense, permuted, no indices; trained by
``tests/s2ft_train.py``) is recovered by ``peftc extract`` into a ``PEFTC_S2FT`` adapter whose merged
and unmerged programs — and one ONNX compile — reproduce the fine-tuned checkpoint's eager output;
GQA groups and FFN channels are found as trained; refusals name the cause; a broken scatter fails
verification."""

from __future__ import annotations

import json

import pytest
import s2ft_train
import torch
from conftest import adapt, eager, edited_adapter, export, run_passes

from peftc import ir
from peftc.cli import main
from peftc.errors import InputError
from peftc.loaders.inputs import from_transformers
from peftc.methods import s2ft
from peftc.methods.loading import load_adapter
from peftc.passes import pipelines
from peftc.sparse.extract_cli import extract_adapter
from peftc.verification import module_oracle, program_oracle, verify


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2ft")
    truth = s2ft_train.train(root)
    summary = extract_adapter(truth.base, truth.finetuned, root / "adapter")
    return truth, summary, root / "adapter"


@pytest.fixture(scope="module")
def models_(trained):
    """The base module, its traced program and the fine-tuned checkpoint (the dense eager reference)."""
    import transformers

    base = s2ft_train.base_model()
    return base, export(base), transformers.LlamaModel.from_pretrained(str(trained[0].finetuned)).eval()


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (2, 9), generator=generator),
        "attention_mask": torch.ones(2, 9, dtype=torch.int64),
    }


def _rel(actual, expected) -> float:
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((a - e).abs().max() / e.abs().max())


def _against_finetuned(program, base, finetuned):
    """peftc's numeric check (one seeded case) with the fine-tuned checkpoint as the oracle."""
    signature = from_transformers(finetuned)
    oracles = {"finetuned": module_oracle(finetuned)}
    return verify(program_oracle(program), signature, oracles, base=program_oracle(base), cases=1)


# --------------------------------------------------------------------------------------------
# the ops against dense eager math


def test_ops_match_dense_eager():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 5, generator=generator), torch.randn(6, generator=generator)
    x = torch.randn(3, 4, 5, generator=generator)
    for dim, indices in ((0, torch.tensor([1, 4])), (1, torch.tensor([0, 2, 3]))):
        block = torch.randn((2, 5) if dim == 0 else (6, 3), generator=generator)
        dense = weight.clone()
        for j, i in enumerate(indices.tolist()):  # the update written out entry by entry
            if dim == 0:
                dense[i, :] += block[j, :]
            else:
                dense[:, i] += block[:, j]
        assert torch.allclose(s2ft.S2FT_WEIGHT.overload(weight, indices, block, dim), dense, rtol=0, atol=1e-6)
        expected = torch.nn.functional.linear(x, dense, bias)
        assert _rel(s2ft.S2FT_LINEAR.overload(x, weight, bias, indices, block, dim), expected) <= 1e-6


# --------------------------------------------------------------------------------------------
# extraction finds what was trained


def test_extract_finds_the_trained_kv_groups_and_channels(trained):
    truth, summary, adapter = trained
    cfg = s2ft_train.tiny_llama_config()
    hd = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in range(cfg.num_hidden_layers):
        assert summary["kv_group_order"][f"layers.{layer}.self_attn"] == truth.groups[layer].tolist()
        assert summary["channel_order"][f"layers.{layer}.mlp"] == truth.channels[layer].tolist()
    assert truth.groups[0].tolist() != sorted(truth.groups[0].tolist()), "layer 0 must permute KV groups"
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")

    def whole(groups, width):
        return [g * width + i for g in groups for i in range(width)]

    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        assert tensors[p + "self_attn.v_proj.s2ft_rows"].tolist() == whole(truth.v_groups[layer], hd)
        assert tensors[p + "self_attn.o_proj.s2ft_columns"].tolist() == whole(truth.o_groups[layer], rep * hd)
        assert tensors[p + "mlp.up_proj.s2ft_rows"].tolist() == truth.up_channels[layer]
        assert tensors[p + "mlp.down_proj.s2ft_columns"].tolist() == truth.down_channels[layer]
    assert summary["reconstruction_error"] < 1e-6


@pytest.mark.parametrize("merge", [True, False])
def test_merged_and_unmerged_programs_match_the_finetuned_checkpoint(trained, models_, merge):
    _, _, adapter = trained
    base, program, finetuned = models_
    reference = adapt(program, adapter)
    optimized, _ = run_passes(reference, *pipelines.optimize(merge=merge))
    sites = [n for n in optimized.graph.nodes if n.op == "call_function" and "s2ft" in str(n.target)]
    assert len(sites) == (0 if merge else 8)
    inputs = _inputs()
    with torch.no_grad():
        expected = finetuned(**inputs).last_hidden_state
        assert _rel(base(**inputs).last_hidden_state, expected) > 0.05, "the fine-tune barely changes the output"
    assert _rel(eager(optimized, inputs)["last_hidden_state"], expected) <= 1e-5


def test_unmerged_onnx_compile_matches_the_finetuned_checkpoint(trained, models_, tmp_path):
    """One compile: the composite gather/scatter op lowers to ONNX from its ATen body."""
    import peftc
    from peftc.runtime import load

    truth, _, adapter = trained
    peftc.compile(str(truth.base), [adapter], out=tmp_path / "out", merge=False)
    runner = load(tmp_path / "out")
    inputs = _inputs(5)
    with torch.no_grad():
        expected = models_[2](**inputs).last_hidden_state
    actual = runner(**{k: v.numpy() for k, v in inputs.items()})["last_hidden_state"]
    assert _rel(actual, expected) <= 1e-5


# --------------------------------------------------------------------------------------------
# refusals


def _edited_checkpoint(truth, dst, edit):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((truth.finetuned / "config.json").read_text())
    tensors = load_file(truth.finetuned / "model.safetensors")
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


def _swap_v_groups(t):
    v = t["layers.0.self_attn.v_proj.weight"]
    t["layers.0.self_attn.v_proj.weight"] = torch.cat([v[8:], v[:8]])


def _noise(keys, fraction=1.0, rows=None):
    def edit(t):
        generator = torch.Generator().manual_seed(9)
        for key in keys:
            mask = torch.rand(t[key].shape, generator=generator) < fraction
            mask[: -rows if rows else 0] = False  # the last rows: channels S²FT did not train
            t[key] = t[key] + 1e-3 * torch.randn(t[key].shape, generator=generator) * mask

    return edit


def _swap_q(t):
    q = t["layers.0.self_attn.q_proj.weight"]
    t["layers.0.self_attn.q_proj.weight"] = torch.cat([q[16:], q[:16]])


def _split_kv_group(t):
    """Swap query heads 1 and 2 of layer 0, which read different KV heads (4 query heads over 2)."""
    q = t["layers.0.self_attn.q_proj.weight"].clone()
    q[8:16], q[16:24] = t["layers.0.self_attn.q_proj.weight"][16:24], t["layers.0.self_attn.q_proj.weight"][8:16]
    t["layers.0.self_attn.q_proj.weight"] = q


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            _noise(["layers.0.mlp.gate_proj.weight"]),
            r"gate_proj.weight: 64 of 64 row blocks .* equal no base block .*differs by",
        ),
        (_noise(["layers.1.mlp.up_proj.weight"]), r"up_proj.weight: .* changes 64 of 64 rows \(density 1, limit 0.5\)"),
        (_noise(["layers.1.mlp.up_proj.weight"], 0.1, rows=4), r"rows .*\), row \d+ in only 0.\d+ of its entries"),
        (_swap_v_groups, r"v_proj.weight: .* row \d+ equals another base row exactly.* not function-preserving"),
        (_split_kv_group, r"q_proj.weight: 2 of 2 row blocks of the fine-tuned matrix equal no base block"),
        (_swap_q, r"q rows follow KV groups \[\d, \d\], k rows \[\d, \d\]"),
        (_noise(["norm.weight"]), r"norm.weight: changed \(max \|Δ\| .*\); S²FT changes only v/o/up/down"),
    ],
    ids=[
        "noise-permuted-only",
        "dense-noise",
        "unstructured-noise",
        "wrong-permutation",
        "head-moved-across-kv-groups",
        "q-k-disagree",
        "norm",
    ],
)
def test_extract_refuses_what_is_not_an_s2ft_update(trained, tmp_path, edit, match):
    truth = trained[0]
    with pytest.raises(InputError, match=match):
        extract_adapter(truth.base, _edited_checkpoint(truth, tmp_path / "ft", edit), tmp_path / "a")


def test_extract_cli_one_line_errors_and_pickle(trained, tmp_path, capsys):
    truth = trained[0]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((truth.finetuned / "config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(truth.finetuned / "model.safetensors"), pickled / "pytorch_model.bin")
    assert main(["extract", str(truth.base), str(pickled), "-o", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickled" in err and "--allow-pickle" in err
    assert main(["extract", str(truth.base), str(pickled), "-o", str(tmp_path / "a"), "--allow-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 2560
    assert main(["extract", str(truth.base), str(pickled), "-o", str(tmp_path / "a"), "--allow-pickle"]) == 2
    assert "exists" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# the adapter format's refusals


V = "layers.0.self_attn.v_proj."


@pytest.mark.parametrize(
    ("tensors", "config", "match"),
    [
        (
            {V + "s2ft_rows": torch.tensor([0, 1, 2, 3, 4, 5, 6, 16])},
            None,
            r"v_proj.s2ft_rows: index 16 at position 7 is outside \[0, 16\)",
        ),
        (
            {V + "s2ft_rows": torch.tensor([0, 1, 2, 3, 4, 5, 5, 7])},
            None,
            r"v_proj.s2ft_rows: index 5 at position 6 is repeated",
        ),
        (
            {V + "s2ft_block": torch.zeros(8, 31)},
            None,
            r"v_proj.s2ft_block: shape \[8, 31\], but 8 rows of .* need \[8, 32\]",
        ),
        ({V + "s2ft_block": None}, None, r"module 'layers.0.self_attn.v_proj' needs s2ft_block"),
        ({V + "s2ft_rows": torch.zeros(8)}, None, r"v_proj.s2ft_rows: indices must be a non-empty 1-D integer"),
        (None, {"target_modules": ["layers.0.self_attn.v_proj"]}, r"target_modules .* must list exactly the modules"),
    ],
    ids=["out-of-range", "duplicate", "block-shape", "no-block", "float-indices", "targets"],
)
def test_bad_adapter_names_the_key(trained, models_, tmp_path, tensors, config, match):
    path = edited_adapter(trained[2], tmp_path / "bad", config=config, tensors=tensors)
    with pytest.raises(InputError, match=match):
        load_adapter(path, ir.module_table(models_[1]))


# --------------------------------------------------------------------------------------------
# verification catches a broken scatter


def test_mutation_off_by_one_index_fails_verification(trained, models_, monkeypatch):
    _, _, adapter = trained
    _, program, finetuned = models_

    def compiled():
        return run_passes(adapt(program, adapter), *pipelines.optimize(merge=True))[0]

    assert _against_finetuned(compiled(), program, finetuned).passed
    real = s2ft.add_block

    def shifted(tensor, dim, indices, block):
        return real(tensor, dim, (indices + 1) % tensor.shape[dim], block)

    monkeypatch.setattr(s2ft, "add_block", shifted)
    assert not _against_finetuned(compiled(), program, finetuned).passed


def test_mutation_identity_permutation_is_refused(trained, monkeypatch, tmp_path):
    """A matcher that ignores the permutation must not yield an adapter: the consistency checks refuse it."""
    from peftc.sparse import extract as extraction

    truth = trained[0]
    monkeypatch.setattr(extraction, "_matched", lambda base, tuned, key, blocks: list(range(blocks)))
    with pytest.raises(InputError, match="not function-preserving"):
        extract_adapter(truth.base, truth.finetuned, tmp_path / "a")


def test_qwen2_extraction_moves_qkv_biases_with_their_rows(tmp_path):
    """Qwen2's q/k/v biases are permuted with their rows (not an update): the extracted adapter, merged on
    the unpermuted base, reproduces the fine-tuned checkpoint; a trained bias is refused naming it."""
    import transformers

    truth = s2ft_train.train(tmp_path, kind="qwen2")
    assert truth.groups[0].tolist() != sorted(truth.groups[0].tolist()), "layer 0 must permute KV groups"
    summary = extract_adapter(truth.base, truth.finetuned, tmp_path / "adapter")
    assert summary["kv_group_order"]["layers.0.self_attn"] == truth.groups[0].tolist()
    base = s2ft_train.base_model(kind="qwen2")
    finetuned = transformers.Qwen2Model.from_pretrained(str(truth.finetuned)).eval()
    optimized, _ = run_passes(adapt(export(base), tmp_path / "adapter"), *pipelines.optimize(merge=True))
    inputs = _inputs()
    with torch.no_grad():
        expected = finetuned(**inputs).last_hidden_state
        assert _rel(base(**inputs).last_hidden_state, expected) > 0.05, "the fine-tune barely changes the output"
    assert _rel(eager(optimized, inputs)["last_hidden_state"], expected) <= 1e-5

    def train_a_bias(t):
        t["layers.1.self_attn.k_proj.bias"] = t["layers.1.self_attn.k_proj.bias"] + 0.1

    edited = _edited_checkpoint(truth, tmp_path / "ft", train_a_bias)
    with pytest.raises(InputError, match=r"layers.1.self_attn.k_proj.bias: differs .*max \|Δ\| 0.1"):
        extract_adapter(truth.base, edited, tmp_path / "a")
