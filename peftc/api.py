"""The public entry points: :func:`compile` an adapted model, :func:`verify` an artifact again.

Both are thin: ``compile`` turns its arguments into a :class:`~peftc.options.CompileOptions` (as the
CLI does with its flags) and runs the driver (``peftc/driver/pipeline.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from peftc import arguments
from peftc.artifact import Artifact
from peftc.driver import pipeline
from peftc.options import CompileOptions
from peftc.verification import Report

PathLike = str | os.PathLike[str]
Progress = Callable[[str], None]


def compile(
    model: Any,
    adapters: PathLike | Sequence[PathLike],
    *,
    out: PathLike,
    target: str = "onnx",
    target_options: Mapping[str, Any] | None = None,
    merge: bool = True,
    inputs: Sequence[str] = (),
    configs: Sequence[PathLike] = (),
    force: bool = False,
    keep_failed: bool = False,
    dump_ir: PathLike | None = None,
    allow_pickle: bool = False,
    base_residual: bool = False,
    task_id: int | None = None,
    swappable: bool = False,
    max_rank: int | None = None,
    multi_adapter: int = 0,
    slot_capacity: int | None = None,
    slot_dtype: str = "fp32",
    oracle: bool = True,
    seed: int = 0,
    precision: str | None = None,
    max_error: float | None = None,
    calibration: PathLike | None = None,
    calibration_samples: int = 64,
    combine: str | None = None,
    task: str | None = None,
    co_permute: bool = False,
    merge_policy: str = "auto",
    quantize_embeddings: str = "none",
    density: Sequence[str] = (),
    dead_threshold: float | None = None,
    progress: Progress | None = None,
) -> Artifact:
    """Compile ``model`` with ``adapters`` into a verified artifact directory ``out``.

    Args:
        model: a Hugging Face model directory, ``pkg.module:factory``, a ``.pt2`` file, an ``nn.Module`` or ``ExportedProgram``.
        adapters: PEFT adapter directories or ``.safetensors`` files, in stacking order.
        out: the artifact directory to create.
        target: ``onnx``, ``aoti`` (AOTInductor package) or ``trt`` (TensorRT engine).
        target_options: the target's CLI options: ``device`` (aoti); ``profile``, ``refit``, ``strip_weights``, … (trt).
        merge: fold adapters into the base weights; ``False`` keeps them as separate ops.
        inputs: ``name:dims:dtype`` input descriptions overriding the derived ones.
        configs: ``adapter_config.json`` files for adapters given as bare weight files, by position.
        force: replace an existing ``out`` if it is a peftc artifact or an empty directory (nothing else).
        keep_failed: write the artifact, marked failed, even if verification fails.
        dump_ir: write the canonical graph after every pass into this directory.
        allow_pickle: accept pickled weight files (loaded with ``weights_only=True``).
        base_residual: ``model`` is the residual base a PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapter was trained on.
        task_id: merge a Poly adapter for this task only (default: the router and a ``task_ids`` input).
        swappable: LoRA, S²FT, sparse-ΔW sites as slots filled from adapter files, switched without recompiling.
        max_rank, multi_adapter: ``swappable``'s slot rank (default: the largest given) and adapters per call (by row).
        slot_capacity, slot_dtype: ``swappable``'s rows/columns (entries) per S²FT (sparse) slot (default: the most
            given); its adapter files' ``fp32``, ``fp16`` or ``int8`` (per-row scales, ``peftc/swap/storage.py``).
        oracle, seed: also verify against Hugging Face PEFT when it is installed; the verification inputs' seed.
        precision: what the artifact computes in, ``fp32``, ``fp16`` or ``bf16`` (default: the base checkpoint's
            dtype where the target runs it, else fp32, noted in the manifest), or an integer precision, ``int8``,
            ``int8-static``, ``int8-weight`` or ``int4``, whose layers are quantized as far as ``max_error``
            allows (``peftc/driver/quantize.py``), verified against the fp32 oracles within ``max_error``.
        max_error: the error budget (relative to each output's scale) of a reduced precision (default:
            ``peftc.precision.budget``), of ``merge_policy="auto"`` per site (1e-2), or of ``density`` (1e-5).
        calibration, calibration_samples: ``.safetensors``/``.npz`` model inputs (batch first), or how many
            seeded batches to generate: int8 ranges and the error of int8 layers and density passes.
        combine: ``METHOD[:key=value,…]``: combine ``adapters`` into one first (``peftc.combine``; ``combined/``).
        task: ``text-generation`` / ``text2text-generation`` (KV caches as tensors, README "Generation"), ``none``.
        co_permute: with ``merge=False``, S²FT sites as slices of a base permuted once (``peftc/sparse/copermute.py``).
        merge_policy, quantize_embeddings: a LoRA on a quantized base, README "Quantized bases (QLoRA)".
        density, dead_threshold: DEFT passes within ``max_error`` and GELU/SiLU's dead-neuron threshold, README "DEFT".
        progress: called with a line of text as each stage starts.

    Raises:
        InputError, UnsupportedError: bad or unsupported input (exit code 2).
        VerificationError: the artifact disagrees with its oracles (exit code 1).
    """
    fields = {k: v for k, v in locals().items() if k != "progress"}  # each a CompileOptions field of its name
    arguments.progress(progress)
    return pipeline.compile_artifact(CompileOptions(**fields), progress)


def verify(
    path: PathLike, *, model: Any = None, oracle: bool = True, seed: int | None = None, progress: Progress | None = None
) -> Report:
    """Re-run the numeric check of the artifact at ``path`` against freshly rebuilt oracles.

    The base model and adapters are loaded again from the sources the manifest names (``model``
    overrides the model, e.g. for artifacts built from an in-memory module).

    Raises:
        InputError: the sources are gone or changed (sha256 differs).
    """
    arguments.path(path, "path")
    arguments.progress(progress)
    arguments.flag(oracle, "oracle")
    arguments.integer(seed, "seed", optional=True)
    return pipeline.reverify(path, model=model, oracle=oracle, seed=seed, progress=progress)


__all__ = ["Artifact", "compile", "verify"]
