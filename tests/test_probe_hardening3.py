"""A third probe of careless and hostile inputs: wrong-typed Python arguments, inputs of the wrong rank,
benchmarks too large for memory, a base checkpoint holding NaN. Each is one line naming the argument,
input, flag or checkpoint key (an ``InputError``, exit 2), never a raw ``TypeError`` or a wrong culprit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import peftc
from peftc.cli import main
from peftc.errors import InputError
from peftc.verification.compare import NONFINITE_REFERENCE, compare


def one_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[peftc") and "note: hid" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("peftc: error: "), err
    return lines[0]


@pytest.mark.parametrize("value", [None, 5, ["out"], b"out", ""])
def test_load_and_verify_of_a_path_of_the_wrong_type(value):
    with pytest.raises(InputError, match=r"^path="):
        peftc.load(value)
    with pytest.raises(InputError, match=r"^path="):
        peftc.verify(value)


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"adapters": None}, "adapters=None"),
        ({"adapters": [3]}, "adapters[0]=3"),
        ({"out": None}, "out=None"),
        ({"merge": "no"}, "merge='no'"),  # a truthy string would have compiled a merged artifact
        ({"inputs": "x:batch:float32"}, "inputs='x:batch:float32'"),
        ({"target": None}, "target=None"),
        ({"max_rank": 2.5, "swappable": True}, "max_rank=2.5"),
        ({"max_error": "0.1"}, "max_error='0.1'"),
        ({"target_options": ["device"]}, "target_options"),
        ({"progress": "yes"}, "progress='yes'"),
        ({"configs": "adapter_config.json"}, "configs='adapter_config.json'"),  # was read letter by letter
    ],
)
def test_compile_arguments_of_the_wrong_type(tmp_path, bert_dir, bert_adapter, arguments, named):
    given = {"adapters": bert_adapter, "out": tmp_path / "out", **arguments}
    with pytest.raises(InputError) as error:
        peftc.compile(bert_dir, **given)
    assert str(error.value).startswith(named) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_base_checkpoint_holding_nan_is_named_not_blamed_on_the_adapter(capsys, tmp_path, bert_dir, bert_adapter):
    model = Path(shutil.copytree(bert_dir, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    tensors["encoder.layer.1.attention.self.key.weight"][0, 1] = float("nan")
    save_file(tensors, model / "model.safetensors")
    line = one_error(capsys, "compile", model, "--adapter", bert_adapter, "-o", tmp_path / "out")
    assert "base model's weight 'encoder.layer.1.attention.self.key.weight' holds NaN" in line
    assert not (tmp_path / "out").exists()


def test_a_non_finite_reference_output_is_reported_as_the_oracle_s_not_the_artifact_s():
    reference = {"y": np.array([1.0, np.inf], np.float32)}
    (result,) = compare(reference, {"y": np.array([1.0, 2.0], np.float32)})
    assert not result.ok and result.note == NONFINITE_REFERENCE
    (finite,) = compare({"y": np.array([1.0, 2.0], np.float32)}, {"y": np.array([1.0, 2.0], np.float32)})
    assert finite.ok and not finite.note


@pytest.fixture
def places(tmp_path, bert_adapter) -> dict[str, Path]:
    """Where a careless ``-o`` points: a file, a user's directory, an input, a path under a file."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("file")
    return {"file": tmp_path / "file.txt", "user": user, "input": bert_adapter, "under-file": tmp_path / "file.txt/x"}


def _untouched(places, bert_adapter, before):
    assert (places["user"] / "notes.txt").read_text() == "mine" and places["file"].read_text() == "file"
    assert sorted(p.name for p in places["user"].iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in bert_adapter.iterdir()) == before
    assert not [p for p in places["file"].parent.iterdir() if ".peftc-" in p.name]


@pytest.mark.parametrize("where", ["file", "user", "input", "under-file"])
@pytest.mark.parametrize("command", ["combine", "extract", "extract --force", "analyze"])
def test_outputs_of_combine_extract_and_analyze_plot_are_placed_as_compile_s(
    capsys, places, bert_dir, bert_adapter, command, where
):
    """Refused in one line before any work (bert_dir is no S²FT checkpoint: extract never got to read it),
    and nothing of the user's changes (analyze --plot used to write its PNGs into any directory)."""
    before = sorted(p.name for p in bert_adapter.iterdir())
    out = places[where]
    argv = {
        "combine": ["combine", bert_dir, "--adapter", bert_adapter, "--method", "task-arithmetic", "-o", out],
        "extract": ["extract", bert_dir, bert_adapter, "-o", out],
        "extract --force": ["extract", bert_dir, bert_adapter, "-o", out, "--force"],
        "analyze": ["analyze", bert_dir, "--adapter", bert_adapter, "--density", "--plot", out],
    }[command]
    line = one_error(capsys, *argv)
    assert str(out) in line and ("--plot" if command == "analyze" else "-o") in line
    _untouched(places, bert_adapter, before)


@pytest.mark.parametrize("command", ["combine", "extract", "analyze"])
def test_an_output_at_the_current_directory_is_refused(capsys, tmp_path, monkeypatch, bert_dir, bert_adapter, command):
    monkeypatch.chdir(tmp_path)  # an empty directory: it used to be removed and replaced
    argv = {
        "combine": ["combine", bert_dir, "--adapter", bert_adapter, "--method", "task-arithmetic", "-o", "."],
        "extract": ["extract", bert_dir, bert_adapter, "-o", "."],
        "analyze": ["analyze", bert_dir, "--density", "--plot", "."],
    }[command]
    assert "current directory" in one_error(capsys, *argv)
    assert tmp_path.is_dir() and not list(tmp_path.iterdir())


def test_force_replaces_only_what_the_command_wrote_in_one_step(tmp_path):
    from peftc.artifact.output import OutputDir

    ours = lambda d: {p.name for p in d.iterdir()} == {"record.json"}  # noqa: E731
    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "record.json").write_text("old")
    with pytest.raises(InputError, match="pass --force"):
        OutputDir(earlier, command="extract", ours=ours)
    output = OutputDir(earlier, command="extract", force=True, ours=ours)
    (output.tmp / "record.json").write_text("new")
    (earlier / "notes.txt").write_text("mine")  # the user wrote into it meanwhile: checked again at commit
    with pytest.raises(InputError, match="did not write"):
        output.commit()
    output.abort()
    assert (earlier / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".out.peftc-*"))
    (earlier / "notes.txt").unlink()
    output = OutputDir(earlier, command="extract", force=True, ours=ours)
    (output.tmp / "record.json").write_text("new")
    output.commit()
    assert (earlier / "record.json").read_text() == "new" and not list(tmp_path.glob(".out.peftc-*"))


def test_a_vision_model_without_interpolation_keeps_its_size_and_names_it():
    """A model whose forward cannot interpolate positions (here a plain ViT-like module without the flag)
    keeps the config's static size; a call with another size is one line naming the expected one."""
    import torch

    from peftc.feeds import InputCheck
    from peftc.loaders.inputs import from_transformers

    class Config:
        image_size, num_channels, patch_size = 32, 3, 8

    class Static(torch.nn.Module):
        config, main_input_name = Config(), "pixel_values"

        def forward(self, pixel_values):
            return pixel_values

    signature = from_transformers(Static())
    assert [s.shape for s in signature.inputs] == [("batch", 3, 32, 32)]
    check = InputCheck.from_target({"signature": signature.to_json()}, ["pixel_values"], engine=False, where="m")
    with pytest.raises(
        InputError, match=r"input 'pixel_values': dim 2 is 48, expected 32 \(shape \[batch, 3, 32, 32\]\)"
    ):
        check({"pixel_values": np.zeros((1, 3, 48, 32), np.float32)})
