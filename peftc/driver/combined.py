"""``peftc compile --combine M[:k=v,…]``: combine the ``--adapter`` arguments into one adapter, written
inside the artifact (``combined/``), and compile that.

The combined adapter is part of the artifact, so ``peftc verify`` rebuilds its oracles from it (its
sha256 is checked like any adapter's) without combining again. The manifest records the combination
under ``options.combine``: the method, its parameters and seed, and every input adapter's path and
sha256 (``peftc/combine/report.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from peftc.artifact import Manifest
from peftc.driver.build import Progress, Sources
from peftc.options import CompileOptions

FOLDER = "combined"


def combine_into(options: CompileOptions, sources: Sources, artifact_dir: Path, say: Progress) -> tuple[Sources, dict]:
    """Combine ``options.adapters`` into ``artifact_dir/combined``; the sources that compile it, and the
    combination's record for the manifest."""
    from peftc.combine.options import parse_spec
    from peftc.combine.run import combine

    spec = parse_spec(options.combine or "")
    configs = [options.config_for(i) for i in range(len(options.adapters))]
    report = combine(
        options.model,
        options.adapters,
        spec,
        artifact_dir / FOLDER,
        configs=configs,
        allow_pickle=options.allow_pickle,
        progress=say,
    )
    record = {k: v for k, v in report.to_json().items() if k not in ("tensors", "out")}
    record["spec"] = options.combine
    combined = dataclasses.replace(sources, adapters=(str(artifact_dir / FOLDER),), configs=(), names=(FOLDER,))
    return combined, record


def recorded(manifest: Manifest, record: dict[str, Any], tmp: Path, out: Path) -> Manifest:
    """``manifest`` with the combination recorded and the combined adapter's paths where the artifact
    will be (``out``) rather than where it is written (``tmp``)."""
    before, after = str(tmp.resolve()), str(out.resolve())

    def moved(entry: dict[str, Any]) -> dict[str, Any]:
        fields = ("path", "config_file", "weights_file")
        return {**entry, **{f: entry[f].replace(before, after, 1) for f in fields if isinstance(entry.get(f), str)}}

    return dataclasses.replace(
        manifest,
        options={**manifest.options, "combine": record},
        adapters=[moved(a) for a in manifest.adapters],
    )
