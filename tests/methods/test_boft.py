"""BOFT: the ``boft_weight`` op against PEFT's own layers, the parser's refusals, and a broken formula caught.

PEFT builds several butterfly factors only with its CUDA block-diagonal extension; elsewhere it
silently keeps one. For ``N > 1`` the tests therefore let PEFT believe the extension loaded and give it
``torch.block_diag`` per factor in its place (what the kernel computes), so PEFT's own permutations
and factor products are the oracle.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import models
import pytest
import torch
import torch.nn.functional as F
from conftest import edited_adapter, export

import peftc
from peftc import ir
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import boft as boft_parser
from peftc.methods.common import COMMON_IGNORED
from peftc.methods.loading import load_adapter

TOL = 1e-6


class Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 10)
        self.pointwise = torch.nn.Conv2d(16, 6, 1)
        self.conv = torch.nn.Conv2d(8, 6, 2, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # only for PEFT's model wrapper
        return self.lin(x)


class _BlockDiag:
    """Stands in for PEFT's CUDA FastBlockDiag: one block-diagonal matrix per butterfly factor."""

    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])


@pytest.fixture
def butterfly(monkeypatch):
    import peft.tuners.boft.layer as layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(layer, "FastBlockDiag", _BlockDiag)


def _peft_layers(seed: int = 0, **config):
    from peft import BOFTConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Layers(), BOFTConfig(target_modules=["lin", "pointwise", "conv"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "boft_s" in name:
                p.copy_(1 + torch.randn_like(p) * 0.3)
    return model.base_model.model


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


CONFIGS = {
    "size4": ({"boft_block_size": 4}, 1),
    "num2": ({"boft_block_size": 0, "boft_block_num": 2}, 1),
    "size2-factors2": ({"boft_block_size": 2, "boft_n_butterfly_factor": 2}, 2),
    "size2-factors3": ({"boft_block_size": 2, "boft_n_butterfly_factor": 3}, 3),
    "num4-factors3": ({"boft_block_size": 0, "boft_block_num": 4, "boft_n_butterfly_factor": 3}, 3),
}


@pytest.mark.parametrize(("config", "factors"), CONFIGS.values(), ids=CONFIGS.keys())
def test_op_matches_peft_merge_and_forward(config, factors, butterfly):
    layers = _peft_layers(**config)
    inputs = {"lin": torch.randn(3, 32), "pointwise": torch.randn(2, 16, 5, 5), "conv": torch.randn(2, 8, 6, 6)}
    for name, layout in [("lin", "linear"), ("pointwise", "conv"), ("conv", "conv")]:
        layer = getattr(layers, name)
        base = layer.get_base_layer()
        w = base.weight.detach().clone()
        rotation = layer.boft_R["default"].detach()
        assert rotation.shape[0] == factors
        got = torch.ops.peftc.boft_weight(w, rotation, layer.boft_s["default"].detach(), layout)
        assert _rel(got, w) > 0.05, "the adapter barely moves the weight: the test would be vacuous"
        x = inputs[name]
        with torch.no_grad():
            unmerged = layer(x)
            layer.merge()
        assert _rel(got, base.weight.detach()) < TOL, f"{name}: W' differs from PEFT's merge()"
        if layout == "linear":
            ours = F.linear(x, got, base.bias)
        else:
            ours = F.conv2d(x, got, base.bias, stride=base.stride, padding=base.padding)
        assert _rel(ours, unmerged) < TOL, f"{name}: output differs from PEFT's unmerged forward"


@pytest.mark.parametrize(("count", "size", "factors"), [(16, 2, 4), (8, 4, 3), (4, 6, 2)])
def test_butterfly_gather_is_peft_permutation(count, size, factors):
    """The reshape form of the permutation equals PEFT's index list, and its inverse undoes it."""
    from peft.tuners.boft.layer import BOFTLayer

    from peftc.methods.boft import butterfly_gather

    n = count * size
    matrix = torch.arange(n, dtype=torch.float32).unsqueeze(0)
    for i in range(1, factors):
        perm = BOFTLayer.block_butterfly_perm(None, n, count // 2**i, size // 2, factors - 1)
        got = butterfly_gather(matrix, count // 2**i, size // 2, inverse=False)
        assert got[0].long().tolist() == perm.tolist()
        assert torch.equal(butterfly_gather(got, count // 2**i, size // 2, inverse=True), matrix)


def test_several_factors_export_to_onnx(tmp_path):
    import onnxruntime

    class Rotated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(10, 16))
            self.r = torch.nn.Parameter(torch.randn(3, 4, 4, 4) * 0.5)
            self.s = torch.nn.Parameter(1 + torch.randn(10, 1) * 0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ torch.ops.peftc.boft_weight(self.w, self.r, self.s, "linear").T

    module, x = Rotated(), torch.randn(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(torch.export.export(module, (x,)), dynamo=True, verbose=False)
    onnx_program.save(str(tmp_path / "boft.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "boft.onnx"))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert _rel(got, module(x).detach()) < TOL


def test_every_peft_config_field_is_classified():
    import dataclasses

    from peft import BOFTConfig

    fields = boft_parser.FIELDS
    known = {*fields.honoured, *fields.ignored, *fields.unsupported, *COMMON_IGNORED}
    assert {f.name for f in dataclasses.fields(BOFTConfig)} <= known


# --------------------------------------------------------------------------------------------
# parser


@pytest.fixture(scope="module")
def bert_boft(tmp_path_factory) -> Path:
    from peft import BOFTConfig

    config = BOFTConfig(target_modules=["query", "value"], boft_block_size=4, boft_n_butterfly_factor=2)
    return models.make_adapter(models.tiny_bert(), tmp_path_factory.mktemp("boft") / "bert", config)


def test_single_factor_file_with_more_configured_is_read_with_a_warning(bert_boft, bert_table):
    """PEFT without its CUDA extension saves one factor beside boft_n_butterfly_factor=2."""
    adapter = load_adapter(bert_boft, bert_table)
    assert len(adapter.sites) == 4 and {s.op for s in adapter.sites} == {"boft_weight"}
    assert all(s.info["butterfly_factors"] == 1 for s in adapter.sites)
    assert len(adapter.warnings) == 4 and "holds one factor" in adapter.warnings[0]


def test_several_factors_in_the_file_are_honoured(bert_boft, bert_table, tmp_path):
    def two_factors(weights):
        return {k: (torch.cat([v, v.flip(1)]) if k.endswith("boft_R") else v) for k, v in weights.items()}

    adapter = load_adapter(edited_adapter(bert_boft, tmp_path / "a", tensors=two_factors), bert_table)
    assert all(s.info["butterfly_factors"] == 2 for s in adapter.sites) and not adapter.warnings


def test_wrong_rotation_shape_names_key_and_shapes(bert_boft, bert_table, tmp_path):
    key = "base_model.model.encoder.layer.1.attention.self.value.boft_R"
    broken = edited_adapter(bert_boft, tmp_path / "a", tensors=lambda w: {**w, key: w[key][:, :4].contiguous()})
    with pytest.raises(InputError, match=rf"{key}: shape \[1, 4, 4, 4\] does not match .* expected \[1, 8, 4, 4\]"):
        load_adapter(broken, bert_table)


def test_wrong_scale_shape_names_key_and_shapes(bert_boft, bert_table, tmp_path):
    key = "base_model.model.encoder.layer.0.attention.self.query.boft_s"
    broken = edited_adapter(bert_boft, tmp_path / "a", tensors=lambda w: {**w, key: w[key].T.contiguous()})
    with pytest.raises(InputError, match=rf"{key}: shape \[1, 32\] does not match .* expected .*\[32, 1\]"):
        load_adapter(broken, bert_table)


def test_block_size_that_does_not_divide_is_refused(bert_boft, bert_table, tmp_path):
    broken = edited_adapter(bert_boft, tmp_path / "a", config={"boft_block_size": 5})
    with pytest.raises(InputError, match=r"boft_block_size=5 does not divide the 32 inputs of"):
        load_adapter(broken, bert_table)


def test_unknown_config_field_is_refused(bert_boft, bert_table, tmp_path):
    broken = edited_adapter(bert_boft, tmp_path / "a", config={"boft_scale_mode": "log"})
    with pytest.raises(UnsupportedError, match=r"may change the math: boft_scale_mode='log'"):
        load_adapter(broken, bert_table)


def test_embedding_layer_type_is_refused(bert_boft, bert_table, tmp_path):
    broken = edited_adapter(bert_boft, tmp_path / "a", config={"target_modules": ["query", "value", "word_embeddings"]})
    with pytest.raises(UnsupportedError, match=r"BOFT on Embedding \(module 'embeddings.word_embeddings'\)"):
        load_adapter(broken, bert_table)


def test_convolution_peft_runs_differently_from_its_merge_is_refused(tmp_path):
    """PEFT's BOFT forward passes only stride[0] and padding[0] to conv2d."""

    class Uneven(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, stride=(1, 2), padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    from peft import BOFTConfig

    model = models._seeded(Uneven)
    adapter = models.make_adapter(model, tmp_path / "a", BOFTConfig(target_modules=["conv"], boft_block_size=4))
    table = ir.module_table(export(model, parse_inputs(["x:batch,4,8,8:float32"])))
    with pytest.raises(UnsupportedError, match=r"stride=\(1, 2\).*stride\[0\] and padding\[0\] only"):
        load_adapter(adapter, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


@pytest.fixture(scope="module")
def mlp_boft(tmp_path_factory) -> Path:
    from peft import BOFTConfig

    config = BOFTConfig(target_modules=["lin0", "lin1"], boft_block_size=4)
    return models.make_adapter(models.mlp(), tmp_path_factory.mktemp("boft") / "mlp", config)


def test_mutation_transposed_rotation_fails_verification(tmp_path, mlp_boft, monkeypatch):
    import peftc.methods.boft as op

    real = op.rotate_columns
    monkeypatch.setattr(op, "rotate_columns", lambda m, blocks, transpose: real(m, blocks, transpose=not transpose))
    with pytest.raises(VerificationError, match=r"verification failed: output .* vs peft"):
        peftc.compile(models.mlp(), mlp_boft, out=tmp_path / "out", inputs=models.MLP_INPUTS)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))
