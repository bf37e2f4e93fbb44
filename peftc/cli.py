"""The ``peftc`` command line: argument parsing and rendering only; the work is in ``peftc.driver``.

Exit codes: 0 ok, 1 verification failed, 2 bad or unsupported input, 3 internal error.
Errors print one line (``--debug`` adds the traceback); progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftc import bench_cli, clean, cli_info, memory
from peftc.combine import cli as combine_cli
from peftc.density import cli as density_cli
from peftc.errors import InputError, PeftcError, VerificationError
from peftc.generation import cli as generation_cli
from peftc.interrupts import exit_with, sigterm_as_interrupt
from peftc.logs import hidden_warnings
from peftc.progress import Bar, Lines
from peftc.quant import cli as qlora_cli
from peftc.seeds import check_seed
from peftc.sparse import extract_cli
from peftc.swap import cli as swap_cli

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-static", "int8-weight", "int4")
"""``--precision``'s choices: ``peftc.precision.PRECISIONS``, named here so the CLI starts without torch."""

if TYPE_CHECKING:
    from peftc.options import CompileOptions


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.debug:
        _quiet_dependencies()
    args.progress = Bar() if sys.stderr.isatty() else Lines()  # a live bar on a terminal, lines in logs
    try:
        if getattr(args, "seed", None) is not None:  # every command's --seed, before any work
            check_seed(args.seed)
        with sigterm_as_interrupt(), hidden_warnings(not args.debug) as hidden:
            code = args.func(args)
        if hidden.count:
            print(f"peftc: note: {hidden.summary()}", file=sys.stderr)
        return code
    except PeftcError as e:
        print(f"peftc: error: {e}", file=sys.stderr)
        if isinstance(e, VerificationError) and e.table:
            print(e.table, file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return e.exit_code
    except KeyboardInterrupt as e:
        sigterm = "SIGTERM" in e.args
        print(f"peftc: interrupted{' (SIGTERM)' if sigterm else ''}", file=sys.stderr)
        return 143 if sigterm else 130  # 128 + the signal's number, as shells report it
    except Exception as e:
        print(f"peftc: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return 3
    finally:
        args.progress.close()


def compile_options(args: argparse.Namespace) -> CompileOptions:
    """The ``peftc compile`` flags as :class:`~peftc.options.CompileOptions` (which validates them)."""
    from peftc.options import CompileOptions

    return CompileOptions(
        model=args.model,
        adapters=tuple(args.adapter),
        out=args.out,
        target=args.target,
        target_options=_target_options(args),
        merge=not args.no_merge,
        inputs=tuple(args.input or ()),
        configs=tuple(args.config or ()),
        force=args.force,
        keep_failed=args.keep_failed,
        dump_ir=args.dump_ir,
        allow_pickle=args.allow_pickle,
        base_residual=args.base_residual,
        task_id=args.task_id,
        swappable=args.swappable,
        max_rank=args.max_rank,
        multi_adapter=args.multi_adapter,
        slot_capacity=args.slot_capacity,
        slot_dtype=args.slot_dtype,
        oracle=not args.no_oracle,
        seed=args.seed,
        precision=args.precision,
        max_error=args.max_error,
        calibration=args.calibration,
        calibration_samples=args.calibration_samples,
        combine=args.combine,
        task=args.task,
        co_permute=args.co_permute,
        merge_policy=args.merge_policy,
        quantize_embeddings=args.quantize_embeddings,
        **density_cli.compile_options(args),
    )


def _compile(args: argparse.Namespace) -> int:
    from peftc.driver.pipeline import compile_artifact
    from peftc.report import manifest_text

    options = compile_options(args)
    memory.map_large_blocks()  # this process's own choice: weights-sized buffers go back to the OS when freed
    artifact = compile_artifact(options, args.progress)
    if args.json:
        print(artifact.manifest.to_json(), end="")
    else:
        import dataclasses

        print(manifest_text(dataclasses.asdict(artifact.manifest)), end="")
        print(f"wrote {artifact.path}")
    return 0


def _add_adapter(args: argparse.Namespace) -> int:
    from peftc.report import verification_table
    from peftc.swap.manage import add_adapter

    manifest = add_adapter(
        args.artifact,
        args.adapter,
        name=args.name,
        config=args.config,
        model=args.model,
        allow_pickle=args.allow_pickle,
        oracle=not args.no_oracle,
        progress=args.progress,
    )
    entry = manifest.adapters[-1]
    if args.json:
        print(json.dumps(entry, indent=2))
    else:
        print(verification_table(entry["verification"]))
        print(f"added adapter {entry['name']!r} to {args.artifact} ({entry['slot_file']})")
    return 0


def _remove_adapter(args: argparse.Namespace) -> int:
    from peftc.swap.manage import remove_adapter

    remove_adapter(args.artifact, args.name)
    print(f"removed adapter {args.name!r} from {args.artifact}")
    return 0


def _target_options(args: argparse.Namespace) -> dict[str, object]:
    """The target flags that were given (each target checks and refuses the ones it does not take)."""
    options = {
        "device": args.device,
        "profile": args.profile or [],
        "refit": args.refit,
        "strip_weights": args.strip_weights,
        "cache_dir": args.cache_dir,
    }
    return {k: v for k, v in options.items() if v not in (None, False, [])}


def _inspect(args: argparse.Namespace) -> int:
    import dataclasses

    from peftc.artifact import read_manifest
    from peftc.artifact.manifest import file_problems
    from peftc.report import manifest_text

    manifest = read_manifest(args.artifact)
    problems = file_problems(args.artifact, manifest)  # a modified artifact says so, and exits 1
    if args.json:
        integrity = {"status": "modified" if problems else "intact", "problems": problems}
        print(json.dumps({**dataclasses.asdict(manifest), "integrity": integrity}, indent=2))
    else:
        # The manifest's own objects (not copies), so a missing field is reported with its path.
        fields = {f.name: getattr(manifest, f.name) for f in dataclasses.fields(manifest)}
        try:
            text = manifest_text({**fields, "status": "modified" if problems else manifest.status})
        except (TypeError, ValueError, AttributeError, IndexError) as e:  # only data is rendered here
            raise InputError(f"{args.artifact}/manifest.json: a field has the wrong type ({e}); it was edited") from e
        print(text, end="")
        print("".join(f"modified: {problem}\n" for problem in problems), end="")
    return 1 if problems else 0


def _verify(args: argparse.Namespace) -> int:
    from peftc.driver.pipeline import reverify
    from peftc.report import verification_table

    memory.map_large_blocks()  # as `peftc compile` does: the session's freed build buffers leave the process
    report = reverify(args.artifact, model=args.model, oracle=not args.no_oracle, progress=args.progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(verification_table(report.to_json()))
        for what, why in report.not_run:
            print(f"not run: {what}: {why}")
    if not report.passed:
        print("peftc: error: verification failed", file=sys.stderr)
        return 1
    return 0


def _quiet_dependencies() -> None:
    """Silence progress bars and deprecation chatter from torch/transformers/peft (not errors)."""
    import logging

    from peftc.logs import NOISY

    # torch.onnx logs one warning per torchvision op it cannot register when torchvision is absent.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def parser() -> argparse.ArgumentParser:
    """The ``peftc`` argument parser (the CLI's declarations)."""
    root = argparse.ArgumentParser(prog="peftc", description="Compile PEFT-adapted models into verified artifacts.")
    root.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = root.add_subparsers(dest="command", required=True)
    cli_info.register(root, sub)

    c = sub.add_parser("compile", help="compile a model with adapters into an artifact directory")
    c.add_argument(
        "model",
        help="Hugging Face model directory, pkg.module:factory, a .pt2 file, or timm:NAME[,KEY=VALUE...]@WEIGHTS",
    )
    c.add_argument(
        "--adapter",
        action="append",
        required=True,
        help="PEFT adapter directory or .safetensors file (repeatable, in stacking order)",
    )
    c.add_argument(
        "--config",
        action="append",
        help="adapter_config.json for an adapter given as a bare .safetensors file (one per adapter, in order)",
    )
    c.add_argument("--target", default="onnx", help="compilation target: onnx (default), aoti, trt")
    t = c.add_argument_group("target options")
    t.add_argument("--device", choices=["cpu", "cuda"], help="aoti: compile for this device (default cpu)")
    t.add_argument(
        "--profile",
        action="append",
        metavar="DIM:MIN,OPT,MAX",
        help="trt: range of a dynamic dim, e.g. seq:1,128,512 (repeatable; default: derived from the model)",
    )
    t.add_argument("--refit", action="store_true", help="trt: build a refittable engine (adapter swap by refit)")
    t.add_argument(
        "--strip-weights", action="store_true", help="trt: leave weights out of the engine (refitted from the ONNX)"
    )
    t.add_argument("--cache-dir", metavar="DIR", help="trt: timing/runtime cache directory reused across builds")
    c.add_argument("-o", "--out", required=True, help="artifact directory to create")
    c.add_argument(
        "--no-merge", action="store_true", help="keep adapters as separate ops instead of merging them into the weights"
    )
    c.add_argument(
        "--co-permute",
        action="store_true",
        help="with --no-merge: permute the base's heads/FFN channels once so S²FT sites are slices, not gathers",
    )
    c.add_argument(
        "--input",
        action="append",
        help="input description name:dims:dtype[:low..high], e.g. input_ids:batch,seq:int64 (repeatable)",
    )
    c.add_argument("--force", action="store_true", help="replace a peftc artifact or an empty directory at -o")
    c.add_argument(
        "--keep-failed", action="store_true", help="write the artifact, marked failed, even if verification fails"
    )
    c.add_argument("--dump-ir", metavar="DIR", help="write the canonical graph after every pass into DIR")
    c.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickled weight files (loaded with torch.load(weights_only=True))",
    )
    c.add_argument(
        "--base-residual",
        action="store_true",
        help="MODEL is the residual base a PiSSA/OLoRA/CorDA/LoRA-GA/LoftQ adapter was trained on (use it as is)",
    )
    c.add_argument(
        "--task-id",
        type=int,
        metavar="K",
        help="compile for task K (no task_ids input): a Poly adapter's routed mix merged, or a multitask prompt's "
        "cache head with --task text-generation",
    )
    swap_cli.add_compile_flags(c)
    c.add_argument(
        "--task",
        choices=["text-generation", "text2text-generation", "text2text-generation-encoder", "none"],
        help="a causal LM's generation step, or an encoder-decoder's encoder and decoder step (-encoder: the "
        "encoder program alone, as in a text2text artifact's encoder/); KV cache as tensors; none: the model's "
        "own forward (default: inferred from config.architectures)",
    )
    c.add_argument("--no-oracle", action="store_true", help="skip the comparison against Hugging Face PEFT")
    c.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    c.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="what the artifact computes in (default: the base checkpoint's dtype where the target runs it, else "
        "fp32); int8 (dynamic activations), int8-static (calibrated), int8-weight and int4 (weight-only) quantize "
        "the layers that fit the error budget",
    )
    c.add_argument(
        "--max-error",
        type=float,
        metavar="E",
        help="error budget relative to each output's scale: a reduced precision's against the fp32 oracles (default: "
        "from the format and the model's depth, peftc/precision.py), or the density passes' (default 1e-5)",
    )
    c.add_argument(
        "--calibration",
        metavar="FILE",
        help="inputs for an integer precision or the density passes (.safetensors or .npz: one array per model input, "
        "batch first): int8-static's ranges, the inputs layer errors and activation density are measured on",
    )
    c.add_argument(
        "--calibration-samples",
        type=int,
        default=64,
        metavar="N",
        help="without --calibration, generate N seeded input batches from the input signature (default 64)",
    )
    combine_cli.add_compile_flag(c)
    qlora_cli.add_compile_flags(c)
    density_cli.add_compile_flags(c)
    c.add_argument("--json", action="store_true", help="print the manifest as JSON")
    c.set_defaults(func=_compile)

    a = sub.add_parser("add-adapter", help="add a LoRA adapter to a --swappable artifact (no recompile)")
    a.add_argument("artifact")
    a.add_argument("--adapter", required=True, help="PEFT adapter directory or .safetensors file")
    a.add_argument("--name", help="the adapter's name in the artifact (default: the directory or file name)")
    a.add_argument("--config", help="adapter_config.json for an adapter given as a bare .safetensors file")
    a.add_argument("--model", help="the base model, if not the one recorded in the manifest")
    a.add_argument("--allow-pickle", action="store_true", help="accept a pickled adapter (weights_only=True)")
    a.add_argument("--no-oracle", action="store_true", help="skip the comparison against Hugging Face PEFT")
    a.add_argument("--json", action="store_true", help="print the adapter's manifest entry as JSON")
    a.set_defaults(func=_add_adapter)

    r = sub.add_parser("remove-adapter", help="remove an adapter from a --swappable artifact")
    r.add_argument("artifact")
    r.add_argument("--name", required=True)
    r.set_defaults(func=_remove_adapter)

    i = sub.add_parser("inspect", help="show an artifact's manifest")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the manifest unchanged")
    i.set_defaults(func=_inspect)

    v = sub.add_parser("verify", help="re-run the numeric check of an artifact")
    v.add_argument("artifact")
    v.add_argument("--model", help="the base model, if not the one recorded in the manifest")
    v.add_argument("--no-oracle", action="store_true", help="skip the comparison against Hugging Face PEFT")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_verify)
    clean.register(sub)
    bench_cli.register(sub)
    combine_cli.register(sub)
    extract_cli.register(sub)
    density_cli.register(sub)
    generation_cli.register(sub)
    qlora_cli.register(sub)
    return root


if __name__ == "__main__":
    exit_with(main())
