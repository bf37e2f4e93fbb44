"""The public entry points: :func:`compile` an adapted model, :func:`verify` an artifact again.

``compile`` runs load → trace → adapt (the reference program) → optimize → lower → verify → write,
timing each stage. Nothing reaches ``out`` before verification passes (see ``peftc.artifact.writer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from peftc import ir, swap
from peftc.artifact import SCHEMA_VERSION, ArtifactWriter, Manifest, file_record, read_manifest
from peftc.backends import get_backend
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders import InputSignature, LoadedModel, load_model
from peftc.methods import Adapter, ParseOptions, parse_adapter, read_adapter
from peftc.passes import PassContext, PassManager, PassRecord, pipelines
from peftc.verification import Report, peft_oracle, program_oracle
from peftc.verification import verify as run_verification

PathLike = str | os.PathLike[str]
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A compiled artifact on disk."""

    path: Path
    manifest: Manifest


@dataclasses.dataclass
class _Built:
    """Everything a compile derives before lowering (also what ``verify`` rebuilds)."""

    loaded: LoadedModel
    base: ir.Program
    adapters: list[Adapter]
    reference: ir.Program | None
    """The base with every adapter's sites, stacked; None for swappable artifacts (alternatives)."""
    records: list[PassRecord]


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
    swappable: bool = False,
    max_rank: int | None = None,
    multi_adapter: int = 0,
    oracle: bool = True,
    seed: int = 0,
    progress: Progress | None = None,
) -> Artifact:
    """Compile ``model`` with ``adapters`` into a verified artifact directory ``out``.

    Args:
        model: a Hugging Face model directory, ``pkg.module:factory``, a ``.pt2`` file, or an
            ``nn.Module`` / ``ExportedProgram`` object.
        adapters: PEFT adapter directories or ``.safetensors`` files, in stacking order.
        out: the artifact directory to create.
        target: ``onnx``, ``aoti`` (AOTInductor package) or ``trt`` (TensorRT engine).
        target_options: options of the target, as the CLI flags name them: ``device`` (aoti:
            ``cpu``/``cuda``); ``profile`` (a list of ``dim:min,opt,max``), ``precision``
            (``fp32``/``fp16``/``bf16``), ``refit``, ``strip_weights``, ``cache_dir`` (trt).
        merge: fold adapters into the base weights; ``False`` keeps them as separate ops.
        inputs: ``name:dims:dtype`` input descriptions overriding the derived ones.
        configs: ``adapter_config.json`` files for adapters given as bare weight files, by position.
        force: replace an existing ``out``.
        keep_failed: write the artifact, marked failed, even if verification fails.
        dump_ir: write the canonical graph after every pass into this directory.
        allow_pickle: accept pickled weight files (loaded with ``weights_only=True``).
        base_residual: ``model`` is the residual base a PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapter was
            trained on (saved after its initialisation), so it is used as is.
        swappable: keep LoRA sites as fixed-shape slots and write each adapter as a slot file, so
            adapters are added and switched without recompiling (``peftc/swap.py``); the adapters are
            then alternatives, not a stack.
        max_rank: slot rank for ``swappable`` (default: the largest given rank).
        multi_adapter: with ``swappable``, how many adapters one call can mix, one per batch row.
        oracle: also verify against Hugging Face PEFT when it is installed.
        seed: seed of the verification inputs.
        progress: called with a line of text as each stage starts.

    Raises:
        InputError, UnsupportedError: bad or unsupported input (exit code 2).
        VerificationError: the artifact disagrees with its oracles (exit code 1).
    """
    say = progress or (lambda message: None)
    paths = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    if not paths:
        raise InputError("no adapter given")
    timings: dict[str, float] = {}
    if (max_rank is not None or multi_adapter) and not swappable:
        raise InputError("--max-rank and --multi-adapter apply to --swappable artifacts only")
    if multi_adapter < 0 or (max_rank is not None and max_rank < 1):
        raise InputError("--multi-adapter must be >= 0 and --max-rank >= 1")
    writer = ArtifactWriter(out, force=force)
    try:
        backend = get_backend(target, target_options)
        if swappable and not backend.capabilities.slots:
            raise UnsupportedError(f"target {target!r} cannot build --swappable artifacts; use --target onnx or aoti")
        built = _build(
            model,
            paths,
            inputs,
            configs,
            allow_pickle,
            dump_ir,
            say,
            timings,
            base_residual=base_residual,
            stack=not swappable,
        )
        ctx = PassContext(dump_dir=Path(dump_ir) if dump_ir else None, progress=say)
        signature = built.loaded.signature
        table = None
        extra_target: dict[str, Any] = {}
        if swappable:
            with _stage(timings, "optimize", say, "optimize: adapter slots"):
                final, records, table = swap.build(
                    built.base, built.adapters, swap.SwapOptions(max_rank, multi_adapter), ctx
                )
            signature = swap.signature(signature, table)
        else:
            with _stage(timings, "optimize", say, "optimize: " + ("merge" if merge else "keep sites unmerged")):
                final, records = PassManager(pipelines.optimize(merge=merge)).run(
                    built.reference, ctx, history=[r.name for r in built.records]
                )
        with _stage(timings, "lower", say, f"lower: {target}"):
            overridable = swap.tensor_names(table) if table else ()
            extra = {"reference": built.reference} if getattr(backend, "uses_reference", False) else {}
            if overridable:
                extra["overridable"] = overridable
            lowered = backend.lower(final, signature, writer.tmp, say, **extra)
            files = list(lowered.files)
            if table is not None:
                adapter_files = swap.write_adapter_files(backend, writer.tmp, table, built.adapters)
                files += adapter_files
                names = {t: t for t in overridable}
                table = dataclasses.replace(
                    table, names={s.module: {p: names[table.fqn(s.module, p)] for p in ("A", "B")} for s in table.slots}
                )
                extra_target = {
                    "slots": table.to_json(),
                    "adapter_files": {a.name: f for a, f in zip(built.adapters, adapter_files, strict=True)},
                    "default_adapter": built.adapters[0].name,
                }
        verifier = get_backend(lowered.verify_with) if lowered.verify_with else backend
        checked = f" (its {lowered.verify_with} model)" if lowered.verify_with else ""
        with _stage(
            timings, "verify", say, f"verify: artifact{checked} vs eager reference" + (" and PEFT" if oracle else "")
        ):
            runner = verifier.load(writer.tmp, {"files": files, **dict(lowered.info), **extra_target})
            dtypes = {o["name"]: o.get("compute_dtype") or o["dtype"] for o in lowered.outputs}
            if table is None:
                report = _verify(runner, built, dtypes, oracle=oracle, seed=seed)
            else:
                report = _verify_swappable(runner, built, table, signature, dtypes, oracle=oracle, seed=seed)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            status="ok" if report.passed else "failed",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            peftc_version=_version(),
            versions=_versions(backend),
            command=_command(
                model,
                paths,
                configs,
                target,
                out,
                merge,
                inputs,
                allow_pickle,
                base_residual,
                target_options,
                table,
                multi_adapter,
            ),
            workdir=os.getcwd(),
            options={
                "target": target,
                "target_options": _options_json(target_options),
                "merge": merge,
                "seed": seed,
                "oracle": oracle,
                "inputs": list(inputs),
                "base_residual": base_residual,
                **({"stack": [a.name for a in built.adapters]} if not swappable else {}),
                **({"swappable": True, "max_rank": table.rank, "multi_adapter": multi_adapter} if table else {}),
            },
            model=_describe_model(built),
            adapters=[
                {**a.summary(), **({"slot_file": extra_target["adapter_files"][a.name]} if table else {})}
                for a in built.adapters
            ],
            pipeline=[r.to_json() for r in [*built.records, *records]],
            target={
                "name": target,
                "files": [file_record(writer.tmp / f, writer.tmp) for f in files],
                "inputs": list(lowered.inputs),
                "outputs": list(lowered.outputs),
                "signature": signature.to_json(),
                "verified_with": lowered.verify_with or target,
                **dict(lowered.info),
                **{k: v for k, v in extra_target.items() if k != "adapter_files"},
            },
            verification=report.to_json(),
            not_run=[{"what": what, "reason": why} for what, why in (*lowered.not_run, *report.not_run)],
            timings={k: round(v, 3) for k, v in timings.items()},
            warnings=[w for a in built.adapters for w in a.all_warnings()],
        )
        if not report.passed:
            error = VerificationError(_failure_line(report), render_table(report))
            if keep_failed:
                writer.commit(manifest)
            raise error
        writer.commit(manifest)
        return Artifact(Path(out), manifest)
    finally:
        writer.abort()


def verify(
    path: PathLike, *, model: Any = None, oracle: bool = True, seed: int | None = None, progress: Progress | None = None
) -> Report:
    """Re-run the numeric check of the artifact at ``path`` against freshly rebuilt oracles.

    The base model and adapters are loaded again from the sources the manifest names (``model``
    overrides the model, e.g. for artifacts built from an in-memory module).

    Raises:
        InputError: the sources are gone or changed (sha256 differs).
    """
    from peftc.runtime import load

    say = progress or (lambda message: None)
    recorded = read_manifest(path).target
    runtime = recorded.get("verified_with") if recorded.get("verified_with") != recorded["name"] else None
    runner = load(path, allow_failed=True, runtime=runtime)
    manifest = runner.manifest
    spec = _model_spec(manifest, model)
    _check_sources(manifest)
    paths = [a["path"] for a in manifest.adapters]
    configs = [a["config_file"] for a in manifest.adapters]
    timings: dict[str, float] = {}
    swappable = "slots" in manifest.target
    built = _build(
        spec,
        paths,
        manifest.options.get("inputs", []),
        configs,
        False,
        None,
        say,
        timings,
        manifest.workdir,
        base_residual=manifest.options.get("base_residual", False),
        stack=not swappable,
        names=[a["name"] for a in manifest.adapters],
    )
    dtypes = {o["name"]: o.get("compute_dtype") or o["dtype"] for o in manifest.target["outputs"]}
    seed = manifest.options.get("seed", 0) if seed is None else seed
    with _stage(timings, "verify", say, "verify: artifact vs eager reference" + (" and PEFT" if oracle else "")):
        if swappable:
            from peftc.slots import SlotTable

            signature = InputSignature.from_json(manifest.target["signature"])
            table = SlotTable.from_json(manifest.target["slots"])
            return _verify_swappable(runner.backend_runner, built, table, signature, dtypes, oracle=oracle, seed=seed)
        return _verify(
            runner.backend_runner,
            built,
            dtypes,
            oracle=oracle,
            seed=seed,
        )


def _build(
    model: Any,
    paths: Sequence[PathLike],
    inputs: Sequence[str],
    configs: Sequence[PathLike],
    allow_pickle: bool,
    dump_ir: PathLike | None,
    say: Progress,
    timings: dict[str, float],
    workdir: str | None = None,
    *,
    base_residual: bool = False,
    stack: bool = True,
    names: Sequence[str] | None = None,
) -> _Built:
    if configs and len(configs) not in (1, len(paths)):
        raise InputError(f"{len(configs)} --config files for {len(paths)} adapters; give one per adapter, in order")
    with _stage(timings, "adapters", say, f"read {len(paths)} adapter(s)"):
        sources = []
        for index, path in enumerate(paths):
            config = configs[index] if len(configs) == len(paths) else (configs[0] if configs else None)
            name = names[index] if names else None
            sources.append(read_adapter(path, name=name, config=config, allow_pickle=allow_pickle))
    with _stage(timings, "load", say, f"load model {model if isinstance(model, str) else type(model).__name__}"):
        loaded = load_model(model, inputs=list(inputs), allow_pickle=allow_pickle, workdir=workdir)
    with _stage(timings, "trace", say, "trace: torch.export"):
        base = loaded.program
        if base is None:
            signature: InputSignature = loaded.signature
            example = signature.example(signature.trace_sizes())
            base = ir.trace(loaded.module, example, signature.dynamic_shapes())
    with _stage(timings, "adapters", say, "match adapters to the model"):
        table = ir.module_table(base)
        options = ParseOptions(base_residual=base_residual, tied_embeddings=_tied_embeddings(loaded))
        adapters = [parse_adapter(source, table, options) for source in sources]
        _dedupe_names(adapters)
    if not stack:  # alternatives (swappable): each adapter gets its own reference program when verified
        return _Built(loaded, base, adapters, None, [])
    ctx = PassContext(dump_dir=Path(dump_ir) if dump_ir else None, progress=say)
    with _stage(timings, "adapt", say, "adapt: insert adapter sites"):
        reference, records = PassManager(pipelines.adapt(adapters)).run(base, ctx)
    return _Built(loaded, base, adapters, reference, records)


def _tied_embeddings(loaded: LoadedModel) -> bool | None:
    """Whether the model declares tied input/output embeddings (None: unknown for exported programs)."""
    if loaded.module is None:
        return None
    return bool(getattr(getattr(loaded.module, "config", None), "tie_word_embeddings", False))


def _verify(runner: Any, built: _Built, dtypes: dict[str, str], *, oracle: bool, seed: int) -> Report:
    oracles = {"reference": program_oracle(built.reference)}
    not_run = []
    if not oracle:
        not_run.append(("peft oracle", "disabled (--no-oracle)"))
    elif built.loaded.module is None:
        not_run.append(("peft oracle", "the base is an exported program; PEFT needs the nn.Module"))
    else:
        fn, why = peft_oracle(built.loaded.module, built.adapters)
        if fn is None:
            not_run.append(("peft oracle", why))
        else:
            oracles["peft"] = fn

    def artifact(inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return runner.run({k: v.numpy() for k, v in inputs.items()})

    return run_verification(
        artifact,
        built.loaded.signature,
        oracles,
        base=program_oracle(built.base),
        dtypes=dtypes,
        seed=seed,
        not_run=not_run,
    )


def _verify_swappable(
    runner: Any,
    built: _Built,
    table: Any,
    signature: InputSignature,
    dtypes: dict[str, str],
    *,
    oracle: bool,
    seed: int,
) -> Report:
    """The base and every adapter (against its own eager reference program and PEFT), and a mixed batch."""
    references: dict[str, dict[str, Any]] = {}
    not_run = []
    for adapter in built.adapters:
        program, _ = PassManager(pipelines.adapt([adapter])).run(built.base, PassContext())
        references[adapter.name] = {"reference": program_oracle(program)}
        if oracle and built.loaded.module is not None:
            fn, why = peft_oracle(built.loaded.module, [adapter])
            if fn is not None:
                references[adapter.name]["peft"] = fn
            else:
                not_run.append((f"peft oracle [{adapter.name}]", why))
    if not oracle:
        not_run.append(("peft oracle", "disabled (--no-oracle)"))
    elif built.loaded.module is None:
        not_run.append(("peft oracle", "the base is an exported program; PEFT needs the nn.Module"))
    return swap.verify_artifact(
        runner, signature, table, program_oracle(built.base), references, dtypes=dtypes, seed=seed, not_run=not_run
    )


def render_table(report: Report) -> str:
    """The verification report as a text table."""
    from peftc.report import verification_table

    return verification_table(report.to_json())


def _failure_line(report: Report) -> str:
    worst = max(
        ((c, o) for c in report.cases for o in c.outputs if not o.ok),
        key=lambda pair: pair[1].max_rel,
    )
    case, out = worst
    return (
        f"verification failed: output {out.name!r} vs {case.oracle} at {dict(case.sizes)}: "
        f"max abs {out.max_abs:.3g} (tol {out.tolerance.abs:g}), max rel {out.max_rel:.3g} "
        f"(tol {out.tolerance.rel:g}){' — ' + out.note if out.note else ''}"
    )


@contextlib.contextmanager
def _stage(timings: dict[str, float], key: str, say: Progress, message: str) -> Iterator[None]:
    say(message)
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _dedupe_names(adapters: list[Adapter]) -> None:
    seen: dict[str, int] = {}
    for index, adapter in enumerate(adapters):
        count = seen.get(adapter.name, 0)
        seen[adapter.name] = count + 1
        if count:
            adapters[index] = dataclasses.replace(adapter, name=f"{adapter.name}_{count + 1}")


def _describe_model(built: _Built) -> dict[str, Any]:
    loaded = built.loaded
    return {
        "spec": loaded.spec,
        "kind": loaded.kind,
        "class": loaded.class_name,
        "files": loaded.files,
        "state_sha256": ir.state_digest(built.base),
        "parameters": sum(t.numel() for t in built.base.state_dict.values()),
    }


def _model_spec(manifest: Manifest, model: Any = None) -> Any:
    """What to load as the base: ``model`` if given, else the manifest's spec (relative to its workdir)."""
    spec = model if model is not None else manifest.model["spec"]
    if isinstance(spec, str) and spec.startswith("<"):
        raise InputError("the artifact was built from an in-memory model; pass that model (model=...)")
    if isinstance(spec, str) and not Path(spec).is_absolute() and (Path(manifest.workdir) / spec).exists():
        spec = str(Path(manifest.workdir) / spec)  # a path relative to where the artifact was built
    return spec


def load_base_for_verify(manifest: Manifest, model: Any = None) -> LoadedModel:
    """The artifact's base model, loaded again (not traced), its files checked against the manifest.

    Raises:
        InputError: the model cannot be loaded, or a file it was read from changed since the compile.
    """
    loaded = load_model(
        _model_spec(manifest, model), inputs=manifest.options.get("inputs", []), workdir=manifest.workdir
    )
    for name, digest in manifest.model.get("files", {}).items():
        if loaded.files.get(name) not in (None, digest):
            raise InputError(f"{manifest.model['spec']}: {name} changed since the artifact was built (sha256 differs)")
    return loaded


def _check_sources(manifest: Manifest) -> None:
    from peftc.hashing import sha256_file

    for adapter in manifest.adapters:
        for role, key in (("config", "config_file"), ("weights", "weights_file")):
            path = Path(adapter[key])
            if not path.is_file():
                raise InputError(f"{path}: adapter {adapter['name']!r} source is gone; cannot rebuild the reference")
            if sha256_file(path) != adapter["sha256"][role]:
                raise InputError(f"{path}: changed since the artifact was built (sha256 differs)")


def _command(
    model: Any,
    paths: Sequence[PathLike],
    configs: Sequence[PathLike],
    target: str,
    out: PathLike,
    merge: bool,
    inputs: Sequence[str],
    allow_pickle: bool,
    base_residual: bool,
    target_options: Mapping[str, Any] | None = None,
    table: Any = None,
    multi_adapter: int = 0,
) -> list[str] | None:
    if not isinstance(model, (str, os.PathLike)):
        return None
    command = ["peftc", "compile", str(model)]
    for path in paths:
        command += ["--adapter", str(path)]
    for config in configs:
        command += ["--config", str(config)]
    for text in inputs:
        command += ["--input", text]
    command += ["--target", target, "-o", str(out), "--force"]
    if not merge:
        command.append("--no-merge")
    if allow_pickle:
        command.append("--allow-pickle")
    if base_residual:
        command.append("--base-residual")
    for name, value in _options_json(target_options).items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif isinstance(value, list):
            for item in value:
                command += [flag, str(item)]
        else:
            command += [flag, str(value)]
    if table is not None:
        command += ["--swappable", "--max-rank", str(table.rank)]
        if multi_adapter:
            command += ["--multi-adapter", str(multi_adapter)]
    return command


def _options_json(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Target options as given (unset ones dropped), JSON-ready: ``{"precision": "fp16", "profile": [...]}``."""
    out: dict[str, Any] = {}
    for name, value in sorted((options or {}).items()):
        if value in (None, False, (), []):
            continue
        text = lambda v: v.text() if hasattr(v, "text") else str(v)  # noqa: E731  (a DimProfile or its text)
        out[name] = [text(v) for v in value] if isinstance(value, (list, tuple)) else value
    return out


def _version() -> str:
    from peftc import __version__

    return __version__


def _versions(backend: Any) -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    versions.update(backend.versions())
    return versions
