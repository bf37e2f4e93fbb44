"""What the focused tests of the SVD- and projection-based tuners (OSF, PSOFT, HiRA, AdaMSS, DEFT) share.

A three-layer MLP of ``nn.Linear`` layers of different shapes (wider, narrower, one without a bias),
adapters PEFT itself builds and saves with every trained tensor perturbed (``models.make_adapter``),
and two checks against PEFT's eager model: the compiled program merged and unmerged, and whether
verification passes (the mutation tests break a formula and expect it to fail).
"""

from __future__ import annotations

import functools
from pathlib import Path

import models
import torch
from conftest import adapt, assert_outputs_close, eager, export
from layer_checks import rel
from peft_check import check_against_peft as check_peft
from torch import nn

from peftc import ir
from peftc.ir.modules import ModuleTable
from peftc.loaders.inputs import parse_inputs
from peftc.methods.base import Adapter
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines

INPUTS = ["x:batch,12:float32"]
TARGETS = ["up", "mid", "down"]


class Stack(nn.Module):
    """Linear layers widening, narrowing (no bias) and narrowing again."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.mid = nn.Linear(20, 16, bias=False)
        self.down = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def stack() -> Stack:
    """The MLP with seeded weights."""
    torch.manual_seed(0)
    return Stack().eval().requires_grad_(False)


@functools.cache
def program() -> ir.Program:
    """The traced MLP (passes clone what they are given, so one trace serves every test)."""
    return export(stack(), parse_inputs(INPUTS))


def table() -> ModuleTable:
    """The traced MLP's modules."""
    return ir.module_table(program())


def make(tmp_path: Path, config, noise: float = 0.3) -> Path:
    """An adapter for the MLP, saved by PEFT with its trained tensors perturbed."""
    return models.make_adapter(stack(), tmp_path, config, noise=noise)


def loaded(path: Path):
    """PEFT's own model of the MLP with the adapter at ``path`` loaded."""
    from peft import PeftModel

    return PeftModel.from_pretrained(stack(), str(path)).eval()


def check_against_peft(path: Path) -> Adapter:
    """Merged and unmerged programs match PEFT's eager model on two batch sizes; the adapter matters."""
    parsed = load_adapter(path, table())
    signature = parse_inputs(INPUTS)
    reference = adapt(program(), path)
    for merge in (True, False):
        final, _ = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
        for batch in (1, 5):
            inputs = signature.example({"batch": batch}, seed=batch)
            expected = models.peft_outputs(stack(), path, inputs)
            assert_outputs_close(eager(final, inputs), expected)
            assert rel(eager(program(), inputs)["output"], torch.as_tensor(expected["output"])) > 0.02
    return parsed


def verification_passes(path: Path) -> bool:
    """Whether the adapted program passes verification against PEFT's eager model."""
    return check_peft(stack(), path, INPUTS, program()).passed


class ConvThenLinear(nn.Module):
    """A 1×1 ``nn.Conv1d`` (``conv``, 2 → 4 channels) then an ``nn.Linear`` (``lin``, 3 → 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 1)
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x))


def conv_table() -> ModuleTable:
    """The modules of :class:`ConvThenLinear` (input ``[batch, 2, 3]``)."""
    torch.manual_seed(0)
    return ir.module_table(export(ConvThenLinear().eval(), parse_inputs(["x:batch,2,3:float32"])))


def hand_written(path: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """An adapter directory written by hand (for inputs PEFT would not save)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, path / "adapter_model.safetensors")
    return path
