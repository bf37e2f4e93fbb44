"""Adding and removing adapters of a swappable artifact, without recompiling.

:func:`add_adapter` parses the new adapter against the base model's modules (loaded again, not
traced), checks it against the slot table, writes its adapter file, verifies the artifact with it
against eager PyTorch of the base module with the adapter's weights applied by peftc's ops and
against PEFT, and commits the manifest atomically; on any failure the artifact is left exactly as it
was. :func:`remove_adapter` drops an adapter and its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from peftc import ir
from peftc.artifact import MANIFEST_FILE, Manifest, check_files, file_record, read_manifest
from peftc.backends import get_backend
from peftc.driver.build import adapted, in_precision
from peftc.driver.sources import load_base
from peftc.errors import InputError
from peftc.loaders import LoadedModel, identity
from peftc.loaders.inputs import InputSignature
from peftc.methods.base import Adapter, ParseOptions
from peftc.methods.loading import read_adapter
from peftc.methods.registry import parse_adapter
from peftc.runtime import open_runner
from peftc.swap import pair
from peftc.swap.files import ADAPTER_DIR, relative_path, slot_values
from peftc.swap.slots import check_fits
from peftc.swap.table import SlotTable
from peftc.swap.verify import verify_artifact, widened
from peftc.verification import OraclePlan, Report, Tolerance, output_dtypes, program_oracle
from peftc.verification.oracles import weights_oracle

Progress = Callable[[str], None]
TEMP_MARK = ".peftc-tmp"
"""In the name of every temporary file a change writes into the artifact (removed by the next change)."""


def add_adapter(
    out: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    *,
    name: str | None = None,
    config: str | os.PathLike[str] | None = None,
    model: Any = None,
    allow_pickle: bool = False,
    oracle: bool = True,
    progress: Progress | None = None,
) -> Manifest:
    """Add a LoRA adapter to the swappable artifact ``out`` without recompiling it.

    The adapter is parsed against the base model's modules, checked against the slot table, written
    as an adapter file, and verified (artifact with the adapter vs eager PyTorch of the base with the
    adapter's weights applied, and vs PEFT) before the manifest is replaced atomically. A text2text
    artifact gets it in its encoder program, then its decoder step (``peftc/swap/pair.py``).

    Raises:
        InputError: not a swappable artifact, the name is taken, or the adapter does not fit the
            slots (the message names the module, rank or shape); the artifact is unchanged.
        VerificationError: the artifact with the adapter disagrees with its oracles; unchanged too.
    """
    directory = Path(out)
    reading = (adapter, name, config, model, allow_pickle, oracle, progress or (lambda message: None))
    with _changing(directory):
        manifest = _swappable(directory)
        encoder = pair.encoder_of(directory, manifest)
        if encoder is None:
            return _add(directory, manifest, *reading)
        with _changing(encoder):  # text2text: the encoder program first, then the decoder step
            inner = _swappable(encoder)
            own, other = pair.other_tables(manifest, inner)
            reading[-1]("encoder program")
            added = _add(encoder, inner, *reading, other=own)
            named = added.adapters[-1]["name"]
            try:
                reading[-1]("decoder step")
                return _add(directory, manifest, adapter, named, *reading[2:], other=other, encoder=encoder)
            except BaseException:
                _remove(encoder, _swappable(encoder), named)
                raise


def _add(
    directory: Path,
    manifest: Manifest,
    adapter: str | os.PathLike[str],
    name: str | None,
    config: str | os.PathLike[str] | None,
    model: Any,
    allow_pickle: bool,
    oracle: bool,
    say: Progress,
    *,
    other: SlotTable | None = None,
    encoder: Path | None = None,
) -> Manifest:
    """Add ``adapter`` to the (checked) artifact at ``directory``; ``other``: the slot table of the other
    program of a text2text artifact, ``encoder``: its encoder program, when ``directory`` is the decoder step's."""
    table = SlotTable.from_json(manifest.target["slots"])
    source = read_adapter(adapter, name=name, config=config, allow_pickle=allow_pickle)
    if source.name in {a["name"] for a in manifest.adapters}:
        raise InputError(
            f"{directory}: an adapter named {source.name!r} exists; remove it first or pass another --name"
        )
    say("load the base model (no tracing)")
    loaded = load_base(manifest, model)
    modules = (
        ir.module_table(loaded.program) if loaded.program is not None else ir.module_table_from_module(loaded.module)
    )
    moved: tuple[tuple[str, str], ...] = ()
    if other is not None:  # the keys of modules only the other program has slots for are its own
        modules, (source, moved) = pair.own_part(source, modules, loaded.module, table, other)
    parsed = parse_adapter(source, modules, ParseOptions(tied_embeddings=loaded.tied_embeddings))
    parsed = identity.checked([dataclasses.replace(parsed, unused=(*parsed.unused, *moved))], loaded, say)[0]
    check_fits(table, parsed)
    backend = get_backend(manifest.target["name"])
    relative = relative_path(backend, parsed.name)
    final = directory / relative
    if relative in {f["path"] for f in manifest.target["files"]}:
        raise InputError(f"{final}: another adapter's file is there; pass another --name")
    tmp = final.with_name(f".{parsed.name}{TEMP_MARK}{backend.adapter_suffix}")
    try:
        backend.write_adapter(tmp, slot_values(table, parsed))
        say(f"verify: artifact with {parsed.name!r} vs eager PyTorch" + (" and PEFT" if oracle else ""))
        runner = open_runner(backend, directory, manifest.target, manifest.adapters)
        runner.register(parsed.name, tmp)
        report = _verify_added(runner, manifest, table, loaded, parsed, oracle)
        if not report.passed:
            raise report.error()
        os.replace(tmp, final)
        entry = {**parsed.summary(), "slot_file": relative, "verification": report.to_json(), "added": True}
        files = [*manifest.target["files"], file_record(final, directory)]
        updated = dataclasses.replace(
            manifest,
            adapters=[*manifest.adapters, entry],
            target={**manifest.target, "files": pair.refreshed(directory, files, encoder) if encoder else files},
            not_run=[*manifest.not_run, *({"what": f"{w} [{parsed.name}]", "reason": r} for w, r in report.not_run)],
        )
        _commit(directory, updated)
        return updated
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if os.path.lexists(final) and relative not in {f["path"] for f in read_manifest(directory).target["files"]}:
            final.unlink()
        raise


def remove_adapter(out: str | os.PathLike[str], name: str) -> Manifest:
    """Remove adapter ``name`` and its adapter file from the swappable artifact ``out`` (from both programs
    of a text2text artifact).

    Raises:
        InputError: not a swappable artifact, or no adapter of that name.
    """
    directory = Path(out)
    with _changing(directory):
        manifest = _swappable(directory)
        encoder = pair.encoder_of(directory, manifest)
        if encoder is None:
            return _remove(directory, manifest, name)
        _entry(directory, manifest, name)
        with _changing(encoder):  # text2text: from both programs
            _remove(encoder, _swappable(encoder), name)
            return _remove(directory, manifest, name, encoder)


def _entry(directory: Path, manifest: Manifest, name: str) -> dict[str, Any]:
    entry = next((a for a in manifest.adapters if a["name"] == name), None)
    if entry is None:
        names = ", ".join(repr(a["name"]) for a in manifest.adapters) or "none"
        raise InputError(f"{directory}: no adapter named {name!r} (adapters: {names})")
    return entry


def _remove(directory: Path, manifest: Manifest, name: str, encoder: Path | None = None) -> Manifest:
    entry = _entry(directory, manifest, name)
    files = [f for f in manifest.target["files"] if f["path"] != entry["slot_file"]]
    updated = dataclasses.replace(
        manifest,
        adapters=[a for a in manifest.adapters if a["name"] != name],
        target={
            **manifest.target,
            "files": pair.refreshed(directory, files, encoder) if encoder else files,
            "default_adapter": None
            if manifest.target.get("default_adapter") == name
            else manifest.target.get("default_adapter"),
        },
    )
    _commit(directory, updated)
    with contextlib.suppress(OSError):
        (directory / entry["slot_file"]).unlink()
    return updated


def _swappable(directory: Path) -> Manifest:
    manifest = read_manifest(directory)
    if "slots" not in manifest.target:
        raise InputError(f"{directory}: not a swappable artifact (compile it with --swappable)")
    if manifest.status != "ok":
        raise InputError(f"{directory}: this artifact failed verification; recompile it")
    check_files(directory, manifest)
    return manifest


@contextlib.contextmanager
def _changing(directory: Path) -> Iterator[None]:
    """Hold the artifact's lock while it changes, first removing the temporary files of a killed change.

    Raises:
        InputError: not a directory, or another add-adapter/remove-adapter is changing it.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise InputError(f"{directory}: not an artifact directory ({e.strerror or e})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise InputError(
                f"{directory}: another peftc add-adapter/remove-adapter is changing it; retry after"
            ) from e
        read_manifest(directory)  # a peftc artifact: only then are its temporary files removed
        for folder in (directory, directory / ADAPTER_DIR):
            for path in folder.glob(f".*{TEMP_MARK}*"):
                if path.is_file() and not path.is_symlink():
                    path.unlink()
        yield
    finally:
        os.close(fd)


def _commit(directory: Path, manifest: Manifest) -> None:
    """Replace ``manifest.json`` atomically (write a temporary file, then rename it over), keeping
    the permission bits of the one it replaces."""
    mode = stat.S_IMODE((directory / MANIFEST_FILE).stat().st_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}{TEMP_MARK}-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
        os.replace(tmp, directory / MANIFEST_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _verify_added(
    runner: Any, manifest: Manifest, table: SlotTable, loaded: LoadedModel, adapter: Adapter, peft: bool
) -> Report:
    """The base and the new adapter: against the untraced base module in fp32 with the adapter's
    weights applied (the traced base program for an exported one) and PEFT, within the artifact's
    budget when it computes in a reduced precision, widened by its slot storage's (``storage.py``)."""
    budget = (manifest.target.get("precision") or {}).get("budget")
    module = in_precision(loaded.module, "fp32") if loaded.module is not None else None
    plan = OraclePlan(module, peft, Tolerance(None, budget) if budget else None)
    if module is not None:
        base = weights_oracle(module, [])
        reference = weights_oracle(module, [adapter])
    else:
        base = program_oracle(loaded.program)
        reference = program_oracle(adapted(loaded.program, [adapter]))
    oracles, not_run = plan.oracles(reference, [adapter])
    stored = widened(plan.tolerance, table)  # the error fp16/int8 slot files may add
    names = {"mixed batch", *(f"{o}[{adapter.name}]" for o in oracles)}
    return verify_artifact(
        runner,
        InputSignature.from_json(manifest.target["signature"]).in_dtype(torch.float32),
        table,
        base,
        {adapter.name: oracles},
        dtypes=output_dtypes(manifest.target["outputs"]),
        seed=manifest.options.get("seed", 0),
        not_run=[*not_run, *plan.not_run()],
        tolerances={"base": plan.tolerance, **dict.fromkeys(names, stored)},
    )
