"""The compile-time check of a cache head (``prefix.py``, ``prompt_head.py``) against PEFT's own forward.

PEFT's ``PeftModelForCausalLM`` (the oracle) runs a left-padded prompt with the prefix it builds
(``get_prompt``), or with the virtual tokens' embeddings in front; the artifact's step runs the same
prompt with the stored head as its past, the mask led by ``n`` ones and the positions PEFT gives
(the prompt's shifted by ``n``, or ``n`` + the column). The logits of the real tokens must agree
within the fp32 tolerance. A case of the report, with the prefix's effect on the logits.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc.generation import decode, prefix
from peftc.methods.base import AdapterSource
from peftc.verification import CaseResult, Report
from peftc.verification.compare import compare

ORACLE = "peft (prefix cache)"


def report(
    runner: Any, module: torch.nn.Module, source: AdapterSource, head: dict, seed: int, task_id: int | None = None
) -> Report:
    """``runner`` (a backend runner: ``run(feeds)``) checked as case ``ORACLE``, and the head's effect; an
    empty report naming why when PEFT cannot run it. ``task_id``: a multitask prompt's task."""
    model, why = _peft(module, source)
    if model is None:
        return Report((), {}, ((ORACLE, why),))
    generator = torch.Generator().manual_seed(seed)
    vocab = int(module.config.vocab_size)
    ids = torch.randint(0, vocab, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation batches prompts
    count = int(next(iter(head.values())).shape[1])
    prompted = prefix.positions(source) == prefix.COLUMNS
    if prompted:  # PEFT drops position ids: the model numbers the columns after the virtual tokens
        given = {} if task_id is None else {"task_ids": torch.full((2,), task_id)}
        numbered = decode.column_positions(mask.numpy(), count)
    else:
        given = {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)}
        numbered = (given["position_ids"] + count).numpy()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(input_ids=ids, attention_mask=mask, **given).logits[:, count if prompted else 0 :].numpy()
        given.pop("task_ids", None)
        plain = model.get_base_model()(input_ids=ids, attention_mask=mask, **given).logits.numpy()
    kv = prefix.expanded({k: v.numpy() for k, v in head.items()}, 2)
    ones = np.ones((2, count), dtype=np.int64)
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.concatenate([ones, mask.numpy()], 1)}
    got = runner.run({**feeds, "position_ids": numbered, **kv})
    real = mask.numpy().astype(bool)  # padded query positions are nobody's output
    actual = np.asarray(got["logits"])[real]
    case = CaseResult(
        ORACLE,
        {"batch": 2, "seq": 6, "virtual_tokens": count},
        seed,
        tuple(compare({"logits": expected[real]}, {"logits": actual})),
    )
    effect = float(np.abs(expected[real] - plain[real]).max() / max(np.abs(expected[real]).max(), 1e-30))
    return Report((case,), {f"logits ({'prompt' if prompted else 'prefix'})": effect})


def _peft(module: torch.nn.Module, source: AdapterSource) -> tuple[Any, str]:
    """PEFT's model of the plain base (its own forward, not the generation step) with the prefix."""
    try:
        import peft
        from safetensors.torch import save_file
    except ImportError:
        return None, "peft is not installed (pip install 'peftc[oracle]')"
    base = copy.deepcopy(module)
    vars(base).pop("forward", None)  # the instance's generation step (loaders/causal.py): PEFT calls the model's own
    with tempfile.TemporaryDirectory(prefix="peftc-oracle-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(dict(source.config)))
        save_file({k: v.contiguous() for k, v in source.tensors.items()}, str(Path(tmp) / "adapter_model.safetensors"))
        try:
            return peft.PeftModel.from_pretrained(base, tmp).eval(), ""
        except Exception as e:
            return None, f"PEFT could not load the adapter ({type(e).__name__}: {str(e).splitlines()[0]})"


def with_head(checked: Report, runner: Any, built: Any, seed: int) -> Report:
    """``checked`` (the base step's report) with the prefix case when ``built`` has a prefix cache."""
    if built.head is None:
        return checked
    adapter = built.head_adapter
    case = report(runner, built.loaded.module, adapter.source, built.head, seed, adapter.honoured.get("task_id"))
    not_run = [item for item in checked.not_run if item[1] != "no adapter"]  # the prefix is the adapter
    return Report.combine([checked, case], (*not_run, *case.not_run))
