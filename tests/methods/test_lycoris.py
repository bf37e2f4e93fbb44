"""LoHa and LoKr: site ops against PEFT's own layers, parsers against PEFT's files, refusals, mutations.

The op checks take every factor from a PEFT model built with random (non-zero) factors and compare,
in fp32, the op's ΔW with PEFT's ``get_delta_weight``, the op's ``W'`` with the weight PEFT writes
on ``merge_and_unload()``, and each adapted module's output on ``W'`` with PEFT's unmerged forward.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from safetensors.torch import load_file, save_file
from torch import nn

import peftc
import peftc.methods.loha as loha_ops
import peftc.methods.lokr as lokr_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import loha, lokr
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines


class ConvStack(nn.Module):
    """Every layer type PEFT's LyCORIS methods adapt: k×k, grouped+dilated and 1×1 Conv2d, Conv1d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3)
        self.pw = nn.Conv2d(6, 36, 1)
        self.c1 = nn.Conv1d(36, 12, 3, padding=1, stride=2)
        self.lin = nn.Linear(12, 10)
        self.head = nn.Linear(10, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.relu(self.grouped(h))
        h = torch.relu(self.pw(h))
        h = torch.relu(self.c1(h.flatten(2)))
        return self.head(torch.tanh(self.lin(h.mean(-1))))


INPUTS = ["x:batch,4,6,6:float32"]
TARGETS = ["conv", "grouped", "pw", "c1", "lin", "head"]


def conv_stack() -> nn.Module:
    torch.manual_seed(0)
    return ConvStack().eval().requires_grad_(False)


def _config(method: str, **kwargs):
    from peft import LoHaConfig, LoKrConfig

    return (LoHaConfig if method == "loha" else LoKrConfig)(target_modules=TARGETS, **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _example(layer: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 7, 7, generator=g)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 9, generator=g)
    return torch.randn(3, layer.in_features, generator=g)


LOHA_CONFIGS = [
    pytest.param({"r": 2, "alpha": 3}, id="flat"),
    pytest.param({"r": 3, "alpha": 5, "use_effective_conv2d": True}, id="effective-conv"),
    pytest.param(
        {
            "r": 2,
            "alpha": 4,
            "use_effective_conv2d": True,
            "rank_pattern": {"conv": 4, "lin": 1},
            "alpha_pattern": {"c1": 7},
        },
        id="patterns",
    ),
]
LOKR_CONFIGS = [
    # (config, factor forms that must occur somewhere in the model)
    pytest.param({"r": 1, "alpha": 2}, {"lokr_w1", "lokr_w2_a"}, id="low-rank-w2"),
    pytest.param({"r": 8, "alpha": 3}, {"lokr_w1", "lokr_w2"}, id="full-w2"),
    pytest.param({"r": 1, "alpha": 2, "decompose_both": True}, {"lokr_w1_a", "lokr_w2_a"}, id="decompose-both"),
    pytest.param({"r": 2, "alpha": 2, "decompose_factor": 2}, {"lokr_w1", "lokr_w2"}, id="factor-2"),
    pytest.param(
        {"r": 2, "alpha": 3, "use_effective_conv2d": True, "decompose_both": True}, {"lokr_t2", "lokr_w1_a"}, id="cp"
    ),
    pytest.param(
        {
            "r": 2,
            "decompose_factor": 4,
            "use_effective_conv2d": True,
            "rank_pattern": {"head": 1, "conv": 1},
            "alpha_pattern": {"grouped": 5},
        },
        {"lokr_t2", "lokr_w2"},
        id="patterns",
    ),
]


def _check_against_peft_layers(method: str, config: dict) -> set[str]:
    """Compare the op with every adapted layer of a PEFT model; return the factor roles seen."""
    from peft import get_peft_model

    op, ops_module, parser = (
        (loha_ops.LOHA_WEIGHT, loha_ops, loha) if method == "loha" else (lokr_ops.LOKR_WEIGHT, lokr_ops, lokr)
    )
    torch.manual_seed(1)
    peft_model = get_peft_model(conv_stack(), _config(method, init_weights=False, **config))
    with torch.no_grad():  # Kaiming-initialised factors barely move some outputs; these clearly do
        for name, param in peft_model.named_parameters():
            if name.rpartition(".")[0].rpartition(".")[2].startswith(("hada_", "lokr_")):
                param.copy_(torch.randn_like(param) * 0.5)
    cfg = peft_model.peft_config["default"].to_dict()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    seen: set[str] = set()
    for name in TARGETS:
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        tensors = [getattr(layer, role).get("default") for role in op.tensor_roles]
        present = {role: tuple(t.shape) for role, t in zip(op.tensor_roles, tensors, strict=True) if t is not None}
        seen |= set(present)
        r = layer.r["default"]
        assert parser.expected_shapes(cfg, tuple(base.weight.shape), r) == present, name
        scale = layer.scaling["default"]
        assert scale == pytest.approx(layer.alpha["default"] / r)
        with torch.no_grad():
            w = base.weight
            delta = ops_module.delta_weight(*tensors, scale, w.shape)
            assert _rel(delta, layer.get_delta_weight("default")) < 1e-6, name
            adapted = op.overload(w, *tensors, scale)
            assert adapted.dtype == w.dtype
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = _example(base)
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"
    return seen


@pytest.mark.parametrize("config", LOHA_CONFIGS)
def test_loha_op_matches_peft_layers(config):
    seen = _check_against_peft_layers("loha", config)
    assert ("hada_t1" in seen) == bool(config.get("use_effective_conv2d"))


@pytest.mark.parametrize(("config", "forms"), LOKR_CONFIGS)
def test_lokr_op_matches_peft_layers(config, forms):
    assert forms <= _check_against_peft_layers("lokr", config)


def test_lokr_rank_one_cp_factor_is_an_ordinary_kronecker_product():
    """PEFT's own merge fails here (torch.kron cannot view einsum's rank-1 output); the op does not."""
    w1, t2, w2_a, w2_b = torch.randn(2, 2), torch.randn(1, 1, 3, 1), torch.randn(1, 3), torch.randn(1, 4)
    delta = lokr_ops.delta_weight(w1, None, None, None, w2_a, w2_b, t2, 0.5, (6, 8, 3))
    w2 = t2[0, 0, :, 0][None, None, :] * w2_a[0][:, None, None] * w2_b[0][None, :, None]  # [3, 4, k]
    expected = 0.5 * w1[:, None, :, None, None] * w2[None, :, None, :, :]
    torch.testing.assert_close(delta, expected.reshape(6, 8, 3))


def test_lokr_full_conv1d_factor_is_reshaped_as_peft_does():
    """A 3-D Conv1d W2 meets a 2-D W1 in ``kron``; the result is not a plain Kronecker kernel."""
    w1, w2 = torch.randn(2, 2), torch.randn(3, 4, 3)
    delta = lokr_ops.delta_weight(w1, None, None, w2, None, None, None, 1.0, (6, 8, 3))
    assert torch.equal(delta, torch.kron(w1, w2).reshape(6, 8, 3))
    plain = torch.kron(w1[:, :, None], w2)  # what a per-tap Kronecker product would give
    assert not torch.allclose(delta, plain)


@pytest.mark.parametrize("factor", [-1, 0, 1, 2, 3, 4, 5, 8, 16, 100])
def test_factorization_matches_peft(factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 130):
        assert lokr.factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


def test_ops_export_to_onnx_and_match_eager(tmp_path):
    import onnxruntime as ort

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.kernel = nn.Parameter(torch.randn(6, 4, 3, 3, generator=g))
            self.k1d = nn.Parameter(torch.randn(6, 4, 3, generator=g))
            self.factors = nn.ParameterList(
                [nn.Parameter(torch.randn(s, generator=g)) for s in ((2, 6), (2, 4), (2, 2, 3, 3), (2, 2), (3, 2, 3))]
            )

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a, b, t, w1, w2 = self.factors
            kernel = torch.ops.peftc.loha_weight(self.kernel, a, b, a * 0.5, b, t, t * 2, 1.5)
            k1d = torch.ops.peftc.lokr_weight(self.k1d, w1, None, None, w2, None, None, None, 0.7)
            return nn.functional.conv2d(x, kernel), nn.functional.conv1d(y, k1d)

    module = Adapted().eval()
    args = (torch.randn(2, 4, 7, 7), torch.randn(2, 4, 9))
    onnx_program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False)
    onnx_program.save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})
    with torch.no_grad():
        expected = module(*args)
    for g, e in zip(got, expected, strict=True):
        assert _rel(torch.from_numpy(g), e) < 1e-5


# --------------------------------------------------------------------------------------------
# parsers, end to end against PEFT


def _adapter(tmp_path: Path, method: str, **config) -> Path:
    return models.make_adapter(conv_stack(), tmp_path / f"{method}-adapter", _config(method, **config))


def _table():
    return ir.module_table(export(conv_stack(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("loha", {"r": 2, "alpha": 3}),
        ("loha", {"r": 3, "alpha": 5, "use_effective_conv2d": True, "rank_pattern": {"lin": 2}}),
        ("lokr", {"r": 2, "alpha": 2, "decompose_both": True, "use_effective_conv2d": True}),
        ("lokr", {"r": 8, "alpha": 3, "alpha_pattern": {"c1": 5}}),
    ],
    ids=["loha", "loha-effective", "lokr-cp", "lokr-full"],
)
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_compiled_program_matches_peft(tmp_path, method, config, merge):
    from peft import PeftModel

    path = _adapter(tmp_path, method, **config)
    signature = parse_inputs(INPUTS)
    program = export(conv_stack(), signature)
    parsed = load_adapter(path, ir.module_table(program))
    peft_model = PeftModel.from_pretrained(conv_stack(), str(path))
    scalings = {
        n: m.scaling["default"] for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "scaling")
    }
    assert {s.module: s.scalars["scale"] for s in parsed.sites} == pytest.approx(scalings)
    used = {t.key for s in parsed.sites for t in s.tensors.values() if t}
    assert used == set(load_file(path / "adapter_model.safetensors")) and not parsed.unused

    reference = adapt(program, path)
    final, _ = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
    for batch in (1, 3):
        inputs = signature.example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(conv_stack(), path, inputs)
        assert_outputs_close(eager(final, inputs), expected)
        assert_outputs_close(eager(reference, inputs), expected)


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def loha_adapter(tmp_path_factory) -> Path:
    return _adapter(tmp_path_factory.mktemp("loha"), "loha", r=2, alpha=3, use_effective_conv2d=True)


def test_wrong_shape_names_key_module_and_shapes(tmp_path, loha_adapter):
    bad = edited_adapter(loha_adapter, tmp_path / "bad", tensors={"base_model.model.lin.hada_w1_b": torch.zeros(2, 7)})
    with pytest.raises(
        InputError, match=r"lin\.hada_w1_b: shape \[2, 7\] .* expected \[2, 12\] for 'lin' \(weight \[10, 12\]"
    ):
        load_adapter(bad, _table())


def test_a_factor_peft_would_not_create_is_refused(tmp_path, loha_adapter):
    bad = edited_adapter(loha_adapter, tmp_path / "bad", config={"use_effective_conv2d": False})
    with pytest.raises(
        InputError,
        match=r"c1\.hada_t\d: PEFT creates no hada_t\d for Conv1d 'c1' .* it creates hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b",
    ):
        load_adapter(bad, _table())


def test_a_missing_factor_is_refused(tmp_path, loha_adapter):
    bad = edited_adapter(loha_adapter, tmp_path / "bad", tensors={"base_model.model.head.hada_w2_b": None})
    with pytest.raises(InputError, match=r"module 'head' has no hada_w2_b"):
        load_adapter(bad, _table())


def test_unknown_config_field_is_refused(tmp_path, loha_adapter):
    bad = edited_adapter(loha_adapter, tmp_path / "bad", config={"use_magic": True})
    with pytest.raises(UnsupportedError, match=r"fields peftc does not know .*use_magic=True"):
        load_adapter(bad, _table())


def test_train_only_fields_are_recorded(tmp_path):
    path = _adapter(tmp_path, "lokr", r=2, rank_dropout=0.3, module_dropout=0.2, rank_dropout_scale=True)
    parsed = load_adapter(path, _table())
    assert {"rank_dropout", "module_dropout", "rank_dropout_scale", "init_weights"} <= set(parsed.ignored)
    assert parsed.honoured["decompose_factor"] == -1


class Volumetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_unsupported_layer_type_names_module_and_type(tmp_path):
    path = tmp_path / "conv3d"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "target_modules": ["conv"], "r": 2}))
    save_file({"base_model.model.conv.lokr_w1": torch.ones(1, 2)}, path / "adapter_model.safetensors")
    table = ir.module_table(export(Volumetric().eval(), parse_inputs(["x:batch,2,4,4,4:float32"])))
    with pytest.raises(UnsupportedError, match=r"LoKr on Conv3d \(module 'conv'\) is not supported"):
        load_adapter(path, table)


@pytest.mark.parametrize("peft_type", ["LOHA", "LOKR"])
def test_gpt2_conv1d_is_refused_by_peft_and_peftc(tmp_path, gpt2_program, peft_type):
    """The matrix's reason for GPT-2: PEFT cannot build the adapter, and peftc refuses a hand-made one."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    config = (LoHaConfig if peft_type == "LOHA" else LoKrConfig)(target_modules=["c_attn"])
    with pytest.raises(TypeError, match="Conv1D'> not supported"):
        get_peft_model(models.tiny_gpt2(), config)
    path = tmp_path / "a"
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": peft_type, "target_modules": ["h.0.attn.c_attn"]})
    )
    key = "base_model.model.h.0.attn.c_attn." + ("hada_w1_a" if peft_type == "LOHA" else "lokr_w1")
    save_file({key: torch.ones(1)}, path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"on Conv1D \(module 'h.0.attn.c_attn'\) is not supported"):
        load_adapter(path, ir.module_table(gpt2_program))


class Reflecting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_padding_mode_is_refused(tmp_path):
    from peft import LoHaConfig

    model = Reflecting().eval()
    path = models.make_adapter(model, tmp_path / "a", LoHaConfig(target_modules=["conv"], r=2))
    table = ir.module_table(export(model, parse_inputs(["x:batch,2,5,5:float32"])))
    with pytest.raises(UnsupportedError, match=r"LoHa on Conv2d 'conv', whose padding_mode is not 'zeros'"):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_dropped_loha_scale_fails_verification(tmp_path, loha_adapter, monkeypatch):
    assert peftc.compile(conv_stack(), loha_adapter, out=tmp_path / "ok", inputs=INPUTS).manifest.status == "ok"
    real = loha_ops.delta_weight
    monkeypatch.setattr(loha_ops, "delta_weight", lambda *a: real(*a[:6], 1.0, a[7]))
    with pytest.raises(VerificationError, match="verification failed: output .* vs peft"):
        peftc.compile(conv_stack(), loha_adapter, out=tmp_path / "out", inputs=INPUTS)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_mutation_swapped_kronecker_factors_fail_verification(tmp_path, monkeypatch):
    from peft import LoKrConfig

    # lin0 is 16 → 32 and r ≥ max(b, d)/2, so both factors are full (W1 [4, 4], W2 [8, 4]) and
    # kron(W2, W1) has the shape of kron(W1, W2): only verification can tell them apart.
    model = models.mlp()
    path = models.make_adapter(model, tmp_path / "a", LoKrConfig(target_modules=["lin0"], r=4, alpha=2))
    assert load_file(path / "adapter_model.safetensors")["base_model.model.lin0.lokr_w2"].shape == (8, 4)
    assert peftc.compile(model, path, out=tmp_path / "ok", inputs=models.MLP_INPUTS).manifest.status == "ok"
    real = lokr_ops.delta_weight
    monkeypatch.setattr(lokr_ops, "delta_weight", lambda w1, a1, b1, w2, *rest: real(w2, a1, b1, w1, *rest))
    with pytest.raises(VerificationError, match="verification failed: output .* vs peft"):
        peftc.compile(model, path, out=tmp_path / "out", inputs=models.MLP_INPUTS)
    assert not (tmp_path / "out").exists()
