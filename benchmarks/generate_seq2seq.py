"""``benchmarks/generate.py --seq2seq``: a ``--task text2text-generation`` T5 artifact against PEFT's generate.

A T5 from a config (d_model 256, 4+4 layers, vocabulary 8000, about 13M parameters; ``--quick``:
d_model 64, 2+2 layers, vocabulary 1000) with a LoRA of rank 16 on q/k/v/o of every attention
(``init_lora_weights=False``) is compiled merged to ONNX (fp32, onnxruntime CPU). For prompts of 32
and 256 tokens and batches of 1 and 8 it generates 32 new tokens (greedy) with ``runner.generate``
(encoder once, then one decoder step per token with the self-attention cache and the cross K/V
computed once) and with ``PeftModel.generate`` in fp32 eager PyTorch (its own cache), and checks
that both give the same tokens. Medians of repeats on a shared machine: noisy, compare the ratios.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

NEW = 32


def _model(quick: bool) -> torch.nn.Module:
    import transformers

    size = (
        {"d_model": 64, "d_kv": 16, "d_ff": 256, "num_layers": 2, "vocab_size": 1000}
        if quick
        else {"d_model": 256, "d_kv": 32, "d_ff": 1024, "num_layers": 4, "vocab_size": 8000}
    )
    config = transformers.T5Config(num_heads=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **size)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def _adapter(model: torch.nn.Module, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q", "k", "v", "o"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(model), config).save_pretrained(str(path))
    return path


def run(quick: bool, as_json: bool, timed) -> None:
    """Compile, time, print (``timed(fn, repeats)``: the median seconds of ``fn``)."""
    from peft import PeftModel

    import peftc

    model = _model(quick)
    params = sum(p.numel() for p in model.parameters())
    repeats, rows = (1 if quick else 2), []
    options = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = _adapter(model, Path(tmp) / "lora")
        start = time.perf_counter()
        peftc.compile(model, adapter, out=Path(tmp) / "out", task="text2text-generation")
        compile_s = time.perf_counter() - start
        runner = peftc.load(Path(tmp) / "out")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
        for prompt in (32, 256):
            for batch in (1, 8):
                ids = np.random.default_rng(prompt + batch).integers(3, 1000, (batch, prompt))
                ours = runner.generate(ids, max_new_tokens=NEW)
                art = timed(lambda ids=ids: runner.generate(ids, max_new_tokens=NEW), repeats)
                tensor = torch.from_numpy(ids)
                with torch.no_grad():
                    theirs = peft_model.generate(input_ids=tensor, **options)
                    eager = timed(lambda tensor=tensor: peft_model.generate(input_ids=tensor, **options), repeats)
                tokens = batch * NEW
                rows.append({
                    "prompt": prompt, "batch": batch, "artifact_tok_s": tokens / art, "peft_tok_s": tokens / eager,
                    "artifact_vs_peft": eager / art, "same_tokens": bool(np.array_equal(ours, theirs.numpy())),
                })  # fmt: skip
    if as_json:
        print(json.dumps({"parameters": params, "compile_s": compile_s, "rows": rows}, indent=2))
        return
    print(f"T5 {params / 1e6:.1f}M parameters, LoRA r16 merged, onnx fp32; compile {compile_s:.0f} s")
    print(f"{'prompt':>6} {'batch':>5} {'artifact tok/s':>15} {'PEFT tok/s':>11} {'vs PEFT':>8} {'same tokens':>12}")
    for r in rows:
        print(
            f"{r['prompt']:>6} {r['batch']:>5} {r['artifact_tok_s']:>15.1f} {r['peft_tok_s']:>11.1f} "
            f"{r['artifact_vs_peft']:>7.2f}x {r['same_tokens']!s:>12}"
        )
