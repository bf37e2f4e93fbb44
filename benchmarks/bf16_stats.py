"""What keeping LayerNorm statistics and attention softmax in fp32 buys a bf16 model (issue 13).

Run from the repository root::

    python benchmarks/bf16_stats.py [--batch 8] [--seq 128] [--json]

The bundled MiniLM with its LoRA merged (PEFT ``merge_and_unload``) runs in eager PyTorch in bf16 four
ways: everything bf16; ``F.layer_norm`` computed in fp32 (inputs, weight and bias upcast, result cast
back); ``F.scaled_dot_product_attention`` in fp32; both. Each output's error is measured against the
same model in fp32 (max abs, and relative to max|y|). The fp32 variants are made by wrapping the two
functional ops for the duration of a run, so the model, its weights and its bf16 GEMMs stay the same
and only the statistics' precision changes. Equal errors mean the bf16 kernels already keep those
statistics in fp32 (PyTorch's CPU layer norm and attention accumulate in fp32), and that the error
comes from bf16 weights and GEMM inputs, which an fp32 side path cannot remove.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADAPTER = "examples/minilm-lora"


def _up(t):
    return None if t is None else t.float()


def _layer_norm32(x, shape, weight=None, bias=None, eps=1e-5):
    return _ORIGINAL["layer_norm"](x.float(), shape, _up(weight), _up(bias), eps).to(x.dtype)


def _attention32(q, k, v, *args, **kwargs):
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    return _ORIGINAL["scaled_dot_product_attention"](q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)


_ORIGINAL = {"layer_norm": F.layer_norm, "scaled_dot_product_attention": F.scaled_dot_product_attention}
_FP32 = {"layer_norm": _layer_norm32, "scaled_dot_product_attention": _attention32}
VARIANTS = {
    "bf16 everywhere": (),
    "layer norm fp32": ("layer_norm",),
    "attention fp32": ("scaled_dot_product_attention",),
    "both fp32": ("layer_norm", "scaled_dot_product_attention"),
}


@contextlib.contextmanager
def in_fp32(ops: tuple[str, ...]) -> Iterator[None]:
    for op in ops:
        setattr(F, op, _FP32[op])
    try:
        yield
    finally:
        for op in ops:
            setattr(F, op, _ORIGINAL[op])


def measure(batch: int, seq: int) -> dict:
    from peft import PeftModel

    from examples.minilm import model as load_base
    from peftc import machine

    torch.manual_seed(0)
    merged = PeftModel.from_pretrained(load_base().eval(), ADAPTER).merge_and_unload().eval()
    ids = torch.randint(100, merged.config.vocab_size, (batch, seq))
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    with torch.no_grad():
        reference = merged(input_ids=ids, attention_mask=mask).last_hidden_state
        bf16 = copy.deepcopy(merged).to(torch.bfloat16)
        scale = float(reference.abs().max())
        errors = {}
        for name, ops in VARIANTS.items():
            with in_fp32(ops):
                out = bf16(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            worst = float((out - reference).abs().max())
            errors[name] = {"max_abs": worst, "relative": worst / scale}
    return {"batch": batch, "seq": seq, "cpu": machine.cpu(), "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.batch, args.seq)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    cpu = result["cpu"]
    print(
        f"MiniLM + LoRA merged, bf16 eager, batch {args.batch} seq {args.seq}; {cpu['model']}, ISA {' '.join(cpu['isa'])}"
    )
    for name, error in result["errors"].items():
        print(f"  {name:18s} max abs {error['max_abs']:.3e}   relative {error['relative']:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
