"""S²FT adapters on a ~100M LLaMA-style model: merged vs unmerged (gather/scatter + one GEMM) vs unmerged
on a co-permuted base (slices + one GEMM, ``--co-permute``) vs a LoRA of the same parameter count, and
both in swappable slots, all compiled to ONNX and run by onnxruntime.

Run from the repository root (never alongside another benchmark)::

    python benchmarks/sparsity.py [--quick] [--reps N] [--json]

The base is a seeded ``LlamaModel`` from config (hidden 768, 12 layers, 12 query heads over 4 KV heads,
FFN 2048, vocab 32000: 101M parameters; ``--quick``: 2 layers, 37M) saved as a Hugging Face directory. The
S²FT adapter is seeded and in peftc's own format (``PEFTC_S2FT``), with the official script's LLaMA
ratios rounded to whole heads: per layer one KV head's ``v_proj`` rows (64 of 256), one query head's
``o_proj`` columns (64 of 768), 3 % of the FFN channels in ``up_proj`` rows and ``down_proj`` columns
(61 of 2048). The LoRA (PEFT, seeded B) targets the same four modules with the rank whose parameter
count is closest to the S²FT adapter's. Six compiles (``peftc.compile``, onnx, fp32, verified against
the reference program; PEFT's oracle off to keep the run short): S²FT merged, S²FT unmerged
(``--no-merge``), S²FT unmerged co-permuted (``--no-merge --co-permute``), LoRA unmerged, and two
``--swappable`` ones: S²FT slots holding the adapter and a second seeded one (same ``k`` per module, so
the slots are full: no padding), and LoRA slots holding the LoRA (slot rank: its rank), each called with
``adapter=`` its first adapter. Latency: batch 1 and 8 × seq 128 (``--quick``: seq 64), the six artifacts
interleaved rep by rep, median. Goals: unmerged gather ≤ 1.15× merged, co-permuted slice ≤ 1.05×
merged. Numbers from a shared 2-vCPU VM are noisy: rerun on an idle machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def base_model(layers: int):
    """The seeded LLaMA-style base."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=4,
        intermediate_size=2048, vocab_size=32000, max_position_embeddings=512, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaModel(config).eval().requires_grad_(False)


def s2ft_adapter(model, path: Path, seed: int = 1) -> int:
    """Write a seeded S²FT adapter (see the module docstring); its parameter count."""
    from safetensors.torch import save_file

    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    generator = torch.Generator().manual_seed(seed)
    channels = max(1, round(0.03 * cfg.intermediate_size))
    tensors, targets = {}, []

    def pick(count: int, size: int) -> torch.Tensor:
        return torch.randperm(size, generator=generator)[:count].sort().values

    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        v_head = int(pick(1, cfg.num_key_value_heads)[0])
        o_head = int(pick(1, cfg.num_attention_heads)[0])
        parts = {
            p + "self_attn.v_proj": ("rows", torch.arange(v_head * hd, (v_head + 1) * hd), (hd, cfg.hidden_size)),
            p + "self_attn.o_proj": ("columns", torch.arange(o_head * hd, (o_head + 1) * hd), (cfg.hidden_size, hd)),
            p + "mlp.up_proj": ("rows", pick(channels, cfg.intermediate_size), (channels, cfg.hidden_size)),
            p + "mlp.down_proj": ("columns", pick(channels, cfg.intermediate_size), (cfg.hidden_size, channels)),
        }
        for module, (side, indices, shape) in parts.items():
            tensors[f"{module}.s2ft_{side}"] = indices
            tensors[f"{module}.s2ft_block"] = 0.02 * torch.randn(shape, generator=generator)
            targets.append(module)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "PEFTC_S2FT", "format_version": 1, "target_modules": targets}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return sum(t.numel() for k, t in tensors.items() if k.endswith("s2ft_block"))


def lora_adapter(model, path: Path, parameters: int) -> int:
    """A seeded PEFT LoRA on v/o/up/down with the rank closest to ``parameters``; its rank."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    per_rank = cfg.num_hidden_layers * (
        (cfg.hidden_size + cfg.num_key_value_heads * hd)
        + 2 * cfg.hidden_size
        + 2 * (cfg.hidden_size + cfg.intermediate_size)
    )
    rank = max(1, round(parameters / per_rank))
    seeded_lora(model, path, rank, ["v_proj", "o_proj", "up_proj", "down_proj"])
    return rank


def seeded_lora(model, path: Path, rank: int, targets: list[str]) -> Path:
    """A PEFT LoRA of ``rank`` (α = rank) on ``targets`` whose B is seeded (0.02·N(0, 1)), saved at ``path``."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(str(path))
    return path


def _time(runners: dict, inputs: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(**inputs)  # warm-up
    for _ in range(reps):
        for name, run in runners.items():
            start = time.perf_counter()
            run(**inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def main() -> None:
    """Build, compile, time and print (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, seq 64, fewer reps")
    parser.add_argument("--reps", type=int, help="timed reps per path (default 20; quick 8)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import peftc
    from peftc.runtime import load

    layers, seq, reps = (2, 64, 8) if args.quick else (12, 128, 20)
    reps = args.reps or reps
    torch.set_num_threads(2)
    result: dict = {"layers": layers, "seq": seq, "reps": reps}
    with tempfile.TemporaryDirectory(prefix="peftc-sparsity-") as tmp:
        root = Path(tmp)
        model = base_model(layers)
        model.save_pretrained(str(root / "base"))
        result["base_parameters"] = sum(p.numel() for p in model.parameters())
        result["s2ft_parameters"] = s2ft_adapter(model, root / "s2ft")
        result["lora_rank"] = lora_adapter(model, root / "lora", result["s2ft_parameters"])
        s2ft_adapter(model, root / "s2ft_b", seed=5)
        builds = {
            "s2ft_merged": (["s2ft"], {"merge": True}),
            "s2ft_unmerged": (["s2ft"], {"merge": False}),
            "s2ft_sliced": (["s2ft"], {"merge": False, "co_permute": True}),
            "lora_unmerged": (["lora"], {"merge": False}),
            "s2ft_slots": (["s2ft", "s2ft_b"], {"swappable": True}),
            "lora_slots": (["lora"], {"swappable": True}),
        }
        runners, result["compile_s"] = {}, {}
        for name, (adapters, options) in builds.items():
            print(f"compiling {name}", file=sys.stderr)
            start = time.perf_counter()
            paths = [root / a for a in adapters]
            peftc.compile(str(root / "base"), paths, out=root / name, oracle=False, **options)
            result["compile_s"][name] = round(time.perf_counter() - start, 1)
            runner = load(root / name)
            runners[name] = functools.partial(runner, adapter=adapters[0]) if options.get("swappable") else runner
        generator = torch.Generator().manual_seed(3)
        for batch in (1, 8):
            ids = torch.randint(0, 32000, (batch, seq), generator=generator).numpy()
            inputs = {"input_ids": ids, "attention_mask": (ids * 0 + 1)}
            ms = _time(runners, inputs, reps)
            result[f"b{batch}_ms"] = {k: round(v, 2) for k, v in ms.items()}
            result[f"b{batch}_vs_merged"] = {k: round(v / ms["s2ft_merged"], 3) for k, v in ms.items()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"base {result['base_parameters'] / 1e6:.1f}M parameters, {layers} layers, seq {seq}, {reps} reps")
    print(f"S²FT adapter {result['s2ft_parameters']} parameters; LoRA r={result['lora_rank']} on v/o/up/down")
    print("compile s: " + ", ".join(f"{k} {v}" for k, v in result["compile_s"].items()))
    for batch in (1, 8):
        row = ", ".join(f"{k} {v} ms ({result[f'b{batch}_vs_merged'][k]}×)" for k, v in result[f"b{batch}_ms"].items())
        print(f"batch {batch}: {row}")


if __name__ == "__main__":
    main()
