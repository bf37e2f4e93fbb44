"""DoRA ops: the reference weight equals what PEFT's merge writes, on every layer type PEFT supports;
the factored form equals the reference; a wrong norm axis is caught by verification."""

from __future__ import annotations

import copy

import models
import pytest
import torch

import peftc
from peftc.errors import VerificationError
from peftc.methods.lora.dora import dora_factored_weight, dora_weight, factor


def _peft_merged(module: torch.nn.Module, target: str, **config) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """PEFT's DoRA on ``module.target``: (adapter tensors, base weight, weight after PEFT's merge)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(module), LoraConfig(target_modules=[target], use_dora=True, **config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * (0.5 if "magnitude" in name else 0.3))
    layer = peft_model.base_model.model.get_submodule(target)
    if layer.lora_embedding_A:  # embeddings keep their factors as raw parameters
        a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    base = layer.get_base_layer().weight.detach().clone()
    merged = peft_model.merge_and_unload().get_submodule(target).weight.detach()
    return {"a": a.detach(), "b": b.detach(), "m": m.detach(), "scale": layer.scaling["default"]}, base, merged


class _Layers(torch.nn.Module):
    def __init__(self):
        import transformers

        super().__init__()
        self.linear = torch.nn.Linear(12, 9)
        self.conv1d = transformers.pytorch_utils.Conv1D(9, 12)  # GPT-2 layout: weight [12, 9]
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.embed = torch.nn.Embedding(20, 8)


@pytest.mark.parametrize(
    ("target", "layout", "config"),
    [
        ("linear", "linear", {}),
        ("conv1d", "linear_t", {"fan_in_fan_out": True}),
        ("conv", "conv", {}),
        ("embed", "embedding", {}),
    ],
)
def test_reference_weight_equals_peft_merge(target, layout, config):
    torch.manual_seed(0)
    t, base, merged = _peft_merged(_Layers(), target, r=3, lora_alpha=6, **config)
    ours = dora_weight(base, t["a"], t["b"], t["m"], t["scale"], layout)
    torch.testing.assert_close(ours, merged, rtol=1e-6, atol=1e-6)
    assert (ours - base).abs().max() > 0.05  # the adapter really changes the weight


@pytest.mark.parametrize("layout", ["linear", "linear_t", "conv", "embedding"])
def test_factored_weight_equals_reference(layout):
    g = torch.Generator().manual_seed(1)
    shapes = {"linear": (9, 12), "linear_t": (12, 9), "conv": (6, 4, 3, 3), "embedding": (20, 8)}
    w = torch.randn(*shapes[layout], generator=g)
    out = {"linear": 9, "linear_t": 9, "conv": 6, "embedding": 8}[layout]
    d_in = {"linear": 12, "linear_t": 12, "conv": 4, "embedding": 20}[layout]
    a = torch.randn(3, d_in, *((3, 3) if layout == "conv" else ()), generator=g)
    b = torch.randn(out, 3, *((1, 1) if layout == "conv" else ()), generator=g)
    m = torch.rand(out, generator=g) + 0.5
    f = factor(w, a, b, m, 0.7, layout)
    assert f.shape == (out,)
    torch.testing.assert_close(dora_factored_weight(w, a, b, f, 0.7, layout), dora_weight(w, a, b, m, 0.7, layout))


def test_mutation_norm_over_the_wrong_axis_fails_verification(tmp_path, monkeypatch):
    from peft import LoraConfig

    import peftc.methods.lora.dora as dora

    model = models.tiny_bert()
    adapter = models.make_adapter(model, tmp_path / "a", LoraConfig(target_modules=["query", "value"], use_dora=True))
    real = dora.factor

    def wrong_axis(weight, a, b, m, scale, layout):
        # Normalising over output channels (columns of [d_out, d_in]) instead of per output row.
        return real(weight, a, b, m, scale, "linear_t" if layout == "linear" else layout)

    monkeypatch.setattr(dora, "factor", wrong_axis)
    with pytest.raises(VerificationError, match="vs peft"):
        peftc.compile(model, adapter, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
