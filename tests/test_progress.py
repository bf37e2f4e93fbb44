"""Progress inside long stages (a tqdm bar on terminals, lines in logs) and dependency warnings
counted and summarised instead of printed."""

from __future__ import annotations

import io
import logging
import time
import warnings

import models
import pytest

import peftc
from peftc.cli import main
from peftc.logs import hidden_warnings
from peftc.progress import Bar, Lines, advance, reporting


def test_bar_prints_stage_lines_and_counts_the_work_inside(tmp_path):
    out = io.StringIO()
    with Bar(file=out, tick=0.02) as bar, reporting(bar):
        bar("verify: artifact vs eager reference")
        advance(1, 3)
        time.sleep(0.1)  # the ticker redraws the elapsed time meanwhile
    text = out.getvalue()
    assert "] verify: artifact vs eager reference\n" in text and "1/3" in text
    assert text.count("verify: artifact vs eager reference") >= 3  # the line, then redraws of the bar


def test_lines_report_counted_work_only_when_it_is_slow():
    out = io.StringIO()
    lines = Lines(file=out)
    with reporting(lines):
        lines("quantize: int8")
        advance(1, 37)
        assert out.getvalue().count("\n") == 1
        lines.EVERY = 0.0
        advance(2, 37)
    assert out.getvalue().splitlines()[-1].endswith("  2/37")


def test_a_compile_reports_its_verification_cases_to_the_bar(tmp_path, bert_adapter):
    out = io.StringIO()
    with Bar(file=out, tick=10) as bar:
        peftc.compile(models.tiny_bert(), bert_adapter, out=tmp_path / "out", progress=bar)
    text = out.getvalue()
    assert "] lower: onnx\n" in text and "6/6" in text  # 3 cases: the oracles on each, then the artifact


def test_dependency_warnings_are_counted_not_printed(capsys):
    from peftc.loaders.identity import BaseModelWarning

    with pytest.warns(BaseModelWarning, match="trained on another model"), hidden_warnings() as hidden:
        warnings.warn("deprecated thing", FutureWarning, stacklevel=1)
        logging.getLogger("torch.fx.passes").warning("noisy")
        logging.getLogger("peftc.driver").warning("ours")  # peftc's own are not counted as hidden
        warnings.warn("trained on another model", BaseModelWarning, stacklevel=1)  # and passed on
    assert capsys.readouterr().err == ""
    assert hidden.count == 2 and hidden.summary().startswith("hid 2 warning(s) from dependencies (")
    assert "torch 1" in hidden.summary()
    with hidden_warnings(enabled=False) as shown:
        logging.getLogger("torch.fx.passes").warning("noisy")
    assert shown.count == 0


def test_the_cli_summarises_hidden_warnings_in_one_note(capsys, tmp_path, bert_dir, bert_adapter, monkeypatch):
    from peftc.loaders import models as loaders

    original = loaders._load_huggingface

    def noisy(*args, **kwargs):
        logging.getLogger("transformers_like.modeling").warning("some deprecation")
        return original(*args, **kwargs)

    monkeypatch.setattr(loaders, "_load_huggingface", noisy)
    code = main(["compile", str(bert_dir), "--adapter", str(bert_adapter), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0 and "some deprecation" not in err
    notes = [line for line in err.splitlines() if line.startswith("peftc: note: hid ")]
    assert len(notes) == 1 and "transformers_like 1" in notes[0] and notes[0].endswith("; --debug shows them")


def test_a_warning_is_counted_for_the_package_that_raised_it():
    """A ``stacklevel`` that points into the standard library (torch warns through ``copyreg``) and a
    ``@deprecated`` wrapper (typing_extensions) are looked through, to the package that called them."""
    site = "/venv/lib/python3.11/site-packages"
    space: dict = {}
    exec(compile("import warnings\ndef warn():\n    warnings.warn('old', FutureWarning, stacklevel=2)\n",
                 f"{site}/typing_extensions.py", "exec"), space)  # fmt: skip
    exec(compile("def reduce():\n    warn()\n", "/usr/lib/python3.11/copyreg.py", "exec"), space)
    exec(compile("def load():\n    reduce()\n", f"{site}/torch/utils/_pytree.py", "exec"), space)
    with hidden_warnings() as hidden:
        space["load"]()
    assert dict(hidden.sources) == {"torch": 1}
