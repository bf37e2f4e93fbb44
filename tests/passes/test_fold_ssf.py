"""fold-ssf: every SSF placement folds into its neighbour exactly; what cannot is kept and reported.

Numerics compare the folded program with ``reparam_models``'s reference (the official ``ssf_ada``
applied by wrapped modules, sharing no code with peftc) at fp32 ≤ 1e-5 relative, the bound
``peftc.verify`` uses; observed errors are ~1e-7 while SSF moves these outputs by 50–140 %.
"""

from __future__ import annotations

import pytest
import reparam_models as rm
import torch
from conftest import adapt, assert_outputs_close, export, run_passes
from safetensors.torch import save_file
from torch import nn

from peftc import ir
from peftc.loaders import parse_inputs
from peftc.methods.ssf.fold import FoldSsfPass
from peftc.passes.eliminate_dead_code import EliminateDeadCodePass


def _official(tmp_path, family):
    model, program = rm.exported(family)
    tensors = rm.ssf_tensors(model, family)
    path = tmp_path / f"{family}.safetensors"
    save_file(tensors, str(path))
    return model, program, rm.ssf_reference(model, family, tensors), adapt(program, path)


def _fold(reference):
    return run_passes(reference, FoldSsfPass(), EliminateDeadCodePass())


def _parameters(program) -> int:
    return sum(t.numel() for t in program.state_dict.values())


def _check_numbers(program, reference_model, make_inputs, shapes=(1, 3), seeds=(0, 1)):
    module = program.module()
    for batch in shapes:
        for seed in seeds:
            x = make_inputs(batch, seed=seed)
            with torch.no_grad():
                assert_outputs_close({"output": module(x=x)}, {"output": reference_model(x)})


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_every_official_placement_folds_into_the_base_graph(tmp_path, family):
    model, base, reference_model, reference = _official(tmp_path, family)
    folded, records = _fold(reference)
    sites = len(rm.ssf_places(model, family))
    assert records[0].stats == {"folded": sites, "folded_into_consumer": 0, "kept": 0, "untied": 0}
    assert ir.op_counts(reference)["peftc.ssf"] == sites and ir.op_counts(folded)["peftc.ssf"] == 0
    # no extra mul/add, same nodes, same parameters (so the same FLOPs): the base graph, new weights
    assert ir.text(folded) == ir.text(base)
    assert _parameters(folded) == _parameters(base)
    _check_numbers(folded, reference_model, rm.images)
    _check_numbers(reference, reference_model, rm.images, shapes=(2,), seeds=(3,))


def test_convnext_keeps_the_top_level_ssf_before_pooling_and_norm(tmp_path):
    model, base, reference_model, reference = _official(tmp_path, "convnext")
    folded, records = _fold(reference)
    stats = records[0].stats
    assert stats["kept"] == 1 and stats["folded"] == len(rm.ssf_places(model, "convnext")) - 1
    [note] = records[0].diagnostics
    assert note.site == "stages" and note.kind == "skipped"
    assert "no producer to fold into (it is produced by aten.add" in note.message
    assert "nor consumers (it is read by aten.adaptive_avg_pool2d" in note.message
    before, after = ir.op_counts(base), ir.op_counts(folded)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"aten.mul": 1, "aten.add": 1}
    assert _parameters(folded) == _parameters(base) + 2 * 40  # the kept scale and shift
    _check_numbers(folded, reference_model, rm.images)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    model, base = rm.exported("resnet")
    tensors = rm.native_ssf(model, {**rm.RESNET_SSF, **rm.RESNET_KEPT})
    path = rm.write_native(tmp_path_factory.mktemp("ssf") / "native", {"peft_type": "SSF"}, tensors)
    return model, base, rm.native_ssf_reference(model, tensors), adapt(base, path)


def _resnet_inputs(batch, seed=0):
    return rm.images(batch, size=6, seed=seed)


def test_conv_net_folds_into_convs_norms_and_consumers(resnet):
    _, base, reference_model, reference = resnet
    folded, records = _fold(reference)
    assert records[0].stats == {"folded": 4, "folded_into_consumer": 2, "kept": 1, "untied": 0}
    [note] = records[0].diagnostics
    assert note.site == "act"
    assert "it is produced by aten.relu" in note.message and "pads with zeros (padding=[1, 1])" in note.message
    before, after = ir.op_counts(base), ir.op_counts(folded)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"aten.mul": 1, "aten.add": 1}
    _check_numbers(folded, reference_model, _resnet_inputs)


def test_second_run_changes_nothing(resnet):
    folded, _ = _fold(resnet[3])
    _, records = run_passes(folded, FoldSsfPass())
    assert records[0].modified is False and records[0].stats["folded"] == 0


def test_folding_on_the_wrong_side_is_caught(tmp_path, monkeypatch):
    """Mutation: scale a square producer's input columns (the consumer's side) instead of its rows."""
    import peftc.methods.ssf.fold as fold_ssf
    from peftc.methods.ssf.ops import fold_after, fold_before

    def wrong_side(weight, bias, scale, shift):
        if weight.dim() == 2 and weight.shape[0] == weight.shape[1]:  # attn.proj
            return fold_before(weight, bias, scale, shift)
        return fold_after(weight, bias, scale, shift)

    monkeypatch.setattr(fold_ssf, "fold_after", wrong_side)
    _, _, reference_model, reference = _official(tmp_path, "vit")
    folded, _ = _fold(reference)
    with pytest.raises(AssertionError, match="relative error"):
        _check_numbers(folded, reference_model, rm.images, shapes=(2,), seeds=(0,))


class SharedLinear(nn.Module):
    """One bias-free Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(x)))


def test_bias_free_producer_called_twice_gets_a_bias_and_an_untied_copy(tmp_path):
    model = rm.seeded(SharedLinear)
    base = export(model, parse_inputs(["x:batch,6:float32"]))
    tensors = rm.native_ssf(model, {"lin": 6})
    reference = adapt(base, rm.write_native(tmp_path / "a", {"peft_type": "SSF"}, tensors))
    folded, records = _fold(reference)
    assert records[0].stats == {"folded": 2, "folded_into_consumer": 0, "kept": 0, "untied": 1}
    assert (
        records[0].diagnostics[0].kind == "warning" and "got its own folded copy" in records[0].diagnostics[0].message
    )
    assert sorted(folded.state_dict) == ["lin.bias", "lin.bias2", "lin.weight", "lin.weight_folded"]
    reference_model = rm.native_ssf_reference(model, tensors)
    _check_numbers(
        folded, reference_model, lambda b, seed: torch.randn(b, 6, generator=torch.Generator().manual_seed(seed))
    )
