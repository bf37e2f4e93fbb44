"""Checks some method tests share (DeLoRA, RoAd, GraLoRA, GLoRA, PEANuT, Super-Tuning,
FRoD): PEFT's merged and unmerged models of a layer, and verification of a small model against PEFT
without a whole compile (the focused tests stay cheap; ``tests/test_matrix.py`` compiles).
``tiny_targets`` and ``tuner_checks`` reuse :func:`rel` and :func:`verify_against_peft` from here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from conftest import adapt, export

from peftc import ir
from peftc.loaders.inputs import parse_inputs
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines
from peftc.verification import Report, peft_oracle, program_oracle, verify


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual − expected| / max|expected|`` in float64."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def peft_layers(model: torch.nn.Module, config: Any, seed: int = 1) -> tuple[Any, torch.nn.Module]:
    """PEFT's model of ``model`` with every trainable tensor perturbed (as ``models.make_adapter``), and a
    merged copy (``merge_and_unload``)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad and param.numel():
                param.add_(torch.randn_like(param) * 0.3 * max(float(param.pow(2).mean().sqrt()), 0.3))
    return peft_model, copy.deepcopy(peft_model).merge_and_unload()


def verify_against_peft(model: torch.nn.Module, path: Path, inputs: list[str], *, merge: bool) -> Report:
    """peftc's program for ``model`` + the adapter at ``path`` (merged or not) against PEFT's eager model."""
    signature = parse_inputs(inputs)
    program = export(model, signature)
    adapter = load_adapter(path, ir.module_table(program))
    final, _ = PassManager(pipelines.optimize(merge=merge)).run(adapt(program, path), PassContext())
    peft, why = peft_oracle(model, [adapter])
    assert peft is not None, why
    compiled = program_oracle(final)
    return verify(lambda x: compiled(x), signature, {"peft": peft}, base=program_oracle(program))
