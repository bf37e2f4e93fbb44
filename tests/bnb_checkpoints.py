"""Real bitsandbytes checkpoints and PEFT QLoRA adapters, made on CPU once per test session.

A tiny ``LlamaForCausalLM`` (hidden 64, one layer) is saved in fp32, then loaded by transformers with a
``BitsAndBytesConfig`` and saved again, which is how users get quantized directories. The LoRA adapters
are made by PEFT on the quantized model (``init_lora_weights=False``, so they change the output).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
import workdirs

FORMATS = {
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama_config():
    """The tiny LLaMA (GQA) the quantized-base tests store: one layer, hidden 64, 4 heads over 2 KV heads."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip


@functools.cache
def root() -> Path:
    """The session's directory: ``fp32/``, one directory per format and ``lora-<format>/``."""
    import transformers

    warnings.filterwarnings("ignore")
    path = workdirs.work_dir("peftc-bnb-")
    config = llama_config()
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path / "fp32")
    for name, options in FORMATS.items():
        quantized_model(path / "fp32", options).save_pretrained(path / name)
    return path


def quantized_model(directory: Path, options: dict) -> torch.nn.Module:
    """``directory`` loaded by transformers + bitsandbytes on CPU, quantized with ``options`` (none: as saved)."""
    import transformers

    quant = {"quantization_config": transformers.BitsAndBytesConfig(**options)} if options else {}
    return transformers.LlamaForCausalLM.from_pretrained(directory, device_map="cpu", **quant)


@functools.cache
def adapter(fmt: str) -> Path:
    """A LoRA adapter (r=4, α=8, q/v/down projections) made by PEFT on the ``fmt`` checkpoint."""
    import peft

    path = root() / f"lora-{fmt}"
    torch.manual_seed(1)
    base = quantized_model(root() / fmt, {})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft.get_peft_model(base, config).save_pretrained(path)
    return path
