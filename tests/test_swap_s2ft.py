"""Swappable S²FT and sparse ΔW: fixed-capacity index + block / position + value slots hold any fitting
S²FT, PEFTC_SPARSE or SHiRA adapter on one tiny GQA LLaMA (with a LoRA adapter beside them); each
adapter matches the dense fine-tuned weights computed here (SHiRA and LoRA: PEFT), switches are
bit-identical, mixed batches match row by row, padding adds exact zeros, add-adapter fits or refuses
naming module and capacity, and no dense ΔW appears in the graph."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import models
import numpy as np
import pytest
import s2ft_train
import torch
from cli_run import error_line, run
from conftest import assert_outputs_close
from safetensors.torch import save_file

import peftc
from peftc import ir
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.hashing import sha256_file
from peftc.methods.base import ParseOptions
from peftc.methods.loading import read_adapter
from peftc.methods.registry import parse_adapter
from peftc.swap import add_adapter, ops, slots

SIDES = {"self_attn.v_proj": "rows", "self_attn.o_proj": "columns", "mlp.up_proj": "rows", "mlp.down_proj": "columns"}


def _s2ft(model, path: Path, seed: int, ks: dict[str, int], scale: float = 0.2) -> Path:
    """A seeded PEFTC_S2FT adapter: per layer and module in ``ks``, ``k`` sorted random rows/columns."""
    generator = torch.Generator().manual_seed(seed)
    tensors, targets = {}, []
    for layer in range(model.config.num_hidden_layers):
        for name, k in ks.items():
            module = f"layers.{layer}.{name}"
            d_out, d_in = model.get_submodule(module).weight.shape
            side = SIDES.get(name, "rows")
            size = d_out if side == "rows" else d_in
            tensors[f"{module}.s2ft_{side}"] = torch.randperm(size, generator=generator)[:k].sort().values
            shape = (k, d_in) if side == "rows" else (d_out, k)
            tensors[f"{module}.s2ft_block"] = scale * torch.randn(shape, generator=generator)
            targets.append(module)
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "PEFTC_S2FT", "format_version": 1, "target_modules": targets}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def _sparse(model, path: Path, seed: int, module: str, k: int, **config) -> Path:
    """A seeded PEFTC_SPARSE adapter: ``k`` sorted random entries of ``module``'s weight."""
    generator = torch.Generator().manual_seed(seed)
    weight = model.get_submodule(module).weight
    positions = torch.randperm(weight.numel(), generator=generator)[:k].sort().values
    path.mkdir()
    tensors = {f"{module}.weight.sparse_indices": positions, f"{module}.weight.sparse_values": 0.3 * torch.randn(k)}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "PEFTC_SPARSE", "format_version": 1, **config}))
    return path


def _dense(model, adapter: Path):
    """The fine-tuned model the adapter stands for: base weights with each block added entry by entry."""
    from safetensors.torch import load_file

    tuned = copy.deepcopy(model)
    tensors = load_file(adapter / "adapter_model.safetensors")
    with torch.no_grad():
        for key, indices in tensors.items():
            module, _, side = key.rpartition(".")
            if side == "sparse_indices":  # row-major positions into the weight
                flat, values = tuned.get_parameter(module).view(-1), tensors[f"{module}.sparse_values"]
                for j, i in enumerate(indices.tolist()):
                    flat[i] += values[j]
            if side not in ("s2ft_rows", "s2ft_columns"):
                continue
            weight, block = tuned.get_submodule(module).weight, tensors[f"{module}.s2ft_block"]
            for j, i in enumerate(indices.tolist()):
                if side == "s2ft_rows":
                    weight[i, :] += block[j, :]
                else:
                    weight[:, i] += block[:, j]
    return tuned


def _outputs(model, inputs) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in ir.flatten_named(model(**inputs)).items()}


def _base():
    """The S²FT test LLaMA (GQA 4/2 heads, hidden 32) with one layer."""
    import transformers

    config = s2ft_train.tiny_llama_config()
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def swappable(tmp_path_factory):
    """Two S²FT adapters (different k per module), a LoRA on q/k and a SHiRA on gate, bank of 4."""
    from peft import ShiraConfig

    root = tmp_path_factory.mktemp("swap_s2ft")
    model = _base()
    adapters = {
        "a": _s2ft(model, root / "a", 1, {"self_attn.v_proj": 8, "self_attn.o_proj": 16, "mlp.up_proj": 6, "mlp.down_proj": 5}),
        "b": _s2ft(model, root / "b", 2, {"self_attn.v_proj": 4, "self_attn.o_proj": 8, "mlp.up_proj": 9, "mlp.down_proj": 3}),
        "lora": models.make_lora(model, root / "lora", seed=3, target_modules=["q_proj", "k_proj"]),
        "shira": models.make_adapter(model, root / "shira", ShiraConfig(r=1, target_modules=["gate_proj"]), seed=4, noise=3.0),
    }  # fmt: skip
    # PEFT's oracle for the LoRA is left to the tests (they compare its rows with PEFT), to keep this short.
    out = peftc.compile(model, list(adapters.values()), out=root / "out", swappable=True, multi_adapter=4, oracle=False)
    out = out.path
    oracles = {"a": _dense(model, adapters["a"]), "b": _dense(model, adapters["b"])}
    return model, adapters, oracles, out


def _expected(swappable, name, inputs):
    model, adapters, oracles, _ = swappable
    if name is None:
        return _outputs(model, inputs)
    if name in ("lora", "shira"):
        return models.peft_outputs(model, adapters[name], inputs)
    return _outputs(oracles[name], inputs)


def test_every_adapter_matches_its_dense_fine_tune(swappable):
    model, _, _, out = swappable
    runner = peftc.load(out)
    assert runner.manifest.verification["passed"] and runner.adapters == ["a", "b", "lora", "shira"]
    inputs = models.text_inputs(2, 9)
    base = _outputs(model, inputs)["last_hidden_state"]
    for name in ("a", "b", "lora", "shira", None):
        expected = _expected(swappable, name, inputs)
        assert_outputs_close(runner(**inputs, adapter=name), expected)
        if name is not None:
            change = np.abs(expected["last_hidden_state"] - base).max() / np.abs(base).max()
            assert change > 0.05, f"adapter {name} barely changes the output"


def test_switching_back_is_bit_identical(swappable):
    out = swappable[3]
    inputs = {k: v.numpy() for k, v in models.text_inputs(3, 8).items()}
    fresh = peftc.load(out)(**inputs, adapter="a")
    runner = peftc.load(out)
    for name in ("a", "b", "lora", "shira", None, "b"):
        runner(**inputs, adapter=name)
    again = runner(**inputs, adapter="a")
    assert all(np.array_equal(fresh[k], again[k]) for k in fresh)


def test_mixed_batch_matches_each_row(swappable):
    runner = peftc.load(swappable[3])
    choice = ["b", None, "a", "lora", "shira", "a", "b"]
    inputs = models.text_inputs(len(choice), 7)
    got = runner(**inputs, adapter=choice)
    for row, name in enumerate(choice):
        expected = _expected(swappable, name, inputs)
        assert_outputs_close({k: v[row] for k, v in got.items()}, {k: v[row] for k, v in expected.items()})


def test_slots_and_graph_hold_no_dense_delta(swappable):
    """Each S²FT slot is a gather (columns) or scatter-add (rows) on activations: base weights (stored
    transposed, ``peftc/backends/onnx/transposes.py``) feed only their own product, and the slot tensors
    are [K] indices and a K-wide block."""
    import onnx_ir

    out = swappable[3]
    table = peftc.load(out).manifest.target["slots"]
    by_module = {s["module"]: s for s in table["slots"]}
    assert by_module["layers.0.self_attn.v_proj"]["capacity"] == 8  # the larger k of a (8) and b (4)
    assert by_module["layers.0.mlp.up_proj"]["tensors"]["S"]["shape"] == [5, 9, 32]
    assert by_module["layers.0.mlp.down_proj"]["tensors"]["I"]["shape"] == [5, 5]
    gate = by_module["layers.0.mlp.gate_proj"]
    assert gate["kind"] == "sparse" and gate["tensors"]["V"]["shape"] == [5, 96]  # SHiRA r=1: 1·(32 + 64)
    assert by_module["layers.0.self_attn.q_proj"]["kind"] == "linear"
    model = onnx_ir.load(str(out / "model.onnx"))
    for name in [*SIDES, "mlp.gate_proj"]:
        assert f"layers.0.{name}.weight" not in model.graph.initializers
        weight = model.graph.initializers[f"layers.0.{name}.weight.T"]
        assert {user.op_type for user, _ in weight.uses()} == {"MatMul"}
    sparse = [n for n in model.graph if n.op_type in ("ScatterElements", "GatherElements")]
    assert sorted(n.op_type for n in sparse) == ["GatherElements"] * 3 + ["ScatterElements"] * 3
    assert all(str(n.outputs[0].shape[0]) == "batch" for n in sparse)  # activations, never a weight


def test_padding_adds_exact_zeros_and_a_bad_pad_is_caught():
    """The slot op with padded indices/block against the dense weight; a nonzero pad block or a shifted
    index (mutations) must disagree with it."""
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(6, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    for dim, indices in ((0, [1, 4]), (1, [0, 2, 3])):
        block = torch.randn((2, 5) if dim == 0 else (6, 3), generator=generator)
        dense = weight.clone()
        for j, i in enumerate(indices):
            if dim == 0:
                dense[i, :] += block[j, :]
            else:
                dense[:, i] += block[:, j]
        expected = torch.nn.functional.linear(x, dense)
        padded_i = torch.tensor([*indices, 0, 0])
        pad = torch.zeros((2, 5) if dim == 0 else (6, 2))
        padded_s = torch.cat([block, pad], dim=dim)
        assert torch.allclose(ops.s2ft_slot(x, weight, None, padded_i, padded_s, dim), expected, atol=1e-6, rtol=0)
        banks = (padded_i[None].repeat(2, 1), padded_s[None].repeat(2, 1, 1))
        bank = ops.s2ft_slot_bank(x, weight, None, *banks, dim, torch.tensor([1, 0]))
        assert torch.allclose(bank, expected, atol=1e-6, rtol=0)
        nonzero_pad = torch.cat([block, pad + 0.01], dim=dim)
        shifted = torch.tensor([*[i + 1 for i in indices], 0, 0])
        for bad_i, bad_s in ((padded_i, nonzero_pad), (shifted, padded_s)):
            assert not torch.allclose(ops.s2ft_slot(x, weight, None, bad_i, bad_s, dim), expected, atol=1e-4, rtol=0)
    positions, values = torch.tensor([3, 7, 7, 29]), torch.randn(4, generator=generator)  # a repeated entry adds twice
    dense = weight.clone()
    for p, v in zip(positions.tolist(), values.tolist(), strict=True):
        dense[p // 5, p % 5] += v
    expected = torch.nn.functional.linear(x, dense)
    padded_i, padded_v = torch.cat([positions, torch.zeros(2, dtype=torch.int64)]), torch.cat([values, torch.zeros(2)])
    assert torch.allclose(ops.sparse_slot(x, weight, None, padded_i, padded_v), expected, atol=1e-6, rtol=0)
    banks = (torch.stack([padded_i * 0, padded_i]), torch.stack([padded_v * 0, padded_v]))
    bank = ops.sparse_slot_bank(x, weight, None, *banks, torch.tensor([1, 1]))
    assert torch.allclose(bank, expected, atol=1e-6, rtol=0)
    for bad_i, bad_v in ((padded_i, padded_v + 0.01), ((padded_i + 1) % weight.numel(), padded_v)):
        assert not torch.allclose(ops.sparse_slot(x, weight, None, bad_i, bad_v), expected, atol=1e-4, rtol=0)


def _hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def copy_(swappable, tmp_path):
    return shutil.copytree(swappable[3], tmp_path / "artifact")


def test_add_adapters_that_fit(swappable, copy_, tmp_path):
    """An S²FT adapter on fewer rows/columns than the slots hold, a PEFTC_SPARSE one in SHiRA's slot, and a
    ComPEFT one there too (its ternary ΔW as positions and ±c; expected: the top 2 % of |τ| as sign(τ) times
    α·std(τ), computed here)."""
    from peftc.methods import compeft

    model = swappable[0]
    extra = _s2ft(model, tmp_path / "c", 5, {"self_attn.v_proj": 3, "mlp.down_proj": 5})
    entry = add_adapter(copy_, extra, model=model).adapters[-1]
    assert entry["name"] == "c" and entry["verification"]["passed"]
    delta = _sparse(model, tmp_path / "d", 6, "layers.0.mlp.gate_proj", 40)
    assert add_adapter(copy_, delta, model=model).adapters[-1]["verification"]["passed"]
    gate = "layers.0.mlp.gate_proj.weight"
    tau = torch.randn(model.get_parameter(gate).shape, generator=torch.Generator().manual_seed(8))
    ternary = compeft.save(tmp_path / "e", {gate: tau}, density=0.02, alpha=2.0)
    assert add_adapter(copy_, ternary, model=model).adapters[-1]["verification"]["passed"]
    tuned = copy.deepcopy(model)
    kept = tau.abs().flatten().argsort(descending=True)[: math.ceil(0.02 * tau.numel())]
    with torch.no_grad():
        tuned.get_parameter(gate).view(-1)[kept] += tau.flatten()[kept].sign() * 2.0 * float(tau.std())
    inputs = models.text_inputs(2, 6)
    runner = peftc.load(copy_)
    for name, path in (("c", extra), ("d", delta)):
        assert_outputs_close(runner(**inputs, adapter=name), _outputs(_dense(model, path), inputs))
    want = _outputs(tuned, inputs)
    assert np.abs(want["last_hidden_state"] - _outputs(model, inputs)["last_hidden_state"]).max() > 0.1
    assert_outputs_close(runner(**inputs, adapter="e"), want)


def test_compeft_slot_without_its_scale_fails_verification(swappable, copy_, tmp_path, monkeypatch):
    """Mutation: a ComPEFT slot filled with the bare signs (the scale c dropped); add-adapter must refuse."""
    from peftc.methods import compeft
    from peftc.swap import sparse_slots

    model, gate = swappable[0], "layers.0.mlp.gate_proj.weight"
    tau = torch.randn(model.get_parameter(gate).shape, generator=torch.Generator().manual_seed(8))
    ternary = compeft.save(tmp_path / "e", {gate: tau}, density=0.02, alpha=2.0)
    real = sparse_slots._entries

    def unscaled(site):
        positions, values = real(site)
        return positions, dataclasses.replace(values, tensor=values.tensor.sign())

    monkeypatch.setattr(sparse_slots, "_entries", unscaled)
    before = _hashes(copy_)
    with pytest.raises(VerificationError, match=r"vs (reference\[e\]|mixed batch)"):
        add_adapter(copy_, ternary, model=model)
    assert _hashes(copy_) == before


def test_add_adapter_with_a_nonzero_pad_fails_verification(swappable, copy_, tmp_path, monkeypatch):
    """Mutation: padding entries hold 0.01 instead of zeros; verification must refuse, artifact unchanged."""
    from peftc.swap import s2ft_slots

    model = swappable[0]
    extra = _s2ft(model, tmp_path / "c", 5, {"self_attn.v_proj": 3, "mlp.down_proj": 5})
    real = s2ft_slots.fill

    def fill(values, site):
        real(values, site)
        k = site.tensors["s2ft_indices"].tensor.shape[0]
        part = values[f"{site.module}:S"]
        (part[k:] if site.scalars["dim"] == 0 else part[:, k:]).fill_(0.01)

    monkeypatch.setattr(s2ft_slots, "fill", fill)
    before = _hashes(copy_)
    with pytest.raises(VerificationError, match=r"vs (reference\[c\]|mixed batch)"):
        add_adapter(copy_, extra, model=model)
    assert _hashes(copy_) == before


@pytest.mark.parametrize(
    ("ks", "match"),
    [
        ({"self_attn.v_proj": 12}, r"12 rows of 'layers.0.self_attn.v_proj', above its slot capacity 8"),
        ({"mlp.gate_proj": 2}, r"module 'layers.0.mlp.gate_proj' has a sparse slot .* updates its rows"),
        ({"self_attn.q_proj": 2}, r"'layers.0.self_attn.q_proj' has a linear slot .* updates its rows"),
    ],
    ids=["capacity", "sparse-slot", "lora-slot"],
)
def test_add_adapter_refusals_leave_the_artifact_unchanged(swappable, copy_, tmp_path, ks, match):
    before = _hashes(copy_)
    with pytest.raises(InputError, match=match):
        add_adapter(copy_, _s2ft(swappable[0], tmp_path / "bad", 6, ks), model=swappable[0])
    assert _hashes(copy_) == before


def _parsed(model, path: Path):
    return parse_adapter(read_adapter(path), ir.module_table_from_module(model), ParseOptions())


def test_plan_refusals(swappable, tmp_path):
    model, adapters, _, _ = swappable
    a = _parsed(model, adapters["a"])
    with pytest.raises(
        InputError,
        match=r"--slot-capacity 6 is below the 16 columns adapter 'a' updates in 'layers.0.self_attn.o_proj'",
    ):
        slots.plan([a], None, capacity=6)
    assert slots.plan([a], None, capacity=20).by_module()["layers.0.self_attn.v_proj"].capacity == 16  # all rows
    lora_v = models.make_lora(model, tmp_path / "lora_v", target_modules=["v_proj"])
    with pytest.raises(
        InputError, match=r"'layers.0.self_attn.v_proj' is adapted by S²FT in one adapter and by LoRA in another"
    ):
        slots.plan([a, _parsed(model, lora_v)], None)
    masked = _sparse(model, tmp_path / "masked", 1, "layers.0.mlp.gate_proj", 4, keep_base_sparsity=True)
    with pytest.raises(UnsupportedError, match=r"adapter 'masked': keep_base_sparsity masks the update by the base"):
        slots.plan([_parsed(model, masked)], None)
    norm = _sparse(model, tmp_path / "norm", 1, "layers.0.input_layernorm", 4)
    with pytest.raises(UnsupportedError, match=r"layernorm.weight cannot be swapped; sparse slots hold updates of nn"):
        slots.plan([_parsed(model, norm)], None)


def test_cli_inspect_and_slot_capacity_refusals(capsys, swappable):
    code, stdout, _ = run(capsys, "inspect", swappable[3])
    slots_line = "4 S²FT slots of capacity 5-16, 1 sparse slots of capacity 96, 2 LoRA slots of rank 4 (float32)"
    assert code == 0 and f"swappable: {slots_line}, a bank of 4 adapters per call" in stdout
    adapter = swappable[1]["a"]
    code, _, err = run(capsys, "compile", "x", "--adapter", adapter, "-o", "o", "--slot-capacity", "4")
    assert code == 2 and error_line(err).endswith("--slot-capacity applies to --swappable artifacts only")
    code, _, err = run(capsys, "compile", "x", "--adapter", adapter, "-o", "o", "--swappable", "--slot-capacity", "0")
    assert code == 2 and "--slot-capacity 0: give at least 1" in error_line(err)
