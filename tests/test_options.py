"""CompileOptions: one record for the CLI and ``peftc.compile``, checked once, rendering its own command."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
from pathlib import Path

import pytest

import peftc
from peftc.cli import compile_options, parser
from peftc.errors import InputError
from peftc.options import CompileOptions

COMMAND = (
    "compile model_dir --adapter a --adapter b --config a.json --config b.json --input input_ids:batch,seq:int64 "
    "--target trt -o out --force --no-merge --co-permute --allow-pickle --base-residual --profile seq:1,16,64 "
    "--profile batch:1,2,4 --precision fp16 --refit --seed 3 --no-oracle --dump-ir ir --keep-failed"
)


def test_peftc_compile_takes_exactly_the_options():
    """``peftc.compile``'s keyword arguments are CompileOptions' fields, in order, with the same defaults."""
    parameters = [p for p in inspect.signature(peftc.compile).parameters.values() if p.name != "progress"]
    fields = dataclasses.fields(CompileOptions)
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, field in zip(parameters, fields, strict=True):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if parameter.default is not inspect.Parameter.empty:
            assert parameter.default == default or (parameter.default is None and default == {}), field.name


def test_cli_flags_become_the_same_options_as_the_python_call():
    from_cli = compile_options(parser().parse_args(shlex.split(COMMAND)))
    from_python = CompileOptions(
        model="model_dir",
        adapters=["a", "b"],
        configs=["a.json", "b.json"],
        inputs=["input_ids:batch,seq:int64"],
        target="trt",
        out="out",
        force=True,
        merge=False,
        co_permute=True,
        allow_pickle=True,
        base_residual=True,
        target_options={"profile": ["seq:1,16,64", "batch:1,2,4"], "precision": "fp16", "refit": True},
        seed=3,
        oracle=False,
        dump_ir="ir",
        keep_failed=True,
    )
    assert from_cli == from_python


def test_the_rebuild_command_parses_back_to_the_same_artifact(tmp_path, monkeypatch):
    """``command()`` is what the manifest records as ``rebuild:``; parsed again it asks for the same
    artifact (verification and output flags aside: it always replaces, seeds and checks as the default)."""
    monkeypatch.chdir(tmp_path)
    Path("c.npz").touch()  # options check that a calibration file is a regular file, not its contents
    options = compile_options(parser().parse_args(shlex.split(COMMAND)))
    again = compile_options(parser().parse_args(options.command()[1:]))
    same = {"seed", "oracle", "dump_ir", "keep_failed"}
    assert dataclasses.replace(again, **{k: getattr(options, k) for k in same}) == options
    quantized = (
        "compile m --adapter a -o o --precision int8 --max-error 0.05 --calibration c.npz --calibration-samples 9"
    )
    options = compile_options(parser().parse_args(shlex.split(quantized)))
    assert options.calibration == Path("c.npz") and options.calibration_samples == 9 and options.max_error == 0.05
    assert compile_options(parser().parse_args(options.command()[1:])) == dataclasses.replace(options, force=True)
    swappable = CompileOptions(model="m", adapters=("a",), out="o", swappable=True, multi_adapter=2)
    assert swappable.command(max_rank=16)[-4:] == ["--max-rank", "16", "--multi-adapter", "2"]
    assert CompileOptions(model=object(), adapters=("a",), out="o").command() is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"adapters": ()}, "no adapter given"),
        ({"max_rank": 8}, "--max-rank and --multi-adapter apply to --swappable artifacts only"),
        ({"multi_adapter": 2}, "--max-rank and --multi-adapter apply to --swappable artifacts only"),
        ({"swappable": True, "multi_adapter": -1}, "--multi-adapter must be >= 0 and --max-rank >= 1"),
        ({"swappable": True, "max_rank": 0}, "--multi-adapter must be >= 0 and --max-rank >= 1"),
        ({"configs": ("x", "y")}, "2 --config files for 3 adapters; give one per adapter, in order"),
        ({"co_permute": True}, "--co-permute applies to --no-merge artifacts"),
    ],
    ids=["no-adapter", "max-rank", "multi-adapter", "negative-bank", "zero-rank", "configs", "co-permute-merged"],
)
def test_bad_options_are_refused_naming_the_flag(fields, message):
    with pytest.raises(InputError, match=message):
        CompileOptions(**{"model": "m", "adapters": ("a", "b", "c"), "out": "o", **fields})


def test_options_are_frozen_and_normalised():
    options = CompileOptions(model="m", adapters="a", out="o", configs=["c.json"])
    assert options.adapters == ("a",) and options.config_for(0) == "c.json"
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.merge = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.target_options["precision"] = "fp16"  # type: ignore[index]
