"""``peftc combine`` and ``peftc compile --combine`` end to end: outputs PEFT and peftc load, the
manifest's record of a combination, and bad input as one line and exit 2."""

from __future__ import annotations

import hashlib
import json

import pytest
from cli_run import error_line, run
from combine_fixtures import make_pair_fixture  # noqa: F401  (the make_pair fixture)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cat_writes_a_lora_adapter_that_compiles_verified_by_peft(capsys, tmp_path, bert_dir, make_pair):
    _, (a, b) = make_pair("bert", "lora")
    out = tmp_path / "cat"
    code, text, err = run(capsys, "combine", bert_dir, "--adapter", a, "--adapter", b, "--method", "cat",
                          "--weights", "0.5,-1", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(text)
    assert report["format"] == "lora" and report["inputs"][1]["sha256"]["weights"] == _sha(
        b / "adapter_model.safetensors"
    )
    ranks = {row["key"]: row["rank"] for row in report["tensors"] if row["rank"] is not None}
    assert {k: r for k, r in ranks.items() if ".query." in k} == {
        k: 8 for k in ranks if ".query." in k
    }  # both adapters
    assert {r for k, r in ranks.items() if ".query." not in k} == {4}  # one adapter each (union of targets)
    assert all(row["error"] in (None, 0.0) for row in report["tensors"])
    code, text, err = run(capsys, "compile", bert_dir, "--adapter", out, "-o", tmp_path / "art", "--json")
    assert code == 0, err
    manifest = json.loads(text)
    assert not [n for n in manifest["not_run"] if "peft" in json.dumps(n)], manifest["not_run"]  # PEFT verified it


def test_compile_combine_records_the_combination(capsys, tmp_path, bert_dir, make_pair):
    _, (a, b) = make_pair("bert", "dora")
    spec = "dare-ties:density=0.5,seed=3,weights=1/0.5"
    art = tmp_path / "art"
    code, text, err = run(capsys, "compile", bert_dir, "--adapter", a, "--adapter", b, "--combine", spec, "-o", art,
                          "--json")  # fmt: skip
    assert code == 0, err
    manifest = json.loads(text)
    record = manifest["options"]["combine"]
    assert record["method"] == "dare-ties" and record["params"]["seed"] == 3 and record["params"]["weights"] == [1, 0.5]
    assert [i["sha256"]["weights"] for i in record["inputs"]] == [_sha(p / "adapter_model.safetensors") for p in (a, b)]
    assert manifest["command"][-2:] == ["--combine", spec]
    assert manifest["adapters"][0]["path"] == str((art / "combined").resolve())
    # The same combination by `peftc combine` is the same file, bit for bit (seeded masks).
    code, _, err = run(capsys, "combine", bert_dir, "--adapter", a, "--adapter", b, "--method", "dare-ties",
                       "--density", "0.5", "--seed", "3", "--weights", "1,0.5", "-o", tmp_path / "alone")  # fmt: skip
    assert code == 0, err
    assert _sha(tmp_path / "alone" / "adapter_model.safetensors") == _sha(
        art / "combined" / "adapter_model.safetensors"
    )
    code, _, err = run(capsys, "verify", art)
    assert code == 0, err
    code, text, _ = run(capsys, "inspect", art)
    assert f"  combined: {spec} (delta) from " in text


def _other_base(a, tmp_path):
    import shutil

    copy = tmp_path / "other"
    shutil.copytree(a, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-2-7b-hf"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    first = json.loads((a / "adapter_config.json").read_text())
    first["base_model_name_or_path"] = "google-bert/bert-base-uncased"
    named = tmp_path / "named"
    shutil.copytree(a, named)
    (named / "adapter_config.json").write_text(json.dumps(first))
    return [named, copy]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "ties", "--density", "0"], "--density 0.0: give a fraction in (0, 1]"),
        (["--method", "dare-linear", "--density", "1.5"], "--density 1.5: give a fraction in (0, 1]"),
        (["--method", "ties", "--weights", "1"], "--weights: 1 weight(s) for 2 adapter(s); give one per adapter"),
        (["--method", "opcm"], "opcm merges adapters one at a time: give their order (--order 0,1,…)"),
        (["--method", "ties", "--weights", "1,x"], "--weights '1,x': give comma-separated numbers"),
        (["--method", "ties", "other-base"], "was trained on 'llama27bhf', adapter 'named' on 'bertbaseuncased'"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, bert_dir, make_pair, extra, message):
    _, (a, b) = make_pair("bert", "lora")
    adapters = [a, b]
    if extra[-1] == "other-base":
        extra, adapters = extra[:-1], _other_base(a, tmp_path)
    argv = ["combine", bert_dir, *(x for p in adapters for x in ("--adapter", p)), *extra, "-o", tmp_path / "out"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "out").exists()


def test_compile_refuses_a_bad_combine_spec(capsys, tmp_path, bert_dir, make_pair):
    _, (a, b) = make_pair("bert", "lora")
    code, _, err = run(capsys, "compile", bert_dir, "--adapter", a, "--adapter", b, "--combine", "ties:density=2",
                       "-o", tmp_path / "art")  # fmt: skip
    assert code == 2
    assert "--density 2.0: give a fraction in (0, 1]" in error_line(err)
