"""``peftc --version``, ``peftc methods`` and ``peftc targets``: what this peftc reads and where it can build.

Everything printed is derived, never listed by hand: the methods from their records
(``peftc.methods.registry.METHODS``: ``peft_type`` values, site ops and the config fields each parser
honours, ignores and refuses), the targets from ``peftc.backends.BACKENDS`` and each backend's own
``available()`` and capabilities, checked on this machine. The versions are the installed
distributions' (``importlib.metadata``), so ``--version`` imports none of them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import peftc
from peftc.report import table

LIBRARIES = ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime")
"""What ``--version`` reports after peftc, by import name; then the TensorRT module(s) installed."""
TENSORRT = ("tensorrt", "tensorrt_rtx")
"""``peftc.backends.tensorrt.install.MODULES``, named here because importing that package imports torch."""

TARGET_VARIANTS: dict[str, tuple[dict[str, str], ...]] = {"aoti": ({"device": "cpu"}, {"device": "cuda"})}
"""Targets whose options change what they need (one ``peftc targets`` row each); others get one row."""


def versions() -> list[tuple[str, str | None]]:
    """``(import name, version or None when not installed)``: peftc, :data:`LIBRARIES`, then each
    TensorRT module installed (one ``tensorrt`` line with None when there is none)."""
    providers = metadata.packages_distributions()

    def version(name: str) -> str | None:
        for distribution in providers.get(name, ()):
            try:
                return metadata.version(distribution)
            except metadata.PackageNotFoundError:
                continue
        return None

    found: list[tuple[str, str | None]] = [("peftc", peftc.__version__)]
    found += [(name, version(name)) for name in LIBRARIES]
    trt = [(name, version(name)) for name in TENSORRT if version(name)]
    return found + (trt or [(TENSORRT[0], None)])


class VersionAction(argparse.Action):
    """``--version``: print peftc's version, then the libraries it compiles with, one per line; exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the versions of peftc and the libraries it uses, and exit")
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print("\n".join(f"{name} {version or 'not installed'}" for name, version in versions()))
        parser.exit()


def methods() -> list[dict[str, Any]]:
    """The adapter formats peftc reads, one record each, from the method records."""
    from peftc.methods.registry import METHODS

    found = []
    for method in METHODS:
        if not method.peft_types:  # not an adapter format (swappable artifacts' slot ops)
            continue
        fields = method.fields
        found.append(
            {
                "name": method.name,
                "peft_types": list(method.peft_types),
                "ops": [f"peftc::{op.name}" for op in method.ops],
                "options": list(fields.honoured) if fields else [],
                "ignored": dict(fields.ignored) if fields else {},
                "refused": dict(fields.unsupported) if fields else {},
                "reads_without_config": method.recognise is not None,
            }
        )
    return found


def methods_text(found: Sequence[dict[str, Any]]) -> str:
    """``peftc methods`` for people: a table of methods, then each one's options and refused fields."""
    rows = [[m["name"], ", ".join(m["peft_types"]), ", ".join(m["ops"]) or "-"] for m in found]
    lines = [table(["method", "peft_type", "site ops"], rows), "", "options (config fields that change the math):"]
    lines += [f"  {m['name']}: {', '.join(m['options']) or '-'}" for m in found]
    refused = [(m["name"], field, why) for m in found for field, why in m["refused"].items()]
    if refused:
        lines += ["", "refused when set:"]
        lines += [f"  {name}: {field}: {why}" for name, field, why in refused]
    lines += ["", "Other fields of PEFT's configs do not change inference (recorded with the reason when compiled)."]
    return "\n".join(lines) + "\n"


def targets() -> list[dict[str, Any]]:
    """Each target (and device) with what it needs, what it builds, and whether it is usable on this
    machine (its backend's ``available()``; for ``trt`` also a GPU it builds engines for), and why not."""
    import importlib

    from peftc.backends import BACKENDS
    from peftc.errors import PeftcError

    found = []
    for name, path in BACKENDS.items():
        module, _, attr = path.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        for options in TARGET_VARIANTS.get(name, ({},)):
            backend = cls(options) if options else cls()
            availability = backend.available()
            capabilities = backend.capabilities
            record: dict[str, Any] = {
                "target": name,
                "options": " ".join(f"--{k} {v}" for k, v in options.items()),
                "needs": getattr(backend, "requires", ""),
                "usable": availability.ok,
                "reason": availability.reason,
                "device": capabilities.device,
                "precisions": list(capabilities.precisions),
                "adapter_swap": capabilities.adapter_swap,
            }
            if availability.ok and name == "trt":
                try:
                    record |= _engine_device()
                except PeftcError as e:
                    record |= {"usable": False, "reason": str(e)}
            found.append(record)
    return found


def _engine_device() -> dict[str, Any]:
    """The GPU TensorRT builds engines for here, or why there is none (the ``trt`` target then still
    parses the network and verifies its ONNX)."""
    from peftc.backends.tensorrt import install

    device, why = install.build_device()
    if device is None:
        return {
            "usable": False,
            "reason": f"engine not built here: {why}; a compile still parses the network and verifies its ONNX "
            "with onnxruntime",
        }
    return {"gpu": f"{device.name} (compute capability {'.'.join(map(str, device.compute_capability))})"}


def targets_text(found: Sequence[dict[str, Any]]) -> str:
    """``peftc targets`` for people: one row per target, what each needs, and why an unusable one is."""
    rows = [
        [
            _row_name(t),
            "yes" if t["usable"] else "no",
            t["device"],
            ", ".join(t["precisions"]),
        ]
        for t in found
    ]
    lines = [table(["target", "usable here", "device", "precisions"], rows), "", "needs:"]
    lines += [f"  {_row_name(t)}: {t['needs'] or '-'}" for t in found]
    unusable = [f"  {_row_name(t)}: {t['reason']}" for t in found if not t["usable"]]
    if unusable:
        lines += ["", "why not here:", *unusable]
    return "\n".join(lines) + "\n"


def _row_name(target: dict[str, Any]) -> str:
    return " ".join(filter(None, [target["target"], target["options"]]))


def _methods(args: argparse.Namespace) -> int:
    found = methods()
    print(json.dumps(found, indent=2) if args.json else methods_text(found), end="\n" if args.json else "")
    return 0


def _targets(args: argparse.Namespace) -> int:
    found = targets()
    print(json.dumps(found, indent=2) if args.json else targets_text(found), end="\n" if args.json else "")
    return 0


def register(root: argparse.ArgumentParser, sub: Any) -> None:
    """Add ``--version`` to ``root`` and the ``methods`` and ``targets`` commands to its subparsers ``sub``."""
    root.add_argument("--version", action=VersionAction)
    m = sub.add_parser("methods", help="the PEFT methods peftc reads, with their config options")
    m.add_argument("--json", action="store_true", help="print them as JSON")
    m.set_defaults(func=_methods)
    t = sub.add_parser("targets", help="the compilation targets, what each needs and whether it is usable here")
    t.add_argument("--json", action="store_true", help="print them as JSON")
    t.set_defaults(func=_targets)
