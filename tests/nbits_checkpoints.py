"""GPTQ and AWQ Hugging Face directories made in the tests (no auto-gptq / autoawq here): a tiny
``LlamaForCausalLM`` whose linear layers are quantized and packed by ``tests/quant_packing.py`` (written
from the published formulas, not peftc's code), saved with a matching ``quantization_config``; the same
model in fp32 with exactly the dequantized weights (``quant_packing.truth``); a PEFT LoRA made on it."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import bnb_checkpoints
import quant_packing
import torch
import workdirs

GROUP = 32
CONFIGS = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False,
             "checkpoint_format": "gptq", "damp_percent": 0.1, "true_sequential": True},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"},
}  # fmt: skip
TARGETS = ["q_proj", "v_proj", "down_proj"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.cache
def root() -> Path:
    """``<fmt>/`` (packed), ``<fmt>-float/`` (dequantized fp32) and ``lora-<fmt>/`` for gptq and awq."""
    import peft
    import safetensors.torch
    import transformers

    warnings.filterwarnings("ignore")
    path = workdirs.work_dir("peftc-nbits-")
    config = bnb_checkpoints.llama_config()
    for index, fmt in enumerate(CONFIGS):
        torch.manual_seed(index)
        model = transformers.LlamaForCausalLM(config)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(10 + index)
        for name, module in model.named_modules():
            if name.rpartition(".")[2] not in LINEARS:
                continue
            group = torch.arange(module.in_features) // GROUP
            q, zeros, scales = quant_packing.quantize(module.weight.detach(), group, int(group.max()) + 1, 4, gen)
            packed = (
                quant_packing.gptq(q, zeros, scales, group, 4, 1, True)
                if fmt == "gptq"
                else quant_packing.awq(q, zeros, scales)
            )
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": v for k, v in packed.items()})
            module.weight.data = quant_packing.truth(q, zeros, scales, group).contiguous()
        model.save_pretrained(path / f"{fmt}-float")
        (path / fmt).mkdir()
        config.save_pretrained(path / fmt)
        saved = json.loads((path / fmt / "config.json").read_text())
        (path / fmt / "config.json").write_text(json.dumps({**saved, "quantization_config": CONFIGS[fmt]}))
        safetensors.torch.save_file(state, str(path / fmt / "model.safetensors"))
        torch.manual_seed(20 + index)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        peft.get_peft_model(model, lora).save_pretrained(path / f"lora-{fmt}")
    return path


def peft_on_float(fmt: str) -> torch.nn.Module:
    """PEFT's LoRA on the fp32 model whose weights are exactly the dequantized ``fmt`` weights."""
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(root() / f"{fmt}-float")
    return peft.PeftModel.from_pretrained(model, root() / f"lora-{fmt}").eval()
