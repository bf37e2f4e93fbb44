"""peftc::lora_linear: eager body vs an independent formula and vs PEFT's own LoRA layer; fake impl."""

from __future__ import annotations

import copy

import pytest
import torch

from peftc.methods.lora.ops import delta_weight, lora_linear, lora_scale


def _tensors(d_in=6, d_out=5, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(4, 7, d_in, generator=g),
        torch.randn(d_out, d_in, generator=g),
        torch.randn(d_out, generator=g),
        torch.randn(r, d_in, generator=g),
        torch.randn(d_out, r, generator=g),
        torch.randn(d_out, generator=g),
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_lora_bias", [True, False])
def test_eager_body_matches_merged_formula(with_bias, with_lora_bias):
    x, w, b, a, bb, lb = _tensors()
    b = b if with_bias else None
    lb = lb if with_lora_bias else None
    s = 0.75
    got = lora_linear(x, w, b, a, bb, lb, s, False)
    # Independent route: merge in float64, then one matmul.
    w64 = w.double() + s * (bb.double() @ a.double())
    bias64 = (b.double() if b is not None else 0) + (s * lb.double() if lb is not None else 0)
    expected = x.double() @ w64.T + bias64
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_fan_in_fan_out_layout_matches_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    x, w, b, a, bb, _ = _tensors()
    conv = Conv1D(5, 6)
    conv.weight.data = w.T.clone()  # Conv1D stores [d_in, d_out]
    conv.bias.data = b.clone()
    expected = conv(x) + 0.5 * (x @ a.T @ bb.T)
    torch.testing.assert_close(lora_linear(x, conv.weight, conv.bias, a, bb, None, 0.5, True), expected)
    torch.testing.assert_close(delta_weight(a, bb, 0.5, "linear_t"), (0.5 * bb @ a).T)


def test_matches_peft_lora_layer():
    import peft

    x, w, b, a, bb, _ = _tensors()
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    base[0].weight.data, base[0].bias.data = w.clone(), b.clone()
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0"], use_rslora=True)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    layer = model.base_model.model[0]
    layer.lora_A["default"].weight.data = a.clone()
    layer.lora_B["default"].weight.data = bb.clone()
    scale = lora_scale(3, 5, use_rslora=True)
    assert scale == pytest.approx(layer.scaling["default"])
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(x, w, b, a, bb, None, scale, False), layer(x))
        torch.testing.assert_close(delta_weight(a, bb, scale, "linear"), layer.get_delta_weight("default"))


def test_scale_rules():
    assert lora_scale(8, 16, use_rslora=False) == 2.0
    assert lora_scale(16, 8, use_rslora=True) == 2.0


def test_fake_impl_agrees_with_eager():
    x, w, b, a, bb, lb = _tensors()
    torch.library.opcheck(torch.ops.peftc.lora_linear.default, (x, w, b, a, bb, lb, 0.5, False))
    torch.library.opcheck(torch.ops.peftc.lora_linear.default, (x, w.T.contiguous(), None, a, bb, None, 2.0, True))


def test_half_precision_input_promotes_like_peft():
    x, w, b, a, bb, _ = _tensors()
    out = lora_linear(x.half().float(), w, b, a.half(), bb.half(), None, 1.0, False)
    assert out.dtype == torch.float32
