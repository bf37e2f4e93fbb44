"""ComPEFT (ternary task vectors) and 1-bit low-rank adapters, peftc's own formats: written by their
encoders, compiled with ``peftc compile`` (merged and ``--no-merge``) and compared with an eager model
whose weights the test decodes itself from the files (numpy bit unpacking, the formats' formulas)."""

from __future__ import annotations

import copy
import json
import math

import models
import numpy as np
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter
from safetensors.numpy import load_file

import peftc
from peftc import ir
from peftc.cli import main
from peftc.errors import InputError, UnsupportedError
from peftc.methods import compeft, onebit
from peftc.methods.loading import load_adapter

Q0 = "encoder.layer.0.attention.self.query"
TARGETS = [Q0, "encoder.layer.1.attention.self.value", "encoder.layer.0.output.dense"]
ONEBIT_ONLY = ["encoder.layer.1.intermediate.dense"]
"""Compiled stacked with the ComPEFT adapter on TARGETS, the 1-bit adapter here only touches other modules."""
INPUTS = models.text_inputs(2, 6)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("quantized-adapters")
    base = models.tiny_bert()
    gen = torch.Generator().manual_seed(3)
    weights = {f"{m}.weight": base.get_submodule(m).weight for m in TARGETS}
    deltas = {k: torch.randn(w.shape, generator=gen) * 0.05 for k, w in weights.items()}
    factors = {m: (torch.randn(4, base.get_submodule(m).in_features, generator=gen), None) for m in TARGETS}
    factors = {
        m: (a, torch.randn(base.get_submodule(m).out_features, 4, generator=gen) * 0.1) for m, (a, _) in factors.items()
    }
    return {
        "compeft": compeft.save(out / "compeft", deltas, density=0.3, alpha=1.0),
        "compeft_int8": compeft.save(out / "compeft8", deltas, density=0.3, alpha=1.0, packed=False),
        "onebit": onebit.save(out / "onebit", factors, scaling=0.5),
        "onebit_other": onebit.save(out / "onebit-other", _factors(base, ONEBIT_ONLY, gen), scaling=2.0),
    }


def _factors(base, targets, gen):
    found = {}
    for m in targets:
        linear = base.get_submodule(m)
        a = torch.randn(4, linear.in_features, generator=gen)
        found[m] = (a, torch.randn(linear.out_features, 4, generator=gen) * 0.1)
    return found


def _compeft_reference(path, model=None) -> torch.nn.Module:
    """The base with ``W += c·signs``, decoded here from the file's bytes."""
    model = model or copy.deepcopy(models.tiny_bert())
    state = model.state_dict()
    tensors = load_file(str(path / "adapter_model.safetensors"))
    for key in {k.rsplit(".", 1)[0] for k in tensors}:
        signs, scale = _ternary(tensors, key, state[key].numel()), float(tensors[f"{key}.scale"])
        state[key] += torch.from_numpy(signs.reshape(tuple(state[key].shape)) * scale).float()
    return model


def _ternary(tensors: dict[str, np.ndarray], key: str, count: int) -> np.ndarray:
    """The flat signs of ``key`` in a ComPEFT file: 2-bit codes low bits first (1 → +1, 2 → −1), or int8."""
    raw = tensors[f"{key}.signs"]
    if raw.dtype != np.uint8:
        return raw.astype(np.float64).reshape(-1)
    codes = np.stack([(raw >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:count]
    return np.select([codes == 1, codes == 2], [1.0, -1.0], 0.0)


def _onebit_factor(tensors: dict[str, np.ndarray], prefix: str, cols: int) -> np.ndarray:
    """A 1-bit factor of the file: per-row scale × (2·bit − 1), bits low first."""
    bits = np.unpackbits(tensors[f"{prefix}.signs"], axis=1, bitorder="little")[:, :cols]
    return tensors[f"{prefix}.scales"].astype(np.float64)[:, None] * (2.0 * bits - 1.0)


def _onebit_reference(path, model=None) -> torch.nn.Module:
    """The base with ``W += s·B·A``, ``A``/``B`` = per-row scale × (2·bit − 1), bits read with numpy."""
    model = model or copy.deepcopy(models.tiny_bert())
    scaling = json.loads((path / "adapter_config.json").read_text())["scaling"]
    tensors = load_file(str(path / "adapter_model.safetensors"))

    for m in {k.split(".onebit_")[0] for k in tensors}:
        linear = model.get_submodule(m)
        a = _onebit_factor(tensors, f"{m}.onebit_A", linear.in_features)
        b = _onebit_factor(tensors, f"{m}.onebit_B", a.shape[0])
        linear.weight += torch.from_numpy(scaling * b @ a).float()
    return model


def _outputs(model: torch.nn.Module) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in ir.flatten_named(model(**INPUTS)).items() if isinstance(v, torch.Tensor)}


def test_encoders_match_the_published_formulas(tmp_path) -> None:
    """The files the encoders write hold what the formulas give, computed here with numpy: ComPEFT keeps
    the top ``ceil(density·numel)`` entries of ``|τ|`` as ``sign(τ)`` with ``c = α·std(τ)`` (sample std,
    as ``torch.std``); 1-bit keeps ``sign(w)`` (0 → +1) with ``α = mean|row|`` per row."""
    gen = torch.Generator().manual_seed(11)
    tau, a, b = torch.randn(8, 12, generator=gen), torch.randn(3, 10, generator=gen), torch.randn(5, 3, generator=gen)
    flat = tau.double().numpy().reshape(-1)
    kept = np.argsort(-np.abs(flat))[: math.ceil(0.3 * flat.size)]
    expected = np.zeros_like(flat)
    expected[kept] = np.sign(flat[kept])
    for packed in (True, False):
        path = compeft.save(tmp_path / f"compeft-{packed}", {"w": tau}, density=0.3, alpha=1.5, packed=packed)
        tensors = load_file(str(path / "adapter_model.safetensors"))
        np.testing.assert_array_equal(_ternary(tensors, "w", flat.size), expected)
        assert float(tensors["w.scale"]) == pytest.approx(1.5 * np.std(flat, ddof=1), rel=1e-6)
    tensors = load_file(str(onebit.save(tmp_path / "onebit", {"m": (a, b)}) / "adapter_model.safetensors"))
    for name, matrix in (("onebit_A", a.double().numpy()), ("onebit_B", b.double().numpy())):
        want = np.abs(matrix).mean(1)[:, None] * np.where(matrix >= 0, 1.0, -1.0)
        np.testing.assert_allclose(_onebit_factor(tensors, f"m.{name}", matrix.shape[1]), want, rtol=1e-6)


@pytest.mark.parametrize("merge", [True, False])
def test_compiled_matches_the_decoded_formula(capsys, tmp_path, bert_dir, adapters, merge) -> None:
    """A ComPEFT and a 1-bit adapter stacked (other modules), compiled merged and with ``--no-merge``."""
    out = tmp_path / "out"
    argv = ["compile", str(bert_dir), "--adapter", str(adapters["compeft"]), "--adapter", str(adapters["onebit_other"])]
    assert main([*argv, "-o", str(out), *([] if merge else ["--no-merge"])]) == 0, capsys.readouterr().err
    expected = _outputs(_onebit_reference(adapters["onebit_other"], _compeft_reference(adapters["compeft"])))
    assert (np.abs(expected["last_hidden_state"] - _outputs(models.tiny_bert())["last_hidden_state"]) > 1e-2).any()
    assert_outputs_close(peftc.load(out)(**INPUTS), expected)
    manifest = json.loads((out / "manifest.json").read_text())
    ops = {s["op"] for a in manifest["adapters"] for s in a["sites"]}
    assert ops == {"peftc::ternary_delta", "peftc::lora_linear"}


@pytest.mark.parametrize("kind", ["compeft", "onebit"])
def test_reference_program_matches_the_decoded_formula(bert_program, adapters, kind) -> None:
    """The unlowered sites (each op's eager body, what ``--no-merge`` keeps) against the test's decode."""
    reference = (_compeft_reference if kind == "compeft" else _onebit_reference)(adapters[kind])
    assert_outputs_close(eager(adapt(bert_program, adapters[kind]), INPUTS), _outputs(reference))


def test_int8_signs_decode_like_packed(bert_table, adapters) -> None:
    packed = load_adapter(adapters["compeft"], bert_table)
    plain = load_adapter(adapters["compeft_int8"], bert_table)
    assert [s.module for s in packed.sites] == [s.module for s in plain.sites] and len(packed.sites) == 3
    for a, b in zip(packed.sites, plain.sites, strict=True):
        assert torch.equal(a.tensors["signs"].tensor, b.tensors["signs"].tensor) and a.scalars == b.scalars
        assert a.info["nonzero"] == math.ceil(0.3 * a.tensors["signs"].tensor.numel())


def test_mutation_swapped_ternary_code_is_caught(monkeypatch, bert_program, adapters) -> None:
    """The reference program built from a decoder that reads code 2 as +1 disagrees with the test's decode."""
    expected = _outputs(_compeft_reference(adapters["compeft"]))
    assert_outputs_close(eager(adapt(bert_program, adapters["compeft"]), INPUTS), expected)
    real = compeft.unpack_ternary
    monkeypatch.setattr(compeft, "unpack_ternary", lambda packed, count: real(packed, count).abs())
    with pytest.raises(AssertionError, match="relative error"):
        assert_outputs_close(eager(adapt(bert_program, adapters["compeft"]), INPUTS), expected)


def test_mutation_high_bit_first_is_caught(monkeypatch, bert_program, adapters) -> None:
    """A 1-bit decoder reading each byte's bits high bit first disagrees with the test's decode."""
    expected = _outputs(_onebit_reference(adapters["onebit"]))
    real = onebit.unpack_signs
    flipped = lambda packed, count: real(packed, packed.shape[1] * 8).reshape(packed.shape[0], -1, 8).flip(-1)  # noqa: E731
    monkeypatch.setattr(onebit, "unpack_signs", lambda packed, count: flipped(packed, count).flatten(1)[:, :count])
    with pytest.raises(AssertionError, match="relative error"):
        assert_outputs_close(eager(adapt(bert_program, adapters["onebit"]), INPUTS), expected)


def _edit(tensors):
    return lambda t: {**t, **tensors}


@pytest.mark.parametrize(
    ("kind", "edit", "config", "error", "match"),
    [
        (
            "compeft",
            {f"{Q0}.weight.signs": torch.zeros(5, dtype=torch.uint8)},
            None,
            InputError,
            r"weight\.signs: shape \[5\]; 2-bit signs of the base tensor \[32, 32\] take \[256\]",
        ),
        (
            "compeft",
            {f"{Q0}.weight.signs": torch.full((256,), 255, dtype=torch.uint8)},
            None,
            InputError,
            r"weight\.signs: a sign other than -1, 0, \+1",
        ),
        (
            "compeft",
            {f"{Q0}.weight.scale": None},
            None,
            InputError,
            r"weight\.signs: no '.*query\.weight\.scale' beside it",
        ),
        (
            "compeft",
            {f"{Q0}.wieght.signs": torch.zeros(256, dtype=torch.uint8), f"{Q0}.wieght.scale": torch.tensor(1.0)},
            None,
            InputError,
            r"the base has no tensor '.*wieght'; did you mean",
        ),
        (
            "compeft",
            {f"{Q0}.weight.scale": torch.ones(2)},
            None,
            InputError,
            r"weight\.scale: shape \[2\]; the scale is one",
        ),
        ("compeft", None, {"format_version": 2}, UnsupportedError, r"PEFTC_COMPEFT format_version 2; peftc reads 1"),
        (
            "onebit",
            {f"{Q0}.onebit_B.scales": torch.ones(31)},
            None,
            InputError,
            r"onebit_B\.scales: shape \[31\], expected \[32\] \(rank 4",
        ),
        ("onebit", {f"{Q0}.onebit_A.signs": None}, None, InputError, r"module '.*query' has no onebit_A\.signs"),
        (
            "onebit",
            {f"{Q0}.onebit_A.scales": torch.ones(4, dtype=torch.float16)},
            None,
            InputError,
            r"onebit_A\.scales: dtype float16; expected float32",
        ),
        (
            "onebit",
            {"embeddings.word_embeddings.onebit_A.signs": torch.zeros(4, 4, dtype=torch.uint8)},
            None,
            UnsupportedError,
            r"PEFTC_ONEBIT on Embedding",
        ),
        ("onebit", None, {"scaling": "x"}, InputError, r"scaling='x' is not a number"),
    ],
)
def test_bad_input(tmp_path, bert_table, adapters, kind, edit, config, error, match) -> None:
    path = edited_adapter(adapters[kind], tmp_path / "bad", config=config, tensors=_edit(edit) if edit else None)
    with pytest.raises(error, match=match) as raised:
        load_adapter(path, bert_table)
    assert "\n" not in str(raised.value)


def test_cli_prints_one_line(capsys, tmp_path, bert_dir, adapters) -> None:
    path = edited_adapter(adapters["compeft"], tmp_path / "bad", tensors=_edit({f"{Q0}.weight.scale": None}))
    code = main(["compile", str(bert_dir), "--adapter", str(path), "-o", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[peftc")]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0] and "weight.scale' beside it" in err[0], err
