"""Bottleneck adapters (``peftc/methods/bottleneck.py``, ``PEFTC_BOTTLENECK``): Houlsby, Pfeiffer, parallel.

PEFT has no bottleneck adapter, so the oracle is an independent eager model written here: a copy of
tiny BERT whose sublayer output blocks are replaced by :class:`_Reference`, which follows AdapterHub's
``Adapter``/``ParallelAdapter`` (``pre_forward``, ``forward``, ``post_forward``) step by step. peftc's
ONNX artifact (sequential after attention, scaled parallel beside the FFN) and the wrapper it traces
(Houlsby, Pfeiffer, parallel, ``post_add``) must match it within the fp32 bound; dropping the residual or the scaling must be caught; each refusal names its key.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import models
import pytest
import torch
import workdirs
from conftest import assert_outputs_close, edited_adapter
from safetensors.torch import save_file

import peftc
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.loaders.inputs import InputSignature, from_transformers
from peftc.methods import bottleneck, registry
from peftc.methods.loading import read_adapter
from peftc.verification import module_oracle, verify

_WORK = workdirs.work_dir("peftc-bottleneck-")
HIDDEN = 32
VARIANTS = {  # AdapterHub's DoubleSeqBnConfig, SeqBnConfig and ParBnConfig (reduction factors shrunk)
    "houlsby": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 8, "non_linearity": "swish",
                "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True},
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 4, "non_linearity": "relu",
                 "original_ln_before": True, "original_ln_after": True, "residual_before_ln": True},
    "parallel": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 4, "non_linearity": "relu",
                 "original_ln_after": True, "is_parallel": True, "scaling": 4.0},
    "post-add": {"mh_adapter": True, "output_adapter": False, "reduction_factor": 8, "non_linearity": "gelu",
                 "original_ln_before": True, "original_ln_after": False, "residual_before_ln": "post_add", "scaling": 0.5},
    "mixed": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 4, "non_linearity": "relu",
              "original_ln_before": True, "original_ln_after": True, "residual_before_ln": True,
              "sites": {f"encoder.layer.{i}.output": {"is_parallel": True, "scaling": 4.0, "non_linearity": "gelu"}
                        for i in range(2)}},
}  # fmt: skip
"""Sequential after attention and FFN (Houlsby), after the FFN with the LayerNorm first (Pfeiffer), scaled
parallel beside the FFN, the ``post_add`` residual without the final LayerNorm, and sequential after
attention with parallel beside the FFN in one adapter (per-block ``sites``)."""


class _Reference(torch.nn.Module):
    """A BERT sublayer output block with an AdapterHub bottleneck adapter, written from its definition."""

    def __init__(self, block: torch.nn.Module, tensors: dict[str, torch.Tensor], cfg: dict) -> None:
        super().__init__()
        self.dense, self.norm, self.cfg = block.dense, block.LayerNorm, cfg
        self.down = torch.nn.Linear(HIDDEN, tensors["adapter_down.weight"].shape[0])
        self.up = torch.nn.Linear(tensors["adapter_down.weight"].shape[0], HIDDEN)
        with torch.no_grad():
            for name, t in tensors.items():
                self.get_parameter(name.removeprefix("adapter_")).copy_(t)
        acts = {"relu": torch.relu, "swish": torch.nn.SiLU(), "gelu": torch.nn.GELU()}
        self.act = acts[cfg["non_linearity"]]

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        cfg, x = self.cfg, self.dense(hidden_states)
        if cfg.get("is_parallel"):  # ParallelAdapter: the adapter reads the sublayer's input
            x = x + self.up(self.act(self.down(input_tensor))) * cfg.get("scaling", 1.0)
        else:
            before = cfg["residual_before_ln"]
            residual = x if before is True else None
            if cfg["original_ln_before"]:
                x = x + input_tensor
                residual = x if before == "post_add" else residual
                x = self.norm(x)
            residual = x if before is False else residual
            x = self.up(self.act(self.down(x))) * cfg.get("scaling", 1.0) + residual
        return self.norm(x + input_tensor) if cfg["original_ln_after"] else x


def _blocks(cfg: dict) -> list[str]:
    kinds = (["attention.output"] if cfg["mh_adapter"] else []) + (["output"] if cfg["output_adapter"] else [])
    return [f"encoder.layer.{i}.{kind}" for i in range(2) for kind in kinds]


@functools.cache
def _adapter(variant: str) -> Path:
    cfg, path = VARIANTS[variant], _WORK / variant
    path.mkdir(parents=True)
    g, r = torch.Generator().manual_seed(len(variant)), HIDDEN // cfg["reduction_factor"]
    shapes = {"adapter_down.weight": (r, HIDDEN), "adapter_down.bias": (r,), "adapter_up.weight": (HIDDEN, r),
              "adapter_up.bias": (HIDDEN,)}  # fmt: skip
    tensors = {f"{b}.{k}": torch.randn(s, generator=g) * 0.4 for b in _blocks(cfg) for k, s in shapes.items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "PEFTC_BOTTLENECK", "format_version": 1, **cfg}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@functools.cache
def _model() -> torch.nn.Module:
    return models.tiny_bert()


def _reference(variant: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    cfg, tensors, model = VARIANTS[variant], load_file(_adapter(variant) / "adapter_model.safetensors"), _model()
    reference = copy.deepcopy(model)
    for path in _blocks(cfg):
        parent, name = path.rsplit(".", 1)
        mine = {k.removeprefix(path + "."): v for k, v in tensors.items() if k.startswith(path + ".")}
        own = {**cfg, **cfg.get("sites", {}).get(path, {})}
        setattr(reference.get_submodule(parent), name, _Reference(model.get_submodule(path), mine, own))
    return reference


def _report(variant: str):
    """peftc's eager wrapper (what it traces) against the independent reference."""
    module, source = _model(), read_adapter(_adapter(variant))
    signature = from_transformers(module)
    inserted = registry.insertion([source], module, signature)
    independent = {"independent": module_oracle(_reference(variant))}
    return verify(module_oracle(inserted.wrap(module)), signature, independent)


def test_onnx_artifact_matches_the_independent_reference(tmp_path):
    module, variant = _model(), "mixed"
    artifact = peftc.compile(module, _adapter(variant), out=tmp_path / "out")
    assert artifact.manifest.verification["passed"]
    signature = InputSignature.from_json(artifact.manifest.target["signature"])
    inputs = signature.example({**signature.cases(1)[0], "batch": 2}, seed=5)
    with torch.no_grad():
        expected = dict(_reference(variant)(**inputs))
        base = dict(module(**inputs))
    got = peftc.load(artifact.path)(**inputs)
    assert_outputs_close(got, expected)
    moved = (expected["last_hidden_state"] - base["last_hidden_state"]).abs().max()
    assert moved > 0.1  # the adapter really changes the output


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel", "post-add"])
def test_wrapper_matches_the_independent_reference(variant):
    report = _report(variant)
    assert report.passed, {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}


@pytest.mark.parametrize("broken", ["residual", "scaling"])
def test_verification_catches_a_dropped_residual_or_scaling(monkeypatch, broken):
    if broken == "scaling":
        forward = bottleneck.Bottleneck.forward
        monkeypatch.setattr(bottleneck.Bottleneck, "forward", lambda self, z: forward(self, z) / self.options.scaling)
        assert not _report("parallel").passed
    else:
        # Houlsby's residual is the adapter's input: A(h) + h - h drops it.
        forward = bottleneck.Bottleneck.forward
        monkeypatch.setattr(bottleneck.Bottleneck, "forward", lambda self, z: forward(self, z) - z)
        assert not _report("houlsby").passed


def _insert(tmp_path, *, config=None, tensors=None):
    source = read_adapter(edited_adapter(_adapter("houlsby"), tmp_path / "edited", config=config, tensors=tensors))
    return registry.insertion([source], _model(), from_transformers(_model()))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"ln_before": True}, "ln_before=True: a LayerNorm inside the adapter is not read"),
        ({"ln_after": True}, "ln_after=True: a LayerNorm inside the adapter is not read"),
        ({"use_gating": True}, "use_gating=True: gated adapters are not read"),
        ({"inv_adapter": "nice"}, "inv_adapter='nice': invertible embedding adapters"),
        ({"cross_adapter": True}, "cross_adapter=True: cross-attention adapters"),
        ({"phm_layer": True}, "phm_layer=True: PHM (Compacter) projections"),
        ({"leave_out": [0]}, "leave_out=[0]: give tensors for exactly the adapted layers"),
        ({"scaling": "learned"}, "scaling='learned': only a fixed number is read"),
        ({"non_linearity": "mish"}, "non_linearity='mish'; peftc reads"),
        ({"residual_before_ln": "post_add"}, "residual_before_ln='post_add'; give true, false, or 'post_add' with"),
        ({"format_version": 2}, "format_version=2; peftc reads 1"),
        ({"sites": {"encoder.layer.0.output": {"mh_adapter": True}}}, "sets 'mh_adapter'; a block may set only"),
        ({"sites": {"encoder.layer.0.output": {"scaling": "channel"}}}, "output']: scaling='channel': only a fixed"),
        ({"sites": {"pooler": {"scaling": 2.0}}}, "sites names 'pooler', which has no adapter tensors"),
        ({"mh_adapter": False}, "attention.output.adapter_down.weight: an adapter of encoder.layer.0.attention"),
        ({"reduction_factor": 16}, "r=4 is not d=32 // reduction_factor=16"),
    ],
    ids=lambda v: v if isinstance(v, str) else next(iter(v)),
)
def test_refuses_each_unsupported_option_naming_its_key(tmp_path, config, message):
    with pytest.raises((InputError, UnsupportedError), match=re.escape(message)):
        _insert(tmp_path, config=config)


def test_refuses_missing_and_foreign_tensors(tmp_path):
    key = "encoder.layer.1.output.adapter_up.bias"
    with pytest.raises(InputError, match=re.escape(f"no {key!r} tensor")):
        _insert(tmp_path, tensors={key: None})
    with pytest.raises(InputError, match=re.escape("encoder.layer.1.output.gate.weight: not a bottleneck tensor")):
        _insert(tmp_path / "2", tensors={"encoder.layer.1.output.gate.weight": torch.ones(2)})
    dropped = {f"encoder.layer.1.output.{r}": None for r in bottleneck.ROLES}
    with pytest.raises(InputError, match="output_adapter is true, but encoder.layer.1.output has no adapter"):
        _insert(tmp_path / "3", tensors=dropped)


def test_refuses_a_block_that_is_not_a_sublayer_output(tmp_path):
    renamed = lambda w: {k.replace("layer.0.output.", "layer.0.intermediate."): v for k, v in w.items()}  # noqa: E731
    with pytest.raises(UnsupportedError, match="encoder.layer.0.intermediate is a BertIntermediate, not a sublayer"):
        _insert(tmp_path, tensors=renamed)


def test_refuses_a_program_traced_without_the_adapter():
    with pytest.raises(UnsupportedError, match="PEFTC_BOTTLENECK adapter is inserted when peftc traces the model"):
        registry.parse_adapter(read_adapter(_adapter("houlsby")), module_table_from_module(_model()))
