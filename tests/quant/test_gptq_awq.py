"""GPTQ and AWQ decoders against hand-packed tensors (``quant_packing``: the published layouts, bit by bit)."""

from __future__ import annotations

import pytest
import quant_packing as qp
import torch

from peftc.errors import InputError, UnsupportedError
from peftc.quant import awq, gptq

OUT, IN, GS = 32, 64, 16


def _case(bits: int, act_order: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, generator=gen)
    group = torch.arange(IN) // GS
    if act_order:
        group = group[torch.randperm(IN, generator=gen)]
    q, zeros, scales = qp.quantize(weight, group, IN // GS, bits, gen)
    return q, zeros, scales, group


def _config(bits: int, version: int, desc_act: bool = False) -> dict:
    fmt = "gptq" if version == 1 else "gptq_v2"
    return {"quant_method": "gptq", "bits": bits, "group_size": GS, "desc_act": desc_act, "checkpoint_format": fmt}


@pytest.mark.parametrize(
    ("bits", "version", "act_order"),
    [(4, 1, False), (4, 2, False), (4, 1, True), (4, 2, True), (8, 1, False), (2, 2, True), (3, 1, True)],
)
def test_gptq_matches_hand_packed(bits: int, version: int, act_order: bool) -> None:
    q, zeros, scales, group = _case(bits, act_order)
    tensors = qp.gptq(q, zeros, scales, group, bits, version, g_idx=act_order)
    decoded = gptq.dequantize(tensors, _config(bits, version, act_order), "model.layers.0.q_proj")
    assert decoded.dtype == torch.float32 and decoded.shape == (OUT, IN)
    assert torch.equal(decoded, qp.truth(q, zeros, scales, group))


def test_awq_matches_hand_packed() -> None:
    q, zeros, scales, group = _case(4, act_order=False)
    config = {"quant_method": "awq", "bits": 4, "group_size": GS, "version": "GEMM", "zero_point": True}
    decoded = awq.dequantize(qp.awq(q, zeros, scales), config, "model.layers.0.q_proj")
    assert torch.equal(decoded, qp.truth(q, zeros, scales, group))


def test_mutations_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A v1 decoder without the +1, and an AWQ decoder reading the nibbles in plain order, both fail."""
    q, zeros, scales, group = _case(4, act_order=False)
    expected = qp.truth(q, zeros, scales, group)
    tensors = qp.gptq(q, zeros, scales, group, 4, 1, g_idx=False)
    monkeypatch.setattr(gptq, "checkpoint_version", lambda config, key: 2)
    assert not torch.allclose(gptq.dequantize(tensors, _config(4, 1), "m"), expected, atol=1e-3)
    monkeypatch.setattr(awq, "REVERSE", tuple(range(8)))
    config = {"quant_method": "awq", "bits": 4, "group_size": GS}
    assert not torch.allclose(awq.dequantize(qp.awq(q, zeros, scales), config, "m"), expected, atol=1e-3)


def _gptq_tensors() -> dict[str, torch.Tensor]:
    q, zeros, scales, group = _case(4, act_order=True)
    return qp.gptq(q, zeros, scales, group, 4, 1, g_idx=True)


@pytest.mark.parametrize(
    ("change", "config", "error", "match"),
    [
        (
            lambda t: t.update(qweight=t["qweight"][:-2]),
            {},
            InputError,
            r"L\.scales: .*\[3, 32\] \(in_features 48 from qweight",
        ),
        (
            lambda t: t.update(qzeros=t["qzeros"][:, :1]),
            {},
            InputError,
            r"L\.qzeros: shape \[4, 1\], expected \[4, 4\]",
        ),
        (lambda t: None, {"group_size": 32}, InputError, r"L\.scales: shape \[4, 32\], expected \[2, 32\]"),
        (lambda t: None, {"bits": 5}, UnsupportedError, r"L: quantization_config\.bits = 5"),
        (lambda t: t["g_idx"].__setitem__(0, 4), {}, InputError, r"L\.g_idx: values in \[0, 4\], outside the 4"),
        (
            lambda t: t.pop("g_idx"),
            {"desc_act": True},
            InputError,
            r"L\.g_idx: missing, but quantization_config\.desc_act",
        ),
        (lambda t: t.pop("scales"), {}, InputError, r"L\.scales: missing"),
        (lambda t: None, {"checkpoint_format": "marlin"}, UnsupportedError, r"checkpoint_format = 'marlin'"),
        (lambda t: None, {"sym": True}, InputError, r"L\.qzeros: quantization_config\.sym is true"),
    ],
)
def test_gptq_bad_input(change, config, error, match) -> None:
    tensors = _gptq_tensors()
    change(tensors)
    with pytest.raises(error, match=match) as raised:
        gptq.dequantize(tensors, {**_config(4, 1), **config}, "L")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("change", "config", "error", "match"),
    [
        (lambda t: None, {"version": "gemv"}, UnsupportedError, r"L: quantization_config\.version = 'gemv'"),
        (lambda t: None, {"version": "exllama"}, UnsupportedError, r"version = 'exllama'"),
        (lambda t: None, {"group_size": 24}, InputError, r"group_size 24 does not divide in_features 64"),
        (lambda t: None, {"bits": 8}, UnsupportedError, r"L: quantization_config\.bits = 8"),
        (
            lambda t: t.update(qzeros=t["qzeros"][:, :1]),
            {},
            InputError,
            r"L\.qzeros: shape \[4, 1\], expected \[4, 4\]",
        ),
        (lambda t: t.update(scales=t["scales"].float().int()), {}, InputError, r"L\.scales: dtype int32"),
    ],
)
def test_awq_bad_input(change, config, error, match) -> None:
    q, zeros, scales, _ = _case(4, act_order=False)
    tensors = qp.awq(q, zeros, scales)
    change(tensors)
    with pytest.raises(error, match=match) as raised:
        awq.dequantize(tensors, {"quant_method": "awq", "bits": 4, "group_size": GS, **config}, "L")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("version", [1, 2])
def test_gptq_symmetric_checkpoint(version: int) -> None:
    """``sym: true`` stores the mid-range zero (8, written as 7 in v1) and decodes with the same formula."""
    q, _, scales, group = _case(4, act_order=False)
    zeros = torch.full_like(scales, 8, dtype=torch.int64)
    tensors = qp.gptq(q, zeros, scales, group, 4, version, g_idx=False)
    decoded = gptq.dequantize(tensors, {**_config(4, version), "sym": True}, "L")
    assert torch.equal(decoded, qp.truth(q, zeros, scales, group))
