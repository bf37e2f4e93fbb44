"""``peftc analyze MODEL --density``: load the model (with its adapters merged by PEFT), measure MLP
activation density on calibration inputs, and run the exploitation passes that were asked for.

Calibration inputs: ``--calibration FILE`` (``.safetensors`` or ``.npz``, one array per model input,
batch first, read and checked as for ``peftc compile --calibration``) or ``--samples N`` seeded batches
generated from the model's input signature. The exploitation passes measure their error on held-out
inputs: with a file, every fourth batch of it from the second (batches 1, 5, 9…; at least two
batches are then needed); else
``held_out`` more generated batches with other seeds.

When passes run, both sets also get one seeded batch of every :func:`coverage` shape (the verifier's
three, short sequences and a long one; padded rows where the model takes an attention mask): a ReLU
neuron silent on the calibration's lengths can fire at others (attention averages over the sequence),
so removal is decided, and checked, on every shape the artifact is verified at and likely run at.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from peftc.density import exploit
from peftc.density.blocks import find_blocks
from peftc.density.measure import THRESHOLD, measure
from peftc.errors import InputError, UnsupportedError

HELD_OUT_SEED = 2000
"""Generated held-out batch ``i`` uses seed ``seed + HELD_OUT_SEED + i`` (calibration: ``seed + 1000 + i``)."""
COVERAGE_SEEDS = (3000, 4000)
"""The :func:`coverage` batch ``i`` of the calibration uses seed ``seed + 3000 + i``, of the held-out
inputs ``seed + 4000 + i`` (verification: ``seed + i``, so neither set is the verifier's own inputs)."""
COVERAGE_SEQ = (1, 4, 128)
"""Sequence lengths :func:`coverage` adds to the verifier's (clipped to the model's ``seq`` range)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What ``peftc analyze --density`` was asked for."""

    model: Any
    adapters: tuple[str, ...] = ()
    calibration: Path | None = None
    samples: int = 16
    held_out: int = 4
    seed: int = 0
    threshold: float = THRESHOLD
    passes: tuple[str, ...] = ()
    max_error: float = 1e-5
    inputs: tuple[str, ...] = ()
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        for flag, value in (("--samples", self.samples), ("--held-out", self.held_out)):
            if value < 1:
                raise InputError(f"{flag} {value}: give a positive count")
        if not self.max_error >= 0:  # also refuses NaN
            raise InputError(f"--max-error {self.max_error}: give a non-negative budget")
        if not self.threshold >= 0:
            raise InputError(f"--threshold {self.threshold}: give a non-negative activation value")
        unknown = [p for p in self.passes if p not in exploit.PASSES]
        if unknown:
            raise InputError(f"unknown density pass(es) {unknown}; known: {list(exploit.PASSES)}")


def analyze(request: Request) -> tuple[dict[str, Any], torch.nn.Module]:
    """The density report (``--json``'s object) and the model, rewritten by the passes asked for."""
    from peftc.loaders import load_model
    from peftc.logs import quiet_imports

    with quiet_imports():
        loaded = load_model(request.model, inputs=list(request.inputs), allow_pickle=request.allow_pickle)
    if loaded.module is None or loaded.signature is None:
        raise UnsupportedError(f"{loaded.spec}: density is measured on an nn.Module in eager mode, not a .pt2 program")
    model = with_adapters(loaded.module, request.adapters, request.allow_pickle)
    if request.passes and model is loaded.module:  # the passes rewrite the model: never the caller's
        model = copy.deepcopy(model)
    blocks = find_blocks(model)
    calib, feeds, held = held_out_split(
        request.calibration, request.samples, request.held_out, loaded.signature, request.seed, bool(request.passes)
    )
    counts = measure(model, blocks, feeds, request.threshold)
    layers = [c.record(request.threshold) for c in counts]
    cells = sum(layer["rows"] * layer["neurons"] for layer in layers)
    report: dict[str, Any] = {
        "model": str(loaded.spec),
        "adapters": list(request.adapters),
        "calibration": calib.record,
        "threshold": request.threshold,
        "density": sum(layer["density"] * layer["rows"] * layer["neurons"] for layer in layers) / cells,
        "dead_neurons": sum(layer["dead_neurons"] for layer in layers),
        "neurons": sum(layer["neurons"] for layer in layers),
        "layers": layers,
    }
    if request.passes:
        search = exploit.Search(model, blocks, held, request.max_error)
        records = exploit.run_passes(search, counts, request.passes)
        report["exploit"] = {"max_error": request.max_error, "held_out_batches": len(held), "error": search.error,
                             "passes": list(request.passes), "blocks": records}  # fmt: skip
    return report, model


def held_out_split(
    path: Path | None, samples: int, held_out: int, signature: Any, seed: int, split: bool
) -> tuple[Any, list, list]:
    """The calibration record, the feeds density is measured on and the held-out feeds the passes are
    checked on (module docstring): with a file and ``split``, every fourth batch from the second is held
    out; else ``held_out`` generated batches with other seeds. With ``split`` (passes will run), both
    sets also get one batch per :func:`coverage` shape, and the record says which.

    Raises:
        InputError: a file with fewer than two batches to split.
    """
    from peftc.driver.quantize import calibration as read_calibration

    calib = read_calibration(path, samples, signature, seed)
    if not split:
        return calib, calib.feeds, []
    if path is not None:
        if len(calib.feeds) < 2:
            raise InputError(f"--calibration {path}: the passes hold out every 4th batch of 8 rows; "
                             f"give at least 9 rows (got {calib.record.get('rows')})")  # fmt: skip
        feeds, held = [f for i, f in enumerate(calib.feeds) if i % 4 != 1], calib.feeds[1::4]
    else:
        feeds, held = calib.feeds, read_calibration(None, held_out, signature, seed + HELD_OUT_SEED - 1000).feeds
    shapes = coverage(signature)
    record = {**calib.record, "coverage": {"shapes": shapes, "seeds": [seed + s for s in COVERAGE_SEEDS]}}
    extra = [covering(signature, shapes, seed + s) for s in COVERAGE_SEEDS]
    return dataclasses.replace(calib, record=record), feeds + extra[0], held + extra[1]


def coverage(signature: Any) -> list[dict[str, int]]:
    """The input sizes the passes' calibration and held-out inputs always include: the verifier's
    (``InputSignature.cases(3)``: for text batch 2 × seq 16 with a padded row, 1 × 9, 3 × 33) and, where
    the model has a ``seq`` dim, batch 2 at each length of :data:`COVERAGE_SEQ` within the dim's range."""
    shapes = signature.cases(3)
    seq = signature.dims.get("seq")
    for length in COVERAGE_SEQ if seq is not None else ():
        sizes = {**shapes[0], "seq": min(max(length, seq.min), seq.max or length)}
        for dim in signature.dims.values():
            if dim.sum_of:
                sizes[dim.name] = sum(sizes[part] for part in dim.sum_of)
        if sizes not in shapes:
            shapes.append(sizes)
    return shapes


def covering(signature: Any, shapes: Sequence[dict[str, int]], seed: int) -> list[dict[str, Any]]:
    """One seeded batch per size assignment of ``shapes`` (batch ``i``: seed ``seed + i``), as numpy feeds."""
    return [
        {k: v.numpy() for k, v in signature.example(sizes, seed=seed + i).items()} for i, sizes in enumerate(shapes)
    ]


def with_adapters(module: torch.nn.Module, adapters: Sequence[str], allow_pickle: bool) -> torch.nn.Module:
    """A copy of ``module`` with ``adapters`` applied in order and merged by PEFT (``merge_and_unload``),
    so every MLP is plain ``nn.Linear`` again; ``module`` itself without adapters."""
    if not adapters:
        return module
    import peft
    from safetensors.torch import save_file

    from peftc.methods.loading import read_adapter

    model = copy.deepcopy(module)
    for path in adapters:
        source = read_adapter(path, allow_pickle=allow_pickle)
        with tempfile.TemporaryDirectory(prefix="peftc-density-") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(dict(source.config)))
            save_file(
                {k: v.contiguous() for k, v in source.tensors.items()}, str(Path(tmp) / "adapter_model.safetensors")
            )
            try:
                model = peft.PeftModel.from_pretrained(model, tmp).merge_and_unload()
            except Exception as e:
                raise UnsupportedError(
                    f"{path}: PEFT could not load and merge this {source.config.get('peft_type')} adapter "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); density is measured on "
                    "the merged model"
                ) from None
    return model.eval()
