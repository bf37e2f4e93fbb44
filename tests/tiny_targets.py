"""A three-layer model whose targets differ in size and layout, for the focused tests of methods that
adapt linear layers : ``nn.Linear`` 6→20, GPT-2 ``Conv1D`` 20→12 (weight
``[d_in, d_out]``) and ``nn.Linear`` 12→5, so shared tensors sized for the largest target are sliced
differently by each. Tracing it takes a fraction of a second; the helpers parse an adapter against it
and verify a compiled program against PEFT without building an artifact."""

from __future__ import annotations

from pathlib import Path

import layer_checks
import torch
from conftest import export
from layer_checks import rel  # noqa: F401  (tiny.rel, one definition for every helper module)
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftc import ir
from peftc.loaders.inputs import parse_inputs
from peftc.methods.base import Adapter
from peftc.methods.loading import load_adapter
from peftc.verification import Report

SIZES = (6, 20, 12, 5)
"""Features in and out of ``up``, ``mid`` and ``down`` (a method may need other sizes: pass ``sizes``)."""
TARGETS = ["up", "mid", "down"]


def inputs(sizes: tuple[int, ...] = SIZES) -> list[str]:
    return [f"x:batch,{sizes[0]}:float32"]


INPUTS = inputs()


class Mixed(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = SIZES) -> None:
        super().__init__()
        self.up = nn.Linear(sizes[0], sizes[1])
        self.mid = Conv1D(sizes[2], sizes[1])
        self.down = nn.Linear(sizes[2], sizes[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def mixed(sizes: tuple[int, ...] = SIZES) -> nn.Module:
    torch.manual_seed(0)
    return Mixed(sizes).eval().requires_grad_(False)


def program(sizes: tuple[int, ...] = SIZES) -> ir.Program:
    return export(mixed(sizes), parse_inputs(inputs(sizes)))


def parse(path: Path, sizes: tuple[int, ...] = SIZES) -> Adapter:
    return load_adapter(path, ir.module_table(program(sizes)))


def verify_against_peft(path: Path, *, merge: bool, sizes: tuple[int, ...] = SIZES) -> Report:
    """The compiled program (merged or not) checked against PEFT's eager model, as ``peftc.compile`` does."""
    return layer_checks.verify_against_peft(mixed(sizes), path, inputs(sizes), merge=merge)
