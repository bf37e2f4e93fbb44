"""SSF, linear-adapter and temporal-shift ops and their fold math, against the official formulas.

The references are ``reparam_models``'s transcriptions of the official code (``ssf_ada``,
``LinearAdapter``, ``TemporalShift``) and plain eager layers; the fold math must reproduce the layer
followed (or preceded) by the transform. fp32 throughout: ≤ 1e-6 relative to the output's largest
magnitude (a few dozen fp32 roundings on tensors this small); every transform moves outputs by far more.
"""

from __future__ import annotations

import pytest
import reparam_models as rm
import torch
import torch.nn.functional as F
from torch import nn

import peftc.methods.registry  # noqa: F401  (registers the ops)
from peftc.methods.ssf.ops import fold_after, fold_before
from peftc.methods.zeroi2v.ops import adapter_affine, fold_input, fold_output

TOL = 1e-6


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().abs().max() / expected.detach().abs().max())


def _vectors(channels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 1 + 0.3 * torch.randn(channels, generator=g), 0.2 * torch.randn(channels, generator=g)


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 7, 4, 5)], ids=["tokens-last-axis", "nchw-axis-1"])
def test_ssf_op_is_the_official_ssf_ada(shape):
    x = torch.randn(shape)
    scale, shift = _vectors(7)
    axis = len(shape) - 1 if shape[-1] == 7 else 1
    expected = rm.ssf_ada(x, scale, shift)
    assert torch.equal(torch.ops.peftc.ssf(x, scale, shift, axis), expected)
    assert _rel(expected, x) > 0.1


def _producers() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    bn.running_mean.normal_(0, 0.5)
    bn.running_var.uniform_(0.5, 2)
    gn = nn.GroupNorm(3, 6)
    with torch.no_grad():
        for norm in (bn, gn):
            norm.weight.normal_(1, 0.2)
            norm.bias.normal_(0, 0.2)
    return [
        ("linear", nn.Linear(5, 6), (4, 5)),
        ("linear-no-bias", nn.Linear(5, 6, bias=False), (4, 5)),
        ("grouped-conv", nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 5, 5)),
        ("layer-norm", nn.LayerNorm(6), (3, 4, 6)),
        ("batch-norm", bn, (2, 6, 3, 3)),
        ("group-norm", gn, (2, 6, 3, 3)),
    ]


@pytest.mark.parametrize(("layer", "shape"), [p[1:] for p in _producers()], ids=[p[0] for p in _producers()])
def test_fold_after_is_the_layer_then_ssf(layer, shape):
    x = torch.randn(shape)
    scale, shift = _vectors(6)
    expected = rm.ssf_ada(layer(x), scale, shift).detach()
    weight, bias = fold_after(layer.weight, layer.bias, scale, shift)
    folded = _with(layer, weight, bias)
    assert _rel(folded(x), expected) <= TOL


def test_fold_on_the_wrong_side_is_caught():
    torch.manual_seed(1)
    layer = nn.Linear(6, 6)
    x = torch.randn(4, 6)
    scale, shift = _vectors(6)
    expected = rm.ssf_ada(layer(x), scale, shift).detach()
    weight, bias = fold_before(layer.weight, layer.bias, scale, shift)  # consumer's formula on a producer
    assert _rel(_with(layer, weight, bias)(x), expected) > 0.05


@pytest.mark.parametrize(
    ("layer", "shape"),
    [(nn.Linear(6, 3), (4, 6)), (nn.Conv2d(6, 4, 1), (2, 6, 3, 3)), (nn.Conv2d(6, 4, 3, bias=False), (2, 6, 5, 5))],
    ids=["linear", "conv-1x1", "conv-3x3-unpadded-no-bias"],
)
def test_fold_before_is_ssf_then_the_layer(layer, shape):
    torch.manual_seed(2)
    x = torch.randn(shape)
    scale, shift = _vectors(6, seed=3)
    expected = layer(rm.ssf_ada(x, scale, shift)).detach()
    weight, bias = fold_before(layer.weight, layer.bias, scale, shift)
    assert _rel(_with(layer, weight, bias)(x), expected) <= TOL


def _with(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    import copy

    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(weight)
    folded.bias = nn.Parameter(bias)
    return folded.eval()


def _adapter(width: int = 6, hidden: int = 3, seed: int = 4) -> rm.LinearAdapter:
    torch.manual_seed(seed)
    adapter = rm.LinearAdapter(width, hidden, scale=0.5).eval()
    with torch.no_grad():
        adapter.D_fc2.weight.normal_(0, 0.5)
        adapter.D_fc2.bias.normal_(0, 0.2)
    return adapter


def _args(adapter: rm.LinearAdapter) -> tuple:
    fc1, fc2 = adapter.D_fc1, adapter.D_fc2
    return fc1.weight, fc1.bias, fc2.weight, fc2.bias, adapter.scale


def test_linear_adapter_op_is_the_official_adapter():
    adapter = _adapter()
    x = torch.randn(2, 5, 6)
    expected = adapter(x).detach()
    assert _rel(torch.ops.peftc.linear_adapter(x, *_args(adapter), True), expected) <= TOL
    assert _rel(expected, x) > 0.1
    without = adapter.D_fc2(adapter.D_fc1(x)) * adapter.scale
    assert _rel(torch.ops.peftc.linear_adapter(x, *_args(adapter), False), without.detach()) <= TOL


def test_folds_reproduce_the_adapter_on_either_side():
    adapter = _adapter()
    torch.manual_seed(5)
    before, after = nn.Linear(6, 9), nn.Linear(4, 6)
    matrix, offset = adapter_affine(*_args(adapter), True)
    x_in, x_out = torch.randn(3, 6), torch.randn(3, 4)
    # input side: the adapter, then the projection
    expected = before(adapter(x_in)).detach()
    assert _rel(F.linear(x_in, *fold_input(before.weight, before.bias, matrix, offset)), expected) <= TOL
    # output side: the projection, then the adapter
    expected = adapter(after(x_out)).detach()
    assert _rel(F.linear(x_out, *fold_output(after.weight, after.bias, matrix, offset)), expected) <= TOL
    # mutation: the output-side formula (M·W) applied to an input-side adapter is caught
    square = nn.Linear(6, 6)
    wrong = F.linear(x_in, *fold_output(square.weight, square.bias, matrix, offset))
    assert _rel(wrong, square(adapter(x_in)).detach()) > 0.05


CASES = [
    pytest.param(3, {"shift_div": 4}, 2, id="T3"),
    pytest.param(2, {"shift_div": 4}, 1, id="T2-batch1"),
    pytest.param(5, {"shift_div": 6, "shift_stride": 2}, 2, id="T5-stride2"),
    pytest.param(4, {"shift_div": 6, "long_shift_div": 6}, 3, id="T4-long-shift"),
    pytest.param(1, {"shift_div": 4}, 2, id="T1-nothing-moves"),
]


def _spans(stdha: dict, channels: int) -> list[int]:
    """STDHA's spans for one tensor of ``channels`` channels (what the ZeroI2V parser derives per K/V)."""
    fold = channels // stdha["shift_div"]
    stride = stdha.get("shift_stride", 1)
    spans = [0, fold, stride, fold, 2 * fold, -stride]
    long_div = stdha.get("long_shift_div", -1)
    if long_div > 0:
        spans += [2 * fold, 2 * fold + channels // long_div, 2]
    return spans


@pytest.mark.parametrize(("frames", "stdha", "batch"), CASES)
def test_temporal_shift_is_the_official_temporal_shift(frames, stdha, batch):
    channels, tokens = 24, 5
    x = torch.randn(batch * frames, tokens, channels, generator=torch.Generator().manual_seed(frames))
    official = rm.official_temporal_shift(
        x.transpose(0, 1), frames, stdha["shift_div"], stdha.get("shift_stride", 1), stdha.get("long_shift_div", -1)
    ).transpose(0, 1)
    spans = _spans(stdha, channels)
    assert torch.equal(torch.ops.peftc.temporal_shift(x, frames, 0, spans), official)
    # the same shift with frames on axis 1 (the official (tokens, b·t, c) layout)
    assert torch.equal(torch.ops.peftc.temporal_shift(x.transpose(0, 1), frames, 1, spans), official.transpose(0, 1))
    if frames > 1:
        assert not torch.equal(official, x)
        reversed_spans = [v if i % 3 != 2 else -v for i, v in enumerate(spans)]
        assert not torch.equal(torch.ops.peftc.temporal_shift(x, frames, 0, reversed_spans), official)
