"""The compile pipeline, and re-verifying an artifact: the driver's two entry points.

:func:`compile_artifact` runs load → trace → adapt → mode.optimize → lower → verify → commit, timing
each stage. Nothing reaches ``options.out`` before verification passes (``peftc.artifact.writer``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

from peftc import memory
from peftc.artifact import MANIFEST_FILE, Artifact, ArtifactWriter, Manifest, check_files, read_manifest
from peftc.backends import get_backend
from peftc.density import compiled as density
from peftc.driver import combined as combining
from peftc.driver import manifest as manifests
from peftc.driver import precision as precisions
from peftc.driver import quantize as quantizing
from peftc.driver.build import Progress, Sources, Stages, build
from peftc.driver.deferred import DeferredRunner, model_weights
from peftc.driver.modes import Lowering, Merged, Mode, Unmerged
from peftc.driver.sources import recorded
from peftc.generation import prefix, prefix_check
from peftc.generation.files import copy_model_files
from peftc.loaders import seq2seq
from peftc.options import CompileOptions
from peftc.runtime import checked, open_runner
from peftc.sparse.copermute_mode import CoPermuted
from peftc.swap.mode import Swappable
from peftc.verification import Report


def compile_artifact(options: CompileOptions, progress: Progress | None = None) -> Artifact:
    """Compile, verify and write the artifact ``options`` describe (``peftc.compile`` documents it)."""
    stages = Stages(progress)
    writer = ArtifactWriter(options.out, force=options.force, inputs=options.input_paths())
    try:
        backend = get_backend(options.target, options.target_options)
        mode = mode_for(options)
        mode.check(backend)
        choose = partial(precisions.choose, options.precision, backend)
        sources, combination = _sources(options), None
        if options.combine:
            with stages("combine", f"combine: {options.combine}"):
                sources, combination = combining.combine_into(options, sources, writer.tmp, stages.say)
        built = build(sources, stages, stack=mode.stacks, dump_ir=options.dump_ir, precision=choose)
        if backend.capabilities.precisions[built.precision] == "option" and built.precision != "fp32":
            backend = get_backend(options.target, {**options.target_options, "precision": built.precision})
        precision = precisions.record(built, backend, options.precision, options.max_error)
        with stages("optimize", f"optimize: {mode.label}"):
            optimized = mode.optimize(built, stages.context(options.dump_ir))
        sparsified = None
        if options.density:
            with stages("sparsify", f"sparsify: {', '.join(options.density)} (DEFT)"):
                optimized, sparsified = density.sparsify(options, built, optimized, stages.context(options.dump_ir))
        with stages("lower", f"lower: {options.target}"):
            memory.page_out(model_weights(built))  # those the optimized program replaced are not read again
            lowering = mode.lower(backend, optimized, built, writer.tmp, stages.say)
        if precision["how"] == "quantize":
            with stages("quantize", f"quantize: {built.precision}"):
                lowering, precision = quantizing.run(
                    backend, lowering, built, writer.tmp, precision, options, stages.say
                )
        optimized = dataclasses.replace(optimized, program=None)  # its new tensors (merged weights) are written
        if built.loaded.task == seq2seq.TEXT2TEXT:
            lowering = _with_encoder(options, lowering, built, writer.tmp, progress)
        if built.loaded.task and built.loaded.task != seq2seq.ENCODER and built.loaded.kind == "huggingface":
            copied = copy_model_files(Path(built.loaded.spec), writer.tmp, lowering.files)
            lowering = dataclasses.replace(lowering, files=(*lowering.files, *copied))
        if sparsified is not None:
            lowering = dataclasses.replace(lowering, target={**lowering.target, "density": sparsified})
        if built.head is not None:  # the prefix or prompt cache is data beside the base model's step
            record = prefix.write(built.head, writer.tmp, prefix.positions(built.head_adapter.source))
            target = {**lowering.target, "prefix": record}
            lowering = dataclasses.replace(lowering, files=(*lowering.files, record["file"]), target=target)
        target = manifests.target_record(options, optimized, lowering, writer.tmp, precision, built.fp32.base)
        compiled = manifests.Compiled(options, built, optimized, lowering, target)
        verify_with = lowering.lowered.verify_with
        verifier = get_backend(verify_with) if verify_with else backend
        checked = f" (its {verify_with} model)" if verify_with else ""
        with stages("verify", f"verify: artifact{checked} vs eager reference{' and PEFT' if options.oracle else ''}"):
            opening = partial(open_runner, verifier, writer.tmp, target, compiled.runtime_adapters())
            runner = DeferredRunner(opening, partial(model_weights, built))
            plans = density.plans(precisions.plans(built, options.oracle, precision), target)
            report = mode.verify(runner, built, target, plans, options.seed)
            report = prefix_check.with_head(report, runner, built, options.seed) if options.oracle else report
        manifest = compiled.manifest(report, stages.timings, backend)
        if combination is not None:
            manifest = combining.recorded(manifest, combination, writer.tmp, options.out)
        if not report.passed:
            if options.keep_failed:
                writer.commit(manifest)
            raise quantizing.explained(report.error(), precision)
        writer.commit(manifest)
        return Artifact(options.out, manifest)
    finally:
        writer.abort()


def _with_encoder(
    options: CompileOptions, lowering: Lowering, built: Any, directory: Path, progress: Progress | None
) -> Any:
    """Compile and verify the encoder program of a ``text2text-generation`` artifact into ``directory/encoder``
    (an artifact of its own, ``peftc/loaders/seq2seq.py``); the decoder step's manifest lists its files."""
    sub = dataclasses.replace(
        options, out=directory / seq2seq.ENCODER_DIR, task=seq2seq.ENCODER, force=False, keep_failed=False
    )
    encoder = compile_artifact(sub, progress)
    command = list(encoder.manifest.command or [])
    if "-o" in command:  # it rebuilds into the artifact's final place, not the temporary one
        command[command.index("-o") + 1] = str(options.out / seq2seq.ENCODER_DIR)
        manifest = dataclasses.replace(encoder.manifest, command=command)
        (directory / seq2seq.ENCODER_DIR / MANIFEST_FILE).write_text(manifest.to_json())
    names = [f["path"] for f in encoder.manifest.target["files"]] + [MANIFEST_FILE]
    files = tuple(f"{seq2seq.ENCODER_DIR}/{name}" for name in names)
    start = int(built.loaded.module.config.decoder_start_token_id)
    target = {**lowering.target, "generation": {"encoder": seq2seq.ENCODER_DIR, "decoder_start_token_id": start}}
    return dataclasses.replace(lowering, files=(*lowering.files, *files), target=target)


def reverify(
    path: Any, *, model: Any = None, oracle: bool = True, seed: int | None = None, progress: Progress | None = None
) -> Report:
    """Re-run the numeric check of the artifact at ``path`` against oracles rebuilt from its sources.

    As in a compile, the artifact's runtime is opened only when the artifact first runs, after every
    oracle ran and the model's file-mapped weights were paged out (:class:`DeferredRunner`); its files
    are hashed again then."""
    stages = Stages(progress)
    target = read_manifest(path).target
    runtime = target.get("verified_with") if target.get("verified_with") != target["name"] else None
    path, manifest, name = checked(path, allow_failed=True, runtime=runtime)
    backend = get_backend(name)
    mode = mode_from(manifest)
    precision = precisions.recorded(manifest.target)
    built = build(recorded(manifest, model), stages, stack=mode.stacks, precision=lambda loaded: precision)
    seed = manifest.options.get("seed", 0) if seed is None else seed
    with stages("verify", "verify: artifact vs eager reference" + (" and PEFT" if oracle else "")):
        runner = DeferredRunner(partial(_reopened, backend, path, manifest), partial(model_weights, built))
        plans = precisions.plans(built, oracle, manifest.target.get("precision") or {"budget": None})
        plans = density.plans(plans, manifest.target)
        report = mode.verify(runner, built, manifest.target, plans, seed)
        return prefix_check.with_head(report, runner, built, seed) if oracle else report


def _reopened(backend: Any, path: Path, manifest: Manifest) -> Any:
    """The runner of the artifact at ``path``, its files checked against ``manifest`` again first."""
    check_files(path, manifest)
    return open_runner(backend, path, manifest.target, manifest.adapters)


def mode_for(options: CompileOptions) -> Mode:
    """The build mode ``options`` ask for."""
    if options.swappable:
        return Swappable(options.max_rank, options.multi_adapter, options.slot_capacity, options.slot_dtype)
    if options.co_permute:
        return CoPermuted(seed=options.seed)
    embeddings, dequantize = options.quantize_embeddings, options.target == "trt"  # TensorRT reads no 4-bit layer
    if options.merge:
        return Merged(embeddings, dequantize, merge_policy=options.merge_policy, max_error=options.max_error)
    return Unmerged(embeddings=embeddings)


def mode_from(manifest: Manifest) -> Mode:
    """The build mode an artifact was compiled in (as far as verifying it goes)."""
    if "slots" in manifest.target:
        return Swappable()
    if "co_permute" in manifest.options:
        return CoPermuted(seed=manifest.options.get("seed", 0))
    return Merged() if manifest.options.get("merge", True) else Unmerged()


def _sources(options: CompileOptions) -> Sources:
    return Sources(
        model=options.model,
        adapters=options.adapters,
        configs=tuple(options.config_for(i) for i in range(len(options.adapters))),
        inputs=options.inputs,
        allow_pickle=options.allow_pickle,
        base_residual=options.base_residual,
        task_id=options.task_id,
        task=options.task,
    )
