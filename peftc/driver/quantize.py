"""Integer precisions: which layers to quantize so the artifact stays within its error budget.

The target lowers the fp32 program, then (a :class:`~peftc.backends.base.QuantizingBackend`) lists
the layers its quantizer can rewrite. On the calibration inputs, against the fp32 reference program:

1. each layer is quantized alone and its error measured: the layer's *sensitivity* (the table in
   the manifest and ``peftc inspect``);
2. every layer is quantized; if the error is within the budget, that is the artifact;
3. otherwise the most sensitive layers stay in float, the fewest that bring the error within the
   budget (found by bisection over the sensitivity order, each candidate measured, not estimated);
4. if only keeping every layer in float meets the budget, the compile fails (exit 1) naming the
   worst layers: an "int8" artifact with no int8 layer would be a silently different artifact.

The search's error is the worst over the calibration batches: an estimate of the worst case that
inputs it has not seen can exceed. Drawn alike, 3 verification inputs exceed the worst of N
calibration batches with probability 3/(N+3): 4.5 % for the default 64 (measured: the conv net's
int8-static artifact searched on 8 batches was 21× over its budget on one of 30 fresh batches, on 64
batches within it on all 30). The chosen artifact is then verified like any other, against the fp32
oracles within the budget, on the verification inputs, which are not the calibration inputs.

Calibration inputs come from ``--calibration FILE`` (``.safetensors`` or ``.npz``, one array per
model input, the batch dimension first, fed in batches of at most :data:`BATCH`) or are generated
from the input signature: ``--calibration-samples N`` batches (default ``peftc.options.CALIBRATION_SAMPLES``), seeded, in
the verification shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc.backends.base import Backend, Lowered, Quantizer, QuantizingBackend
from peftc.driver.build import Built
from peftc.driver.modes import Lowering
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import DTYPES, InputSignature, with_defaults
from peftc.options import CompileOptions, check_calibration_file
from peftc.progress import advance
from peftc.verification import program_oracle
from peftc.verification.compare import relative_error

BATCH = 8
SEED = 1000
"""Generated calibration batch ``i`` uses seed ``options.seed + SEED + i`` (verification uses ``seed + i``)."""
Feeds = list[dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class Calibration:
    feeds: Feeds
    record: dict[str, Any]


def calibration(path: Path | None, samples: int, signature: InputSignature, seed: int) -> Calibration:
    """The calibration feeds and their manifest record.

    Raises:
        InputError: a file that is missing, unreadable, or does not match the model's inputs.
    """
    if path is None:
        cases = signature.cases(3)
        feeds = [
            {k: v.numpy() for k, v in signature.example(cases[i % len(cases)], seed=seed + SEED + i).items()}
            for i in range(samples)
        ]
        return Calibration(feeds, {"source": "generated", "batches": samples, "seed": seed + SEED})
    arrays = dict(with_defaults(signature.inputs, _read(path)))  # token_type_ids may be left out, as in a call
    names = signature.names
    missing, extra = [n for n in names if n not in arrays], [n for n in arrays if n not in names]
    if missing or extra:
        wrong = ", ".join(
            f"{what} {names}" for what, names in (("missing inputs", missing), ("unexpected", extra)) if names
        )
        raise InputError(f"--calibration {path}: {wrong}; the model takes {names}")
    rows = {len(a) for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise InputError(f"--calibration {path}: every array needs the same number of rows (batch first), got {rows}")
    for spec in signature.inputs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape) or any(
            isinstance(want, int) and got != want for got, want in zip(array.shape, spec.shape, strict=True)
        ):
            raise InputError(
                f"--calibration {path}: {spec.name!r} has shape {list(array.shape)}, the model takes {list(spec.shape)}"
            )
        dtype = DTYPES[spec.dtype]
        if dtype.is_floating_point != np.issubdtype(array.dtype, np.floating):
            raise InputError(f"--calibration {path}: {spec.name!r} is {array.dtype}, the model takes {spec.dtype}")
        arrays[spec.name] = array.astype(torch.empty((), dtype=dtype).numpy().dtype)
    count = rows.pop()
    feeds = [{k: v[i : i + BATCH] for k, v in arrays.items()} for i in range(0, count, BATCH)]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Calibration(feeds, {"source": str(path), "sha256": digest, "rows": count, "batches": len(feeds)})


def _read(path: Path) -> dict[str, np.ndarray]:
    check_calibration_file(path)  # also for ``peftc analyze``, which takes no CompileOptions
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    except FileNotFoundError:
        raise InputError(f"--calibration {path}: no such file") from None
    except Exception as e:
        raise InputError(f"--calibration {path}: cannot read it: {type(e).__name__}: {e}") from None


def run(
    backend: Backend,
    lowering: Lowering,
    built: Built,
    directory: Path,
    precision: Mapping[str, Any],
    options: CompileOptions,
    progress: Callable[[str], None],
) -> tuple[Lowering, dict[str, Any]]:
    """Quantize the artifact ``lowering`` wrote into ``directory`` (the driver's quantize stage);
    return the lowering with its facts updated and the precision record with its ``quantization``."""
    if not isinstance(backend, QuantizingBackend):
        raise AssertionError(f"target {backend.name!r} declares integer precisions but does not quantize")
    signature = built.loaded.signature.in_dtype(torch.float32)
    calib = calibration(options.calibration, options.calibration_samples, signature, options.seed)
    with tempfile.TemporaryDirectory(prefix="peftc-quantize-") as scratch:
        quantizer = backend.quantizer(lowering.lowered, directory, built.precision, Path(scratch))
        lowered, record = quantize(
            quantizer, backend.name, built.precision, precision["budget"], built.fp32.reference, calib, progress
        )
    files = (*lowered.files, *(f for f in lowering.files if f not in lowering.lowered.files))
    return dataclasses.replace(lowering, lowered=lowered, files=files), {**precision, "quantization": record}


def quantize(
    quantizer: Quantizer,
    target: str,
    precision: str,
    budget: float,
    reference: Any,
    calib: Calibration,
    progress: Callable[[str], None],
) -> tuple[Lowered, dict[str, Any]]:
    """Quantize ``quantizer``'s model (the fp32 lowering of ``reference``, the fp32 reference program)
    as far as ``budget`` allows and write it; return its lowering and the manifest's ``quantization``
    record."""
    oracle = program_oracle(reference)
    expected = [oracle({k: torch.from_numpy(v) for k, v in feed.items()}) for feed in calib.feeds]
    layers = list(quantizer.layers)
    if not layers:
        raise UnsupportedError(f"--precision {precision}: target {target!r} finds no layer of this model it quantizes")

    def measure(keep: Collection[str] = (), only: Collection[str] | None = None) -> float:
        run = quantizer.trial(keep, calib.feeds, only)
        return _error(expected, [run(feed) for feed in calib.feeds])

    alone = {}
    progress(f"quantize: {precision}, error of each of {len(layers)} layers quantized alone")
    for index, layer in enumerate(layers):
        advance(index, len(layers))
        alone[layer.name] = measure(only=[layer.name])
    order = sorted(layers, key=lambda layer: -alone[layer.name])
    progress(f"quantize: {precision}, {len(layers)} layers, budget {budget:.3g}")
    tried = {0: measure()}
    low, high = 0, len(layers)  # keeping the ``high`` most sensitive layers meets the budget; ``low`` does not
    if tried[0] <= budget:
        high = 0
    while high - low > 1:
        middle = (low + high) // 2
        tried[middle] = measure(keep=[layer.name for layer in order[:middle]])
        low, high = (low, middle) if tried[middle] <= budget else (middle, high)
    if high == len(layers):
        worst = ", ".join(f"{layer.module or layer.name} {alone[layer.name]:.2e}" for layer in order[:5])
        raise VerificationError(
            f"--precision {precision} cannot meet the error budget {budget:.3g} on the calibration inputs: "
            "quantizing every layer gives "
            f"{tried[0]:.2e}, quantizing only the least sensitive {tried[low]:.2e}; the most sensitive layers "
            f"(error quantized alone): {worst}"
        )
    keep = {layer.name for layer in order[:high]}
    progress(f"quantize: {precision}, writing {len(layers) - len(keep)} of {len(layers)} layers quantized")
    lowered = quantizer.write(keep, calib.feeds)
    table = [
        {
            "name": layer.name,
            "module": layer.module,
            "op": layer.op,
            "shape": list(layer.shape),
            "precision": "fp32" if layer.name in keep else precision,
            "error_alone": alone[layer.name],
        }
        for layer in layers
    ]
    return lowered, {
        "layers": table,
        "quantized": len(layers) - len(keep),
        "kept_float": len(keep),
        "error": tried[high],
        "search": [{"kept_float": k, "error": e} for k, e in sorted(tried.items())],
        "calibration": calib.record,
    }


def explained(error: VerificationError, precision: Mapping[str, Any]) -> VerificationError:
    """``error`` with what to do about it when the artifact is quantized: the layer search met the
    budget on its calibration inputs, the verification inputs it has not seen did not."""
    quantization = precision.get("quantization")
    if not quantization:
        return error
    batches = quantization["calibration"]["batches"]
    hint = (
        f"; the layer search met {quantization['error']:.3g} on its {batches} calibration batches: give more "
        "--calibration-samples, a --calibration file like the real inputs, or a larger --max-error"
    )
    return VerificationError(str(error) + hint, error.table)


def _error(expected: Sequence[Mapping[str, np.ndarray]], got: Sequence[Mapping[str, np.ndarray]]) -> float:
    """The worst :func:`~peftc.verification.compare.relative_error` over the batches (each output
    relative to its own scale in the batch, as verification measures each case)."""
    return max(relative_error(want, have) for want, have in zip(expected, got, strict=True))
