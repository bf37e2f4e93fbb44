"""Prompt learning (PEFT ``PROMPT_TUNING``, ``P_TUNING``, ``MULTITASK_PROMPT_TUNING``, ``CPT``):
virtual-token embeddings prepended to the input, inserted rather than merged; and prefix tuning
(``PREFIX_TUNING``, ``prefix.py``): trained key/value rows at the head of every attention layer; and
adaption prompt (``ADAPTION_PROMPT``, ``adaption.py``): a gated prompt attended to by the top layers.

These methods change the model's input wiring, not its modules, so they have no sites: the record's
``insert`` wraps the base module before it is traced (``wrapper.py``: the math, the inputs and the
outputs), and the parser then finds the adapter's tensors in the traced program (``parse.py``: the
files, the task types). The artifact takes the base's ``input_ids`` / ``attention_mask`` /
``token_type_ids`` (``task_ids`` too for multitask prompt tuning) and returns what PEFT returns,
virtual positions included. Such an adapter is compiled alone: not in a stack, not ``--swappable``.
"""

from __future__ import annotations

from peftc.methods.common import Fields
from peftc.methods.prompt import adaption, prefix
from peftc.methods.prompt.parse import insert, parser
from peftc.methods.record import Method

_SIZES = "sizes of the base model PEFT records; the prompt's shape is checked against the model itself"
_INIT = "initialisation only (the trained prompt is in the file)"
_HONOURED = ("task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "modules_to_save")
_COMMON = {"num_attention_heads": _SIZES, "num_layers": _SIZES}
_PROMPT_INIT = {
    "prompt_tuning_init": _INIT,
    "prompt_tuning_init_text": _INIT,
    "tokenizer_name_or_path": _INIT,
    "tokenizer_kwargs": _INIT,
}
_ENCODER = "P-tuning's prompt encoder ran when PEFT saved the adapter: the file holds its output"
_CPT = "CPT's training loss and projection (the projected prompt is in the file)"

PROMPT_TUNING = Fields(honoured=_HONOURED, ignored={**_COMMON, **_PROMPT_INIT})
P_TUNING = Fields(
    honoured=_HONOURED,
    ignored={
        **_COMMON,
        **dict.fromkeys(
            ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"),
            _ENCODER,
        ),
    },
)
MULTITASK = Fields(
    honoured=(*_HONOURED, "num_tasks", "num_ranks"),
    ignored={
        **_COMMON,
        **_PROMPT_INIT,
        "prompt_tuning_init_state_dict_path": _INIT,
        "prompt_tuning_init_task": _INIT,
    },
)
CPT = Fields(
    honoured=_HONOURED,
    ignored={
        **_COMMON,
        "tokenizer_name_or_path": _INIT,
        **dict.fromkeys(
            (
                "cpt_token_ids",
                "cpt_mask",
                "cpt_tokens_type_mask",
                "opt_weighted_loss_type",
                "opt_loss_decay_factor",
                "opt_projection_epsilon",
                "opt_projection_format_epsilon",
            ),
            _CPT,
        ),
    },
)

METHODS = (
    *(
        Method(name, (peft_type,), parser(name, fields), fields=fields, insert=insert)
        for name, peft_type, fields in (
            ("prompt_tuning", "PROMPT_TUNING", PROMPT_TUNING),
            ("p_tuning", "P_TUNING", P_TUNING),
            ("multitask_prompt_tuning", "MULTITASK_PROMPT_TUNING", MULTITASK),
            ("cpt", "CPT", CPT),
        )
    ),
    prefix.METHOD,
    prefix.CARTRIDGE,
    adaption.METHOD,
)
"""One record per ``peft_type`` (each lists its own config fields): the prompt methods, inserted
alike, then prefix tuning (``prefix.py``) and adaption prompt (``adaption.py``)."""
