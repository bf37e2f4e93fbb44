"""The ``peftc extract BASE FINETUNED -o ADAPTER_DIR`` command: read two Hugging Face checkpoints,
recover the S²FT update (``peftc.sparse.extract``) and write it as a ``PEFTC_S2FT`` adapter."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from peftc.artifact.output import OutputDir
from peftc.errors import InputError
from peftc.sparse import MAX_DENSITY, MIN_FILL

if TYPE_CHECKING:
    import torch

    from peftc.sparse.extract import Extracted, Limits

EXTRACT_FILE = "extract.json"


def register(sub: argparse._SubParsersAction) -> None:
    """Declare the ``extract`` command on the CLI's subparsers."""
    e = sub.add_parser(
        "extract",
        help="recover an S²FT adapter (indices + dense blocks) from a base and its S²FT fine-tuned checkpoint",
    )
    e.add_argument("base", help="the base model's Hugging Face directory")
    e.add_argument("finetuned", help="the S²FT fine-tuned checkpoint (Hugging Face directory, dense, permuted)")
    e.add_argument("-o", "--out", required=True, help="adapter directory to create")
    e.add_argument(
        "--max-density", type=float, default=MAX_DENSITY, help="largest fraction of rows/columns changed (0.5)"
    )
    e.add_argument(
        "--min-fill", type=float, default=MIN_FILL, help="smallest fraction of entries changed in them (0.5)"
    )
    e.add_argument(
        "--allow-pickle", action="store_true", help="accept pytorch_model.bin (loaded with weights_only=True)"
    )
    e.add_argument("--force", action="store_true", help="replace an existing adapter directory")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``peftc extract`` (exit 0; errors raise and are printed by the CLI as one line)."""
    for name in ("max_density", "min_fill"):
        value = getattr(args, name)
        if not 0 < value <= 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: give a fraction in (0, 1]")
    from peftc.sparse.extract import Limits

    summary = extract_adapter(
        Path(args.base),
        Path(args.finetuned),
        Path(args.out),
        Limits(args.max_density, args.min_fill),
        args.allow_pickle,
        args.force,
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for row in summary["modules"]:
            print(f"{row['module']}: {row['k']} {row['side']} (density {row['density']:.3f})")
        print(f"wrote {args.out}: {len(summary['modules'])} modules, {summary['parameters']} parameters")
    return 0


def extract_adapter(
    base: Path,
    finetuned: Path,
    out: Path,
    limits: Limits | None = None,
    allow_pickle: bool = False,
    force: bool = False,
) -> dict:
    """Recover the S²FT update of ``finetuned`` over ``base`` and write it to ``out``; the summary.

    Raises:
        InputError: an unreadable checkpoint, an existing ``out`` without ``force``, or a difference
            that is not an S²FT update (``peftc.sparse.extract.extract``).
    """
    from safetensors.torch import save_file

    from peftc import reading
    from peftc.methods import s2ft
    from peftc.sparse.extract import Limits, extract

    limits = limits or Limits()
    output = OutputDir(out, command="extract", force=force, ours=_written_by_extract, inputs=(base, finetuned))
    try:
        config, _ = reading.read_json(_file(base, "config.json"))
        found = extract(read_checkpoint(base, allow_pickle), read_checkpoint(finetuned, allow_pickle), config, limits)
        tensors = {}
        for update in found.updates:
            tensors[f"{update.module}.s2ft_{update.side}"] = update.indices.contiguous()
            tensors[f"{update.module}.s2ft_block"] = update.block
        save_file(tensors, str(output.tmp / "adapter_model.safetensors"))
        adapter_config = {
            "peft_type": s2ft.PEFT_TYPE,
            "format_version": s2ft.FORMAT_VERSION,
            "target_modules": [u.module for u in found.updates],
            "base_model_name_or_path": str(base),
        }
        (output.tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        summary = _summary(found, base, finetuned, limits)
        (output.tmp / EXTRACT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        output.commit()
        return summary
    finally:
        output.abort()


_WRITTEN = {"adapter_model.safetensors", "adapter_config.json", EXTRACT_FILE}


def _written_by_extract(directory: Path) -> bool:
    """``directory`` holds only what ``peftc extract`` writes, its record included (not a user's adapter)."""
    names = {p.name for p in directory.iterdir()}
    return EXTRACT_FILE in names and names <= _WRITTEN and all(_regular(directory / n) for n in names)


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _summary(found: Extracted, base: Path, finetuned: Path, limits: Limits) -> dict:
    return {
        "base": str(base),
        "finetuned": str(finetuned),
        "limits": {"max_density": limits.max_density, "min_fill": limits.min_fill},
        "modules": [
            {"module": u.module, "side": u.side, "k": int(u.indices.numel()), "density": u.density, "fill": u.fill}
            for u in found.updates
        ],
        "parameters": sum(int(u.block.numel()) for u in found.updates),
        "kv_group_order": found.groups,
        "channel_order": found.channels,
        "reconstruction_error": found.reconstruction_error,
    }


def _file(directory: Path, name: str) -> Path:
    if not directory.is_dir():
        raise InputError(f"{directory}: not a Hugging Face model directory")
    path = directory / name
    if not path.is_file():
        raise InputError(f"{directory}: no {name}")
    return path


def read_checkpoint(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory: its ``*.safetensors`` files, or its
    ``pytorch_model*.bin`` files with ``allow_pickle`` (``weights_only=True``).

    Raises:
        InputError: no weights, pickled weights without ``allow_pickle``, or a key in two files.
    """
    from peftc.loaders.timm_models import read_state_dict

    _file(directory, "config.json")
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise InputError(f"{directory}: no *.safetensors or pytorch_model.bin weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for key, value in read_state_dict(file, allow_pickle).items():
            if key in tensors:
                raise InputError(f"{file}: {key} is also in another weights file of {directory}")
            tensors[key] = value
    return tensors
