"""Swappable artifacts: compile once, then add, remove and switch LoRA adapters without recompiling.

``peftc compile … --swappable`` builds the base program with a zero *slot* on every LoRA site of the
adapters it is given (``peftc/slots.py``, ``peftc/ops/slots.py``), lowers it with the slot tensors
as overridable inputs, and writes every given adapter as a slot file under ``adapters/``. The
zero slots are the base model; an adapter file fills them. ``--multi-adapter N`` stacks ``N`` slots
(row 0 the base) into banks read per batch row through an ``adapter_index`` input.

Verification covers the base (no adapter) against the eager base program and every adapter against
its own eager reference program and PEFT; with a bank, also one mixed batch against per-row eager
outputs. :func:`add_adapter` checks a new adapter against the slot table, writes its file, verifies
it the same way against eager PyTorch of the base module with the adapter's weights applied by
peftc's ops (no tracing) and against PEFT, and commits the manifest atomically; on any failure the
artifact is left exactly as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc import ir, slots
from peftc.artifact import MANIFEST_FILE, Manifest, check_files, file_record, read_manifest
from peftc.backends import get_backend
from peftc.errors import InputError, UnsupportedError, VerificationError
from peftc.loaders.inputs import InputSignature, TensorInput
from peftc.methods.base import Adapter
from peftc.passes import EliminateDeadCodePass, InsertSitesPass, PassContext, PassManager, pipelines
from peftc.verification import Report, peft_oracle, program_oracle, verify
from peftc.verification.oracles import Oracle, weights_oracle

ADAPTER_DIR = "adapters"
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class SwapOptions:
    """What ``--swappable`` was asked for."""

    max_rank: int | None = None
    """Slot rank; default: the largest rank of the given adapters."""
    bank: int = 0
    """``--multi-adapter N``: adapters one call can mix (the bank holds N + 1 slots with the base)."""


def build(base: ir.Program, adapters: Sequence[Adapter], options: SwapOptions, ctx: PassContext):
    """The slotted program, the pass records and the slot table."""
    table = slots.plan(adapters, options.max_rank, options.bank + 1 if options.bank else 0)
    program, records = PassManager([InsertSitesPass((slots.slot_adapter(table),)), EliminateDeadCodePass()]).run(
        base, ctx
    )
    return program, records, table


def signature(base: InputSignature, table: slots.SlotTable) -> InputSignature:
    """The artifact's inputs: the base's, plus ``adapter_index`` ``[batch]`` with a bank."""
    if not table.bank:
        return base
    if "batch" not in base.dims:
        raise UnsupportedError("--multi-adapter needs a 'batch' dim in the model's inputs (describe it with --input)")
    index = TensorInput(slots_index(), ("batch",), "int64", "index", 0, table.bank)
    return InputSignature((*base.inputs, index), base.dims)


def slots_index() -> str:
    from peftc.ops.slots import INDEX_INPUT

    return INDEX_INPUT


def tensor_names(table: slots.SlotTable) -> list[str]:
    """The program's slot tensors (the names the lowered model must keep overridable)."""
    return [table.fqn(s.module, part) for s in table.slots for part in ("A", "B")]


def slot_values(table: slots.SlotTable, adapter: Adapter | None) -> dict[str, np.ndarray]:
    """An adapter's slot file contents: single-slot names → arrays (banks are assembled at run time)."""
    single = dataclasses.replace(table, bank=0)
    return {single.fqn(*key.split(":")): value.numpy() for key, value in slots.pack(table, adapter).items()}


def write_adapter_files(
    backend: Any, directory: Path, table: slots.SlotTable, adapters: Sequence[Adapter]
) -> list[str]:
    """Write one slot file per adapter; return their paths relative to ``directory``."""
    (directory / ADAPTER_DIR).mkdir(exist_ok=True)
    files = []
    for adapter in adapters:
        relative = f"{ADAPTER_DIR}/{adapter.name}{backend.adapter_suffix}"
        backend.write_adapter(directory / relative, slot_values(table, adapter))
        files.append(relative)
    return files


# --------------------------------------------------------------------------------------------
# verification


def verify_artifact(
    runner: Any,
    signature_: InputSignature,
    table: slots.SlotTable,
    base: Oracle,
    references: Mapping[str, Mapping[str, Oracle]],
    *,
    dtypes: Mapping[str, str],
    seed: int,
    not_run: Sequence[tuple[str, str]] = (),
) -> Report:
    """The base (no adapter) and every adapter (its named oracles), and a mixed batch with a bank."""

    def run(adapter: Any) -> Callable[[Mapping[str, torch.Tensor]], Mapping[str, np.ndarray]]:
        return lambda inputs: runner.run({k: v.numpy() for k, v in inputs.items()}, adapter=adapter)

    plain = _without_index(signature_)
    reports = [verify(run(None), plain, {"base": base}, dtypes=dtypes, seed=seed)]
    for name, oracles in references.items():
        report = verify(
            run(name), plain, {f"{o}[{name}]": fn for o, fn in oracles.items()}, base=base, dtypes=dtypes, seed=seed
        )
        reports.append(dataclasses.replace(report, effect={f"{name}: {k}": v for k, v in report.effect.items()}))
    if table.bank and references:
        names = list(references)
        for start in range(0, len(names), table.bank - 1):  # as many adapters per batch as the bank holds
            group = {n: references[n] for n in names[start : start + table.bank - 1]}
            reports.append(_verify_mixed(runner, plain, table, base, group, dtypes, seed))
    return Report(
        tuple(c for r in reports for c in r.cases),
        {k: v for r in reports for k, v in r.effect.items()},
        tuple(not_run),
    )


def _without_index(signature_: InputSignature) -> InputSignature:
    return InputSignature(tuple(i for i in signature_.inputs if i.name != slots_index()), signature_.dims)


def _verify_mixed(runner, plain, table, base, references, dtypes, seed) -> Report:
    """One batch whose rows use the base and every adapter in turn, against per-row eager outputs."""
    names = [None, *references]
    choice = names * 2
    sizes = {**plain.cases(1)[0], "batch": len(choice)}
    first = {n: next(iter(o.values())) for n, o in references.items()}

    def expected(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        per = {n: (first[n] if n else base)(inputs) for n in names}
        return {out: np.stack([per[n][out][row] for row, n in enumerate(choice)]) for out in per[None]}

    def artifact(inputs: Mapping[str, torch.Tensor]) -> Mapping[str, np.ndarray]:
        return runner.run({k: v.numpy() for k, v in inputs.items()}, adapter=choice)

    cases_signature = dataclasses.replace(plain, dims={**plain.dims})
    report = verify(
        artifact, _fixed(cases_signature, sizes), {"mixed batch": expected}, dtypes=dtypes, seed=seed, cases=1
    )
    return report


def _fixed(signature_: InputSignature, sizes: Mapping[str, int]) -> InputSignature:
    """A signature whose first verification case is ``sizes``."""
    from peftc.loaders.inputs import DimSpec

    dims = {k: DimSpec(k, sizes[k], sizes[k]) for k in signature_.dims}
    return InputSignature(signature_.inputs, dims)


# --------------------------------------------------------------------------------------------
# adding and removing adapters


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
    as a slot file, and verified (artifact with the adapter vs eager PyTorch of the base with the
    adapter's weights applied, and vs PEFT) before the manifest is replaced atomically.

    Raises:
        InputError: not a swappable artifact, the name is taken, or the adapter does not fit the
            slots (the message names the module, rank or shape); the artifact is unchanged.
        VerificationError: the artifact with the adapter disagrees with its oracles; unchanged too.
    """
    from peftc.api import load_base_for_verify
    from peftc.methods import ParseOptions, parse_adapter, read_adapter
    from peftc.runtime import load

    say = progress or (lambda message: None)
    directory = Path(out)
    manifest = _swappable(directory)
    table = slots.SlotTable.from_json(manifest.target["slots"])
    source = read_adapter(adapter, name=name, config=config, allow_pickle=allow_pickle)
    if source.name in {a["name"] for a in manifest.adapters}:
        raise InputError(
            f"{directory}: an adapter named {source.name!r} exists; remove it first or pass another --name"
        )
    say("load the base model (no tracing)")
    loaded = load_base_for_verify(manifest, model)
    modules = (
        ir.module_table(loaded.program) if loaded.program is not None else ir.module_table_from_module(loaded.module)
    )
    parsed = parse_adapter(
        source,
        modules,
        ParseOptions(
            tied_embeddings=None
            if loaded.module is None
            else bool(getattr(getattr(loaded.module, "config", None), "tie_word_embeddings", False))
        ),
    )
    slots.check_fits(table, parsed)
    backend = get_backend(manifest.target["name"])
    relative = f"{ADAPTER_DIR}/{parsed.name}{backend.adapter_suffix}"
    final = directory / relative
    tmp = directory / ADAPTER_DIR / f".{parsed.name}.peftc-tmp{backend.adapter_suffix}"
    try:
        backend.write_adapter(tmp, slot_values(table, parsed))
        say(f"verify: artifact with {parsed.name!r} vs eager PyTorch" + (" and PEFT" if oracle else ""))
        runner = load(directory).backend_runner
        runner.register(parsed.name, tmp)
        report = _verify_added(runner, manifest, table, loaded, parsed, oracle)
        if not report.passed:
            from peftc.api import _failure_line, render_table

            raise VerificationError(_failure_line(report), render_table(report))
        os.replace(tmp, final)
        entry = {**parsed.summary(), "slot_file": relative, "verification": report.to_json(), "added": True}
        updated = dataclasses.replace(
            manifest,
            adapters=[*manifest.adapters, entry],
            target={**manifest.target, "files": [*manifest.target["files"], file_record(final, directory)]},
            not_run=[*manifest.not_run, *({"what": f"{w} [{parsed.name}]", "reason": r} for w, r in report.not_run)],
        )
        _commit(directory, updated)
        return updated
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if final.exists() and relative not in {f["path"] for f in read_manifest(directory).target["files"]}:
            final.unlink()
        raise


def remove_adapter(out: str | os.PathLike[str], name: str) -> Manifest:
    """Remove adapter ``name`` and its slot file from the swappable artifact ``out``.

    Raises:
        InputError: not a swappable artifact, or no adapter of that name.
    """
    directory = Path(out)
    manifest = _swappable(directory)
    entry = next((a for a in manifest.adapters if a["name"] == name), None)
    if entry is None:
        names = ", ".join(repr(a["name"]) for a in manifest.adapters) or "none"
        raise InputError(f"{directory}: no adapter named {name!r} (adapters: {names})")
    updated = dataclasses.replace(
        manifest,
        adapters=[a for a in manifest.adapters if a["name"] != name],
        target={
            **manifest.target,
            "files": [f for f in manifest.target["files"] if f["path"] != entry["slot_file"]],
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


def _commit(directory: Path, manifest: Manifest) -> None:
    """Replace ``manifest.json`` atomically (write a temporary file, then rename it over)."""
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
        os.replace(tmp, directory / MANIFEST_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _verify_added(
    runner: Any, manifest: Manifest, table: slots.SlotTable, loaded: Any, adapter: Adapter, oracle: bool
) -> Report:
    signature_ = InputSignature.from_json(manifest.target["signature"])
    dtypes = {o["name"]: o["dtype"] for o in manifest.target["outputs"]}
    not_run = []
    if loaded.module is not None:
        base = weights_oracle(loaded.module, [])
        oracles = {"reference": weights_oracle(loaded.module, [adapter])}
        if oracle:
            fn, why = peft_oracle(loaded.module, [adapter])
            if fn is None:
                not_run.append(("peft oracle", why))
            else:
                oracles["peft"] = fn
        else:
            not_run.append(("peft oracle", "disabled (--no-oracle)"))
    else:
        base = program_oracle(loaded.program)
        reference, _ = PassManager(pipelines.adapt([adapter])).run(loaded.program, PassContext())
        oracles = {"reference": program_oracle(reference)}
        not_run.append(("peft oracle", "the base is an exported program; PEFT needs the nn.Module"))
    return verify_artifact(
        runner,
        signature_,
        table,
        base,
        {adapter.name: oracles},
        dtypes=dtypes,
        seed=manifest.options.get("seed", 0),
        not_run=not_run,
    )
