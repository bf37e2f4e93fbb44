"""fold-linear-adapters: ZeroI2V's adapters fold into the projections on the side they sit; STDHA stays.

The oracle is ``reparam_models.zeroi2v_reference``: the official ``LinearAdapter`` arrangement and
``TemporalShift`` code around a video ViT, sharing no code with peftc. fp32, ≤ 1e-5 relative (the bound
``peftc.verify`` uses); observed ~2e-7, while the adapters move the outputs by more than 100 %.
Frame counts 2 and 5 here, 3 in ``tests/test_reparam.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import reparam_models as rm
import torch
from conftest import adapt, assert_outputs_close, export, run_passes
from torch import nn

from peftc import ir
from peftc.loaders import parse_inputs
from peftc.methods import Adapter, AdapterSource, AdapterTensor, Site
from peftc.methods.loading import load_adapter
from peftc.methods.zeroi2v.fold import FoldLinearAdaptersPass
from peftc.passes import PassContext, PassManager, pipelines
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass

STDHA = {"shift_div": 12}


def _config(frames):
    return {"peft_type": "ZEROI2V", "scale": 0.5, "num_frames": frames, "stdha": STDHA}


def _setup(tmp_path, frames):
    model, base = rm.exported("video", frames)
    adapters = rm.zeroi2v_adapters(model)
    path = rm.write_native(tmp_path / f"z{frames}", _config(frames), rm.zeroi2v_official_tensors(adapters))
    return model, base, rm.zeroi2v_reference(model, adapters, STDHA, frames), path


def _fold(reference):
    return run_passes(reference, FoldLinearAdaptersPass(), EliminateDeadCodePass())


def _check_numbers(program, reference_model, frames, batches=(1, 2), seeds=(0, 1)):
    module = program.module()
    for batch in batches:
        for seed in seeds:
            x = rm.video(batch, frames, seed)
            with torch.no_grad():
                assert_outputs_close({"output": module(x=x)}, {"output": reference_model(x)})


@pytest.mark.parametrize("frames", [2, 5])
def test_adapters_fold_and_only_the_temporal_shift_remains(tmp_path, frames):
    _, base, reference_model, path = _setup(tmp_path, frames)
    reference = adapt(base, path)
    _check_numbers(reference, reference_model, frames, batches=(2,), seeds=(0,))
    folded, records = _fold(reference)
    assert records[0].stats == {"folded_input_side": 4, "folded_output_side": 4, "kept": 0, "untied": 0}
    before, after = ir.op_counts(base), ir.op_counts(folded)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"peftc.temporal_shift": 2}
    assert sum(t.numel() for t in folded.state_dict.values()) == sum(t.numel() for t in base.state_dict.values())
    _check_numbers(folded, reference_model, frames)


def test_second_run_changes_nothing(tmp_path):
    _, base, _, path = _setup(tmp_path, 2)
    folded, _ = _fold(adapt(base, path))
    _, records = run_passes(folded, FoldLinearAdaptersPass())
    assert records[0].modified is False and records[0].stats["folded_input_side"] == 0


def test_folding_on_the_wrong_side_is_caught(tmp_path, monkeypatch):
    """Mutation: fold the out-projection's adapter as if it came before it (W·M instead of M·W)."""
    import peftc.methods.zeroi2v.fold as fold
    from peftc.methods.zeroi2v.ops import fold_input, fold_output

    def wrong_side(weight, bias, matrix, offset):
        if weight.shape[0] == weight.shape[1]:  # attn.proj, square
            return fold_input(weight, bias, matrix, offset)
        return fold_output(weight, bias, matrix, offset)

    monkeypatch.setattr(fold, "fold_output", wrong_side)
    _, base, reference_model, path = _setup(tmp_path, 2)
    folded, _ = _fold(adapt(base, path))
    with pytest.raises(AssertionError, match="relative error"):
        _check_numbers(folded, reference_model, 2, batches=(2,), seeds=(0,))


def test_shift_in_the_wrong_direction_is_caught(tmp_path):
    frames = 2
    _, base, reference_model, path = _setup(tmp_path, frames)
    adapter = load_adapter(path, ir.module_table(base))
    reversed_sites = tuple(
        dataclasses.replace(
            s, scalars={**s.scalars, "spans": [-v if i % 3 == 2 else v for i, v in enumerate(s.scalars["spans"])]}
        )
        if s.op == "temporal_shift"
        else s
        for s in adapter.sites
    )
    wrong = dataclasses.replace(adapter, sites=reversed_sites)
    reference = PassManager(pipelines.adapt([wrong])).run(base, PassContext())[0]
    with pytest.raises(AssertionError, match="relative error"):
        _check_numbers(reference, reference_model, frames, batches=(2,), seeds=(0,))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.lin(x))
        return self.out(h) + h


def test_adapter_without_a_projection_beside_it_is_kept_with_the_reason(tmp_path):
    model = rm.seeded(Residual)
    base = export(model, parse_inputs(["x:batch,6:float32"]))
    g = torch.Generator().manual_seed(0)
    tensors = {
        "down_weight": torch.randn(3, 6, generator=g),
        "down_bias": None,
        "up_weight": torch.randn(6, 3, generator=g),
        "up_bias": torch.randn(6, generator=g),
    }
    site_tensors = {k: AdapterTensor(k, v) if v is not None else None for k, v in tensors.items()}
    site = Site("act", "linear_adapter", site_tensors, {"scale": 0.5, "residual": True}, position="output")
    source = AdapterSource("a", Path(tmp_path), Path(tmp_path), Path(tmp_path), {"peft_type": "ZEROI2V"}, {}, {})
    reference = PassManager(pipelines.adapt([Adapter("a", "zeroi2v", source, (site,))])).run(base, PassContext())[0]
    kept, records = _fold(reference)
    assert records[0].stats["kept"] == 1 and records[0].modified is False
    [note] = records[0].diagnostics
    assert note.site == "act" and "no projection after it (it is read by aten.add" in note.message
    assert "nor before it (it is produced by aten.relu, not by a Linear)" in note.message
    x = torch.randn(4, 6)
    with torch.no_grad():
        h = model.act(model.lin(x))
        h = h + 0.5 * (h @ tensors["down_weight"].T @ tensors["up_weight"].T + tensors["up_bias"])
        expected = model.out(h) + h
    assert_outputs_close({"output": kept.module()(x=x)}, {"output": expected})


class ClipBlock(nn.Module):
    """The official ZeroI2V block's frozen part (CLIP: nn.MultiheadAttention, mlp.c_fc/c_proj),
    with its adapters applied where ``ResidualAttentionBlock_ZeroI2V.forward`` applies them."""

    def __init__(self, adapters: dict | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)
        self.ln_1, self.ln_2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(16, 32))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(32, 16))
        self.adapters = nn.ModuleDict(adapters or {})

    def _adapter(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.adapters[name](x) if name in self.adapters else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [tokens, batch, 16], as CLIP's transformer
        h = self._adapter("T_Adapter_in", self.ln_1(x))
        x = x + self._adapter("S_Adapter", self.attn(h, h, h, need_weights=False)[0])
        return x + self._adapter("MLP_Adapter_out", self.mlp(self._adapter("MLP_Adapter", self.ln_2(x))))


class Clip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(ClipBlock())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.resblocks(x)


def test_clip_blocks_with_multihead_attention_fold(tmp_path):
    model = rm.seeded(Clip)
    base = export(model, parse_inputs(["x:tokens,batch,16:float32"]))
    torch.manual_seed(3)
    adapters = {name: rm.LinearAdapter(16, 4, scale=0.5).eval() for name in rm.PLACEMENT_NAMES}
    for adapter in adapters.values():
        nn.init.normal_(adapter.D_fc2.weight, 0, 0.3)
    tensors = {
        f"transformer.resblocks.0.{name}.{key}": value
        for name, adapter in adapters.items()
        for key, value in adapter.state_dict().items()
    }
    path = rm.write_native(tmp_path / "clip", {"peft_type": "ZEROI2V", "scale": 0.5}, tensors)
    sites = {(s.module, s.position) for s in load_adapter(path, ir.module_table(base)).sites}
    block = "transformer.resblocks.0"
    assert sites == {(f"{block}.attn", "input"), (f"{block}.attn", "output"), (f"{block}.mlp.c_fc", "input")} | {
        (f"{block}.mlp.c_proj", "output")
    }
    folded, records = _fold(adapt(base, path))
    assert records[0].stats == {"folded_input_side": 2, "folded_output_side": 2, "kept": 0, "untied": 0}
    reference = rm.seeded(Clip)
    reference.transformer.resblocks[0].adapters = nn.ModuleDict(adapters)
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(x)
        assert float((expected - model(x)).abs().max() / expected.abs().max()) > 0.05
        assert_outputs_close({"output": folded.module()(x=x)}, {"output": expected})


@pytest.mark.parametrize("order", ["ssf-first", "zeroi2v-first"])
def test_stacked_with_ssf_on_the_same_activation(tmp_path, order):
    """SSF after norm1 and a ZeroI2V adapter before qkv both act on norm1's output: x → SSF → adapter."""
    model, base = rm.exported("vit")
    ssf = rm.write_native(tmp_path / "ssf", {"peft_type": "SSF"}, rm.native_ssf(model, {"blocks.0.norm1": 48}))
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(8, 48, generator=g) / 7, torch.randn(48, 8, generator=g) / 3
    tensors = {"blocks.0.attn.qkv.zeroi2v_in.down.weight": down, "blocks.0.attn.qkv.zeroi2v_in.up.weight": up}
    zeroi2v = rm.write_native(tmp_path / "z", {"peft_type": "ZEROI2V", "scale": 0.5}, tensors)
    reference = adapt(base, *((ssf, zeroi2v) if order == "ssf-first" else (zeroi2v, ssf)))
    folded, _ = run_passes(reference, *pipelines.optimize(merge=True))
    assert ir.text(folded) == ir.text(base)
    expected_model = rm.native_ssf_reference(model, rm.native_ssf(model, {"blocks.0.norm1": 48}))
    qkv = expected_model.blocks[0].attn.qkv
    qkv.register_forward_pre_hook(lambda m, args: (args[0] + 0.5 * (args[0] @ down.T @ up.T),))
    x = rm.images(2, seed=7)
    with torch.no_grad():
        expected = {"output": expected_model(x)}
    for program in (reference, folded):
        assert_outputs_close({"output": program.module()(x=x)}, expected)
