"""``peftc bench``: artifacts timed interleaved against eager PyTorch and PEFT, with errors and sizes."""

from __future__ import annotations

import json

import pytest

import peftc
from peftc import bench
from peftc.cli import main
from peftc.errors import InputError, UnsupportedError


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, bert_dir, bert_adapter):
    root = tmp_path_factory.mktemp("bench")
    merged = peftc.compile(str(bert_dir), bert_adapter, out=root / "merged").path
    fp16 = peftc.compile(str(bert_dir), bert_adapter, out=root / "fp16", precision="fp16").path
    return merged, fp16


def test_bench_times_every_path_and_measures_errors(artifacts):
    result = bench.bench(list(artifacts), batches=(1, 3), sizes={"seq": 7}, reps=2)
    assert result["inputs"]["batches"] == [1, 3] and result["inputs"]["dims"]["seq"] == 7
    assert result["oracle"] == "peft eager" and "isa" in result["machine"]
    paths = {p["name"]: p for p in result["paths"]}
    assert list(paths) == ["eager base", "peft eager", "merged", "fp16"]
    for batch in ("1", "3"):
        assert paths["peft eager"]["batches"][batch]["error"] == 0.0
        assert paths["merged"]["batches"][batch]["error"] < 1e-5  # fp32: PEFT's answer
        fp16 = paths["fp16"]["batches"][batch]["error"]
        assert 1e-5 < fp16 <= paths["fp16"]["budget"]  # rounded, within what it was verified to
        assert paths["eager base"]["batches"][batch]["error"] > 0.05  # the adapter's effect
        assert all(p["batches"][batch]["ms"] > 0 and p["batches"][batch]["speedup_vs_peft"] > 0 for p in paths.values())
    manifest = peftc.load(artifacts[0]).manifest
    assert paths["merged"]["bytes"] == sum(f["bytes"] for f in manifest.target["files"])
    assert paths["fp16"]["precision"] == "fp16" and paths["merged"]["precision"] == "fp32"
    text = bench.report(result)
    assert "batch 3" in text and "PEFT / path" in text and "seq=7" in text


def test_cli_bench_json_and_plot(capsys, tmp_path, artifacts):
    png = tmp_path / "bench.png"
    code = main(
        ["bench", str(artifacts[0]), "--batch", "2", "--size", "seq=5", "--reps", "1", "--json", "--plot", str(png)]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["inputs"]["batches"] == [2] and [p["name"] for p in result["paths"]][-1] == "merged"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch '0': give positive integers"),
        (["--size", "seq"], "--size 'seq': give positive integers"),
        (["--size", "width=3"], "--size width: the model's dynamic dims are"),
        (["--size", "=3"], "--size: give DIM=N with the dim's name"),
        (["--reps", "0"], "--reps 0: give a positive count"),
    ],
)
def test_cli_bench_refuses_bad_flags_in_one_line(capsys, artifacts, argv, message):
    assert main(["bench", str(artifacts[0]), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[peftc")]
    assert len(err) == 1 and message in err[0], err


def test_bench_refuses_what_is_not_an_artifact(tmp_path):
    with pytest.raises(InputError, match="is not a peftc artifact"):
        bench.bench([tmp_path])


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = {"inputs": {"batches": []}, "paths": [], "machine": {}, "oracle": ""}
    with pytest.raises(UnsupportedError, match=r"pip install 'peftc\[plot\]'"):
        bench.plot(result, tmp_path / "x.png")
