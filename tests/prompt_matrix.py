"""The prompt-learning × model-family matrix (inserted adapters), and the README table generated from it.

Prompt learning is inserted, not merged: each cell traces its family model inside the adapter's
wrapper, so cells do not share the family's base program as ``tests/matrix.py``'s do, and they have
one form (inserted) instead of merged and unmerged. ``tests/test_prompts.py`` builds every cell with
PEFT itself and checks the traced program against PEFT's eager model; one cell per method with a
program of its own also runs the whole ``peftc.compile`` to an ONNX artifact::

    python tests/prompt_matrix.py            # print the table
    python tests/prompt_matrix.py --write    # rewrite it in README.md (a test checks they agree)
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- prompts:begin -->", "<!-- prompts:end -->"


def tiny_gpt2_lm(seed: int = 0) -> Any:
    """The tiny GPT-2 with its language-model head (``CAUSAL_LM``; the head is tied to ``wte``)."""
    import transformers

    config = models.tiny_gpt2(seed).config
    return models._seeded(lambda: transformers.GPT2LMHeadModel(config), seed)


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny transformers model and the PEFT task type its outputs match."""

    name: str
    title: str
    build: Callable[[], Any]
    task: str


FAMILIES = (
    Family("bert", "tiny BERT (`FEATURE_EXTRACTION`)", models.tiny_bert, "FEATURE_EXTRACTION"),
    Family("bert-cls", "tiny BERT classifier (`SEQ_CLS`)", lambda: models.tiny_bert(head=True), "SEQ_CLS"),
    Family("llama", "tiny LLaMA (`FEATURE_EXTRACTION`)", models.tiny_llama, "FEATURE_EXTRACTION"),
    Family("gpt2", "tiny GPT-2 (`FEATURE_EXTRACTION`)", models.tiny_gpt2, "FEATURE_EXTRACTION"),
    Family("gpt2-lm", "tiny GPT-2 LM (`CAUSAL_LM`)", tiny_gpt2_lm, "CAUSAL_LM"),
)


@dataclasses.dataclass(frozen=True)
class Method:
    """How to configure one prompt-learning method on each family: a PEFT config, or why it does not apply."""

    name: str
    title: str
    config: Callable[[Family], Any]
    onnx_family: str | None
    """The family whose cell also compiles to ONNX; None where the program is another method's (only the
    saved tensor differs), whose ONNX cell stands for it (:attr:`same_as`)."""
    same_as: str = "prompt tuning"


def _prompt_tuning(family: Family) -> Any:
    from peft import PromptTuningConfig

    if family.name == "gpt2-lm":
        return "not a separate cell: the cells of CPT and multitask prompt tuning run this wiring on the LM"
    return PromptTuningConfig(task_type=family.task, num_virtual_tokens=5)


def _p_tuning(family: Family) -> Any:
    from peft import PromptEncoderConfig

    # The file holds the encoder's output (LSTM here; the MLP alike), so the traced program is prompt
    # tuning's: one cell checks the saved rows against PEFT, and prompt tuning's cells the families.
    if family.name != "bert-cls":
        return "not a separate cell: P-tuning's program is prompt tuning's (the file holds the encoder's output)"
    return PromptEncoderConfig(task_type=family.task, num_virtual_tokens=4, encoder_reparameterization_type="LSTM")


def _multitask(family: Family) -> Any:
    from peft import MultitaskPromptTuningConfig

    if family.task == "FEATURE_EXTRACTION":
        return "PEFT's FEATURE_EXTRACTION model passes no task_ids to the prompt"
    return MultitaskPromptTuningConfig(task_type=family.task, num_virtual_tokens=4, num_tasks=3, num_ranks=2)


def _cpt(family: Family) -> Any:
    from peft import CPTConfig

    if family.task != "CAUSAL_LM":
        return "PEFT's CPT is for CAUSAL_LM only"
    return CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[3, 1, 4], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 3])


def _prefix(family: Family) -> Any:
    from peft import PrefixTuningConfig

    if family.task not in ("FEATURE_EXTRACTION", "CAUSAL_LM"):
        return "prefix tuning is inserted for FEATURE_EXTRACTION and CAUSAL_LM (PEFT runs a classifier's head itself)"
    return PrefixTuningConfig(task_type=family.task, num_virtual_tokens=3)


def _cartridge(family: Family) -> Any:
    from peft import CartridgeConfig

    if family.name != "gpt2":
        return "not a separate cell: a cartridge runs as prefix tuning (the file holds the whole prefix)"
    return CartridgeConfig(task_type=family.task, num_virtual_tokens=4, num_frozen_tokens=1)


def _adaption(family: Family) -> Any:
    from peft import AdaptionPromptConfig

    if family.name.startswith("bert"):
        return "PEFT's adaption prompt adapts LLaMA, Mistral and GPT-2 attention"
    if family.name == "gpt2-lm":
        return "not a separate cell: the GPT-2 cell adapts the same attention modules"
    return AdaptionPromptConfig(task_type=family.task, adapter_len=4, adapter_layers=1)


METHODS = (
    Method("prompt_tuning", "Prompt tuning (`PROMPT_TUNING`)", _prompt_tuning, "bert-cls"),
    Method("p_tuning", "P-tuning (`P_TUNING`)", _p_tuning, None),
    Method("multitask_prompt_tuning", "Multitask prompt tuning (`MULTITASK_PROMPT_TUNING`)", _multitask, "bert-cls"),
    Method("cpt", "CPT (`CPT`)", _cpt, None),
    Method("prefix_tuning", "Prefix tuning (`PREFIX_TUNING`)", _prefix, "gpt2"),
    Method("cartridge", "Cartridge (`CARTRIDGE`)", _cartridge, None, "prefix tuning"),
    Method("adaption_prompt", "Adaption prompt (`ADAPTION_PROMPT`, LLaMA-Adapter)", _adaption, "llama"),
)


def cells() -> list[tuple[Method, Family]]:
    """Every (method, family) pair the matrix verifies."""
    return [(m, f) for m in METHODS for f in FAMILIES if not isinstance(m.config(f), str)]


def render() -> str:
    """The README table: ✓ where a cell is verified (inserted), else a numbered reason."""
    reasons: list[str] = []
    header = ["method", *(f.title for f in FAMILIES), "ONNX end to end"]
    rows = []
    for method in METHODS:
        row = [method.title]
        for family in FAMILIES:
            config = method.config(family)
            if isinstance(config, str):
                if config not in reasons:
                    reasons.append(config)
                row.append(f"—{_superscript(reasons.index(config) + 1)}")
            else:
                row.append("✓")
        onnx = next((f.title for f in FAMILIES if f.name == method.onnx_family), f"as {method.same_as}")
        row.append(onnx)
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [f"{_superscript(i + 1)} {reason}" for i, reason in enumerate(reasons)]
    return "\n".join(lines) + ("\n\n" + "<br>\n".join(notes) if notes else "") + "\n"


def readme_section(text: str) -> str:
    """The generated part of README.md, between the prompt-learning markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def _superscript(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))


if __name__ == "__main__":
    table = render()
    if "--write" in sys.argv:
        text = README.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        README.write_text(text[:start] + "\n" + table + text[end:])
    print(table, end="")
