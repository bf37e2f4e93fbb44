"""ShadowPEFT is refused with its reason (``peftc/methods/refused.py``), and the reason is checked against
PEFT itself: its model has no merge."""

from __future__ import annotations

import json

import models
import pytest
import torch
import transformers
from safetensors.torch import save_file

from peftc.errors import UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.methods.loading import load_adapter


@pytest.mark.parametrize(
    ("peft_type", "reason"),
    [
        ("SHADOW", "ShadowPEFT runs a second trainable transformer backbone .* not a weight change"),
    ],
)
def test_refused_with_the_reason(tmp_path, peft_type, reason):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    save_file({"base_model.model.layers.0.weight": torch.ones(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedError, match=rf"peft_type '{peft_type}' is refused: {reason}"):
        load_adapter(tmp_path, module_table_from_module(models.mlp()))


def test_peft_cannot_merge_a_shadow_adapter():
    from peft import ShadowConfig, get_peft_model

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    model = models._seeded(lambda: transformers.LlamaForCausalLM(config))
    peft_model = get_peft_model(model, ShadowConfig(task_type="CAUSAL_LM", r=2, init_weights=False)).eval()
    assert any(".shadow_down." in name for name, _ in peft_model.named_parameters())
    with pytest.raises(NotImplementedError, match="input-dependent"):
        peft_model.merge_and_unload()
