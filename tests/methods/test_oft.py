"""OFT: the ``oft_weight`` op against PEFT's own layers, the parser's refusals, and a broken formula caught.

Numerics: PEFT builds OFT on a Linear, a 1×1 Conv2d (strided, padded) and an Embedding; every
rotation parameter is drawn far from zero; the op's ``W'`` must equal the weight PEFT's ``merge()``
writes and reproduce PEFT's unmerged forward, both within 1e-6 of the largest value.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import models
import pytest
import torch
import torch.nn.functional as F
from conftest import edited_adapter, export
from safetensors.torch import save_file

import peftc
from peftc import ir
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import oft as oft_parser
from peftc.methods.common import COMMON_IGNORED
from peftc.methods.loading import load_adapter

TOL = 1e-6


class Layers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(24, 10)
        self.pointwise = torch.nn.Conv2d(16, 6, 1, stride=2, padding=1)
        self.emb = torch.nn.Embedding(11, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # only for PEFT's model wrapper
        return self.lin(x)


def _peft_layers(seed: int = 0, **config):
    from peft import OFTConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Layers(), OFTConfig(target_modules=["lin", "pointwise", "emb"], **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model.base_model.model


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


CONFIGS = {
    "neumann-5": {"oft_block_size": 4},
    "neumann-2": {"oft_block_size": 4, "num_cayley_neumann_terms": 2},
    "neumann-3": {"oft_block_size": 4, "num_cayley_neumann_terms": 3},
    "neumann-8": {"oft_block_size": 4, "num_cayley_neumann_terms": 8},
    "cayley-r": {"oft_block_size": 0, "r": 2, "use_cayley_neumann": False},
    "cayley-block6": {"oft_block_size": 6, "use_cayley_neumann": False},
    "block-share": {"oft_block_size": 6, "block_share": True},
    "block-share-cayley": {"oft_block_size": 4, "block_share": True, "use_cayley_neumann": False},
    "coft": {"oft_block_size": 4, "coft": True, "eps": 0.3, "use_cayley_neumann": False},
    "coft-share-neumann": {"oft_block_size": 4, "coft": True, "eps": 0.2, "block_share": True},
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_op_matches_peft_merge_and_forward(config):
    layers = _peft_layers(**config)
    inputs = {"lin": torch.randn(3, 24), "pointwise": torch.randn(2, 16, 5, 5), "emb": torch.tensor([[0, 3, 10, 7]])}
    for name, layout in [("lin", "linear"), ("pointwise", "conv"), ("emb", "embedding")]:
        layer = getattr(layers, name)
        rotation = (layer.oft_embedding_R if name == "emb" else layer.oft_R)["default"]
        base = layer.get_base_layer()
        w = base.weight.detach().clone()
        q = rotation.weight.detach().clone()  # before PEFT's coft writes its projection back
        got = torch.ops.peftc.oft_weight(
            w, q, rotation.block_size, rotation.use_cayley_neumann, rotation.num_cayley_neumann_terms,
            rotation.coft, rotation.eps, layout,
        )  # fmt: skip
        assert _rel(got, w) > 0.05, "the rotation barely moves the weight: the test would be vacuous"
        x = inputs[name]
        with torch.no_grad():
            unmerged = layer(x)
            layer.merge()
        assert _rel(got, base.weight.detach()) < TOL, f"{name}: W' differs from PEFT's merge()"
        if layout == "linear":
            ours = F.linear(x, got, base.bias)
        elif layout == "conv":
            ours = F.conv2d(x, got, base.bias, stride=2, padding=1)
        else:
            ours = F.embedding(x, got)
        assert _rel(ours, unmerged) < TOL, f"{name}: output differs from PEFT's unmerged forward"


def test_exact_cayley_is_orthogonal_and_exports_to_onnx(tmp_path):
    """The unrolled elimination is the exact inverse, and the op runs in onnxruntime unchanged."""
    import onnxruntime

    from peftc.methods.oft import cayley, skew_from_upper

    s = skew_from_upper(torch.randn(5, 28, dtype=torch.float64), 8)
    r = cayley(s)
    torch.testing.assert_close(r @ r.transpose(1, 2), torch.eye(8, dtype=torch.float64).expand(5, 8, 8))
    expected = torch.linalg.solve(torch.eye(8) + s, torch.eye(8) - s)
    torch.testing.assert_close(r, expected)

    class Rotated(torch.nn.Module):
        def __init__(self, neumann: bool) -> None:
            super().__init__()
            self.neumann = neumann
            self.w = torch.nn.Parameter(torch.randn(10, 16))
            self.q = torch.nn.Parameter(torch.randn(4, 6) * 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch.ops.peftc.oft_weight(self.w, self.q, 4, self.neumann, 5, True, 0.5, "linear")
            return x @ w.T

    x = torch.randn(3, 16)
    for neumann in (False, True):
        module = Rotated(neumann)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(torch.export.export(module, (x,)), dynamo=True, verbose=False)
        path = tmp_path / f"oft-{neumann}.onnx"
        onnx_program.save(str(path))
        session = onnxruntime.InferenceSession(str(path))
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert _rel(got, module(x).detach()) < TOL


@pytest.mark.parametrize(("inputs", "given"), [(24, 5), (24, 7), (16, 9), (12, 40), (27, 4)])
@pytest.mark.parametrize("field", ["oft_block_size", "r"])
def test_block_size_fitting_matches_peft(inputs, given, field):
    from peft import OFTConfig, get_peft_model

    config = {"oft_block_size": given} if field == "oft_block_size" else {"oft_block_size": 0, "r": given}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = get_peft_model(
            torch.nn.Sequential(torch.nn.Linear(inputs, 3)), OFTConfig(target_modules=["0"], **config)
        )
    layer = layer.base_model.model[0]
    blocks, size = oft_parser.fit_blocks(_Source(), "m", inputs, config.get("r", 0), config["oft_block_size"], [])
    assert (blocks, size) == (layer.r["default"], layer.oft_block_size["default"])


class _Source:
    config_path = Path("adapter_config.json")


def test_every_peft_config_field_is_classified():
    import dataclasses

    from peft import OFTConfig

    fields = oft_parser.FIELDS
    known = {*fields.honoured, *fields.ignored, *fields.unsupported, *COMMON_IGNORED}
    assert {f.name for f in dataclasses.fields(OFTConfig)} <= known


# --------------------------------------------------------------------------------------------
# parser refusals


@pytest.fixture(scope="module")
def bert_oft(tmp_path_factory) -> Path:
    from peft import OFTConfig

    config = OFTConfig(target_modules=["query", "value"], oft_block_size=8)
    return models.make_adapter(models.tiny_bert(), tmp_path_factory.mktemp("oft") / "bert", config)


def test_parses_sites_with_peft_block_layout(bert_oft, bert_table):
    adapter = load_adapter(bert_oft, bert_table)
    assert {s.op for s in adapter.sites} == {"oft_weight"} and len(adapter.sites) == 4
    assert all(s.scalars["block_size"] == 8 and s.scalars["cayley_neumann"] for s in adapter.sites)
    assert not adapter.unused and not adapter.warnings


def test_wrong_tensor_shape_names_key_and_shapes(bert_oft, bert_table, tmp_path):
    key = "base_model.model.encoder.layer.0.attention.self.query.oft_R.weight"
    broken = edited_adapter(bert_oft, tmp_path / "a", tensors=lambda w: {**w, key: w[key][:, :21].contiguous()})
    with pytest.raises(InputError, match=rf"{key}: shape \[4, 21\] does not match .* expected \[4, 28\]"):
        load_adapter(broken, bert_table)


def test_block_size_that_disagrees_with_the_file_is_refused(bert_oft, bert_table, tmp_path):
    broken = edited_adapter(bert_oft, tmp_path / "a", config={"oft_block_size": 4})
    with pytest.raises(InputError, match=r"shape \[4, 28\] does not match .* expected \[8, 6\]"):
        load_adapter(broken, bert_table)


def test_rotation_key_of_the_wrong_layer_kind_is_refused(bert_oft, bert_table, tmp_path):
    old = "base_model.model.encoder.layer.0.attention.self.query.oft_R.weight"
    new = old.replace("oft_R", "oft_embedding_R")
    broken = edited_adapter(
        bert_oft, tmp_path / "a", tensors=lambda w: {**{k: v for k, v in w.items() if k != old}, new: w[old]}
    )
    with pytest.raises(InputError, match=r"keeps its OFT rotation in oft_R"):
        load_adapter(broken, bert_table)


def test_unknown_config_field_is_refused(bert_oft, bert_table, tmp_path):
    broken = edited_adapter(bert_oft, tmp_path / "a", config={"use_householder": True})
    with pytest.raises(UnsupportedError, match=r"may change the math: use_householder=True"):
        load_adapter(broken, bert_table)


def test_pre_0_14_oft_checkpoint_is_refused(bert_oft, bert_table, tmp_path):
    broken = edited_adapter(bert_oft, tmp_path / "a")
    cfg = json.loads((broken / "adapter_config.json").read_text())
    del cfg["oft_block_size"]
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match=r"no oft_block_size: .* PEFT < 0.14"):
        load_adapter(broken, bert_table)


def test_conv1d_layer_type_is_refused(tmp_path):
    program = export(models.tiny_gpt2())
    adapter = tmp_path / "a"
    adapter.mkdir()
    config = {"peft_type": "OFT", "target_modules": ["c_attn"], "oft_block_size": 4, "r": 0}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {"base_model.model.h.0.attn.c_attn.oft_R.weight": torch.zeros(8, 6)}, str(adapter / "adapter_model.safetensors")
    )
    with pytest.raises(UnsupportedError, match=r"OFT on Conv1D \(module 'h.0.attn.c_attn'\) is not supported"):
        load_adapter(adapter, ir.module_table(program))


def test_larger_convolution_is_refused(tmp_path):
    from peft import OFTConfig

    model = models.convnet()
    adapter = models.make_adapter(model, tmp_path / "a", OFTConfig(target_modules=["conv1"], oft_block_size=0, r=1))
    table = ir.module_table(export(model, parse_inputs(models.CONVNET_INPUTS)))
    with pytest.raises(UnsupportedError, match=r"'conv1' with a 3×3 kernel: PEFT's forward rotates overlapping"):
        load_adapter(adapter, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


@pytest.fixture(scope="module")
def mlp_oft(tmp_path_factory) -> Path:
    from peft import OFTConfig

    config = OFTConfig(target_modules=["lin0", "lin1"], oft_block_size=4)
    return models.make_adapter(models.mlp(), tmp_path_factory.mktemp("oft") / "mlp", config)


def test_exact_cayley_with_trained_biases_compiles_unmerged_to_a_verified_onnx_artifact(tmp_path):
    """The unrolled elimination through the whole pipeline, checked against PEFT; biases are replacements."""
    from peft import OFTConfig

    model = models.mlp()
    config = OFTConfig(
        target_modules=["lin0", "lin1"], oft_block_size=8, use_cayley_neumann=False, block_share=True, bias="oft_only"
    )
    adapter = models.make_adapter(model, tmp_path / "a", config)
    parsed = load_adapter(adapter, ir.module_table(export(model, parse_inputs(models.MLP_INPUTS))))
    assert sorted(r.param for r in parsed.replacements) == ["lin0.bias", "lin1.bias"]
    artifact = peftc.compile(model, adapter, out=tmp_path / "out", merge=False, inputs=models.MLP_INPUTS)
    verification = artifact.manifest.verification
    assert verification["passed"] and {c["oracle"] for c in verification["cases"]} == {"reference", "peft"}


def test_mutation_dropped_neumann_term_fails_verification(tmp_path, mlp_oft, monkeypatch):
    import peftc.methods.oft as op

    real = op.cayley_neumann_series
    monkeypatch.setattr(op, "cayley_neumann_series", lambda s, terms: real(s, terms - 1))
    with pytest.raises(VerificationError, match=r"verification failed: output .* vs peft"):
        peftc.compile(models.mlp(), mlp_oft, out=tmp_path / "out", inputs=models.MLP_INPUTS)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_mutation_transposed_rotation_fails_verification(tmp_path, mlp_oft, monkeypatch):
    import peftc.methods.oft as op

    real = op.rotate_columns
    monkeypatch.setattr(op, "rotate_columns", lambda m, blocks, transpose: real(m, blocks, transpose=not transpose))
    with pytest.raises(VerificationError, match=r"vs peft"):
        peftc.compile(models.mlp(), mlp_oft, out=tmp_path / "out", merge=False, inputs=models.MLP_INPUTS)
    assert not (tmp_path / "out").exists()


def test_coft_projection_is_idempotent_so_a_saved_projection_gives_peft_eval_output():
    """PEFT's coft writes its projection into the parameter on every forward; projecting again changes nothing."""
    layers = _peft_layers(oft_block_size=4, coft=True, eps=0.1)
    rotation = layers.lin.oft_R["default"]
    before = copy.deepcopy(rotation.weight.detach())
    with torch.no_grad():
        layers.lin(torch.randn(2, 24))
    after = rotation.weight.detach()
    assert not torch.equal(before, after)  # PEFT projected in place
    # The projection is idempotent, so projecting the saved (already projected) value again is a no-op.
    from peftc.methods.oft import project, skew_from_upper

    s = skew_from_upper(after, 4)
    torch.testing.assert_close(project(s, 0.1 / 6**0.5), s)
