"""VeRA: the site op against PEFT's own layers, the parser against PEFT's files (projections saved
or redrawn), refusals, and a mutation that verification must catch."""

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
from transformers.pytorch_utils import Conv1D

import peftc
import peftc.methods.vera as vera_ops
from peftc import ir
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.methods.vera import VERA_WEIGHT
from peftc.passes import PassContext, PassManager, pipelines


class Mixed(nn.Module):
    """``nn.Linear`` and GPT-2 ``Conv1D`` targets of different sizes, so each slices the shared projections."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 20)
        self.mid = Conv1D(12, 20)  # weight [d_in=20, d_out=12]
        self.down = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


INPUTS = ["x:batch,6:float32"]
TARGETS = ["up", "mid", "down"]


def mixed() -> nn.Module:
    torch.manual_seed(0)
    return Mixed().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import VeraConfig

    kwargs.setdefault("r", 4)
    kwargs.setdefault("d_initial", 1.0)  # λ_d starts at 1 (PEFT's 0.1 would make the update tiny)
    return VeraConfig(target_modules=TARGETS, **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("r", [2, 5])
def test_op_matches_peft_layers(save_projection, r):
    from peft import get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(mixed(), _config(r=r, save_projection=save_projection))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn_like(param))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in TARGETS:
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        a, b = layer.vera_A["default"], layer.vera_B["default"]
        lb, ld = layer.vera_lambda_b["default"], layer.vera_lambda_d["default"]
        assert a.shape == (r, 20) and b.shape == (20, r)
        layout = "linear_t" if isinstance(base, Conv1D) else "linear"
        with torch.no_grad():
            delta = vera_ops.delta_weight(a, b, lb, ld, layer.out_features, layer.in_features)
            assert _rel(delta.T if layout == "linear_t" else delta, layer.get_delta_weight("default")) < 1e-6, name
            adapted = VERA_WEIGHT.overload(base.weight, a, b, lb, ld, layout)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


def test_op_exports_to_onnx_and_matches_eager(tmp_path):
    import onnxruntime as ort

    class Adapted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.weight = nn.Parameter(torch.randn(8, 5, generator=g))  # Conv1D layout [d_in, d_out]
            self.factors = nn.ParameterList(
                [nn.Parameter(torch.randn(s, generator=g)) for s in ((3, 9), (7, 3), (5,), (3,))]
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ torch.ops.peftc.vera_weight(self.weight, *self.factors, "linear_t")

    module = Adapted().eval()
    x = torch.randn(4, 8)
    torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).save(str(tmp_path / "m.onnx"))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(torch.from_numpy(got), module(x)) < 1e-6


# --------------------------------------------------------------------------------------------
# parser, end to end against PEFT


@pytest.mark.parametrize(
    "config",
    [
        {"save_projection": True},
        {"save_projection": False},
        {"save_projection": False, "projection_prng_key": 7, "r": 3, "bias": "vera_only"},
    ],
    ids=["saved", "redrawn", "redrawn-key7-bias"],
)
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_compiled_program_matches_peft(tmp_path, config, merge):
    from peft import PeftModel

    path = models.make_adapter(mixed(), tmp_path / "a", _config(**config))
    signature = parse_inputs(INPUTS)
    program = export(mixed(), signature)
    parsed = load_adapter(path, ir.module_table(program))
    assert [s.module for s in parsed.sites] == sorted(TARGETS)
    assert {s.module: s.scalars["layout"] for s in parsed.sites} == {
        "up": "linear",
        "mid": "linear_t",
        "down": "linear",
    }
    keys = set(load_file(path / "adapter_model.safetensors"))
    used = {t.key for s in parsed.sites for t in s.tensors.values()} | {r.tensor.key for r in parsed.replacements}
    assert used & keys | {k for k, _ in parsed.unused} == keys
    peft_model = PeftModel.from_pretrained(mixed(), str(path))
    projections = parsed.sites[0].tensors
    assert torch.equal(projections["vera_A"].tensor, peft_model.base_model.vera_A["default"])
    assert torch.equal(projections["vera_B"].tensor, peft_model.base_model.vera_B["default"])
    assert any("redrawn" in w for w in parsed.warnings) != config["save_projection"]

    reference = adapt(program, path)
    shared = [n for n in ir.module_table(reference).tensors if n.startswith(("vera_A.", "vera_B."))]
    assert sorted(shared) == [f"vera_A.{parsed.name}", f"vera_B.{parsed.name}"]  # one copy, read by every site
    final, _ = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
    for batch in (1, 4):
        inputs = signature.example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(mixed(), path, inputs)
        assert_outputs_close(eager(final, inputs), expected)
        assert_outputs_close(eager(reference, inputs), expected)
        assert _rel(eager(program, inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


def test_saved_projections_ignored_by_peft_are_recorded_unused(tmp_path):
    path = models.make_adapter(mixed(), tmp_path / "a", _config(save_projection=True))
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    parsed = load_adapter(path, ir.module_table(export(mixed(), parse_inputs(INPUTS))))
    assert {k for k, _ in parsed.unused} == {"base_model.vera_A", "base_model.vera_B"}
    assert "redrawn" in parsed.sites[0].tensors["vera_A"].key


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return models.make_adapter(mixed(), tmp_path_factory.mktemp("vera") / "a", _config())


@pytest.fixture(scope="module")
def table():
    return ir.module_table(export(mixed(), parse_inputs(INPUTS)))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.mid.vera_lambda_b": torch.ones(20)},
            InputError,
            r"mid\.vera_lambda_b: shape \[20\] .* expected \[d_out=12\] for 'mid' \(weight \[20, 12\]\)",
        ),
        (
            None,
            {"base_model.vera_A": torch.ones(4, 12)},
            InputError,
            r"base_model\.vera_A: shape \[4, 12\] .* expected \[4, 20\] \(r=4; largest target d_in=20, d_out=20\)",
        ),
        (None, {"base_model.vera_B": None}, InputError, r"save_projection=true but the file has no base_model\.vera_B"),
        ({"bias": "lora_only"}, None, InputError, r"bias='lora_only'; expected 'none', 'all' or 'vera_only'"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["lambda-shape", "projection-shape", "projection-missing", "bias", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, table, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), table)


class Convolutional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_unsupported_layer_type_names_module_and_type(tmp_path):
    path = tmp_path / "conv"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "target_modules": ["conv"], "r": 2}))
    tensors = {
        "base_model.model.conv.vera_lambda_b": torch.ones(3),
        "base_model.model.conv.vera_lambda_d": torch.ones(2),
    }
    save_file(tensors, path / "adapter_model.safetensors")
    table = ir.module_table(export(Convolutional().eval(), parse_inputs(["x:batch,2,3,3:float32"])))
    with pytest.raises(UnsupportedError, match=r"VeRA on Conv2d \(module 'conv'\) is not supported"):
        load_adapter(path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_wrong_end_of_the_projections_fails_verification(tmp_path, adapter, monkeypatch):
    """Slicing the trailing instead of the leading rows/columns of A and B must not pass."""
    assert peftc.compile(mixed(), adapter, out=tmp_path / "ok", inputs=INPUTS).manifest.status == "ok"
    real = vera_ops.delta_weight

    def trailing(a, b, lambda_b, lambda_d, d_out, d_in):
        return real(a[:, a.shape[1] - d_in :], b[b.shape[0] - d_out :], lambda_b, lambda_d, d_out, d_in)

    monkeypatch.setattr(vera_ops, "delta_weight", trailing)
    with pytest.raises(VerificationError, match="verification failed: output .* vs peft"):
        peftc.compile(mixed(), adapter, out=tmp_path / "out", inputs=INPUTS)
    assert not (tmp_path / "out").exists()
