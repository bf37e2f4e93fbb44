"""SSF and ZeroI2V re-parameterisation: does the folded artifact cost nothing over the base model's?

Run from the repository root (never alongside another benchmark; see benchmarks/README.md)::

    python benchmarks/reparam.py [--model vit_small_patch16_224] [--reps 20] [--frames 8] [--json]

Needs timm (``pip install 'peftc[timm]'`` and a torchvision matching torch; without a usable
torchvision, timm is imported against the same stand-in the tests use).

What is measured
----------------
Two sections, each a base model with seeded random weights (there is no model hub) and a seeded
random adapter, compiled with ``peftc.compile`` to a merged ONNX artifact:

* **SSF**: ``timm:MODEL`` at its default image size with official-format SSF vectors at every
  placement of the official ViT (``γ ~ 1 + 0.1·N(0,1)``, ``β ~ 0.05·N(0,1)``), batch 1;
* **ZeroI2V**: the same ViT applied per frame to ``--frames`` frames of ``--video-size`` images
  (frames folded into the batch, class tokens averaged over time), official-format linear adapters
  at the four placements of every block (hidden width dim/4, scale 0.5, up-projections drawn at
  0.02 so they are not the zero init) and STDHA (``shift_div`` = number of heads: one head of keys
  and one of values move each way), batch 1.

Paths, per section:

==========================  =========================================================================
``*_eager_unfolded``        eager PyTorch: the base module with the adapter applied by forward hooks
                            at peftc's parsed sites (SSF: ``x·γ + β``; ZeroI2V: the adapters and the
                            temporal shift), i.e. what a user runs without a compiler
``*_eager_base``            eager PyTorch of the base model (no adapter)
``*_artifact_folded``       the peftc artifact (``fold-ssf`` / ``fold-linear-adapters`` applied)
``*_artifact_base``         the base model lowered by the same ONNX backend (trace → ``lower``),
                            run by the same onnxruntime session settings
``*_artifact_no_stdha``     ZeroI2V only: the same adapters compiled without STDHA, to separate the
                            temporal shift's cost from the adapters' (its numerics differ from the
                            unfolded model's by STDHA's effect)
==========================  =========================================================================

Timing is interleaved as in ``compile_minilm.py``: every repetition shuffles the paths of a section
and, for each, makes one untimed call then one timed call; a ratio ``A / B`` is the median over
repetitions of ``time(A) / time(B)`` from the same repetition, with its interquartile range. The
numerics line is the max abs error of each path against ``*_eager_unfolded``.

Headline goals: ``artifact_folded / artifact_base`` ≤ 1.03 (the zero-cost claim of both papers), per
section; ``eager_unfolded / artifact_folded`` is shown for contrast.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
for extra in (REPO, REPO / "tests", REPO / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from compile_minilm import log, paired_ratio, time_interleaved  # noqa: E402  (the shared timing helpers)
from safetensors.torch import save_file  # noqa: E402

import peftc  # noqa: E402
from peftc import ir  # noqa: E402
from peftc.backends import LowerRequest, get_backend  # noqa: E402
from peftc.backends.ort import OrtRunner  # noqa: E402
from peftc.loaders import parse_inputs  # noqa: E402
from peftc.methods.loading import load_adapter  # noqa: E402

GOAL = 1.03
ORDER_SEED = 0
Call = Callable[[], Any]


def import_timm() -> Any:
    try:
        import timm

        return timm
    except Exception:
        from models import import_timm as tests_import_timm  # the tests' torchvision stand-in

        return tests_import_timm()


# ------------------------------------------------------------------------------------------------
# models and adapters


def build_vit(name: str, seed: int, **kwargs: Any) -> torch.nn.Module:
    timm = import_timm()
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class VideoViT(torch.nn.Module):
    """A ViT applied to each frame of ``[B, T, 3, H, W]``, class tokens averaged over time, then the head."""

    def __init__(self, vit: torch.nn.Module, frames: int) -> None:
        super().__init__()
        self.vit, self.frames = vit, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x.flatten(0, 1))
        pooled = tokens[:, 0].reshape(x.shape[0], self.frames, -1).mean(1)
        return self.vit.head(self.vit.fc_norm(pooled))


def ssf_checkpoint(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Official SSF key naming for every placement of the official ViT."""
    dim, hidden = model.embed_dim, model.blocks[0].mlp.fc1.out_features
    sizes = {"patch_embed.ssf_{}_1": dim, "ssf_{}_1": dim}
    for i in range(len(model.blocks)):
        sizes |= {f"blocks.{i}.ssf_{{}}_{n}": dim for n in (1, 2)}
        sizes |= {f"blocks.{i}.attn.ssf_{{}}_1": 3 * dim, f"blocks.{i}.attn.ssf_{{}}_2": dim}
        sizes |= {f"blocks.{i}.mlp.ssf_{{}}_1": hidden, f"blocks.{i}.mlp.ssf_{{}}_2": dim}
    tensors = {}
    for key, size in sizes.items():
        tensors[key.format("scale")] = 1 + 0.1 * torch.randn(size, generator=generator)
        tensors[key.format("shift")] = 0.05 * torch.randn(size, generator=generator)
    return tensors


def zeroi2v_checkpoint(model: VideoViT, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Official ZeroI2V key naming (CLIP block paths) for the four placements of every block."""
    dim = model.vit.embed_dim
    hidden = dim // 4
    tensors = {}
    for i in range(len(model.vit.blocks)):
        for name in ("T_Adapter_in", "S_Adapter", "MLP_Adapter", "MLP_Adapter_out"):
            prefix = f"backbone.transformer.resblocks.{i}.{name}"
            tensors[f"{prefix}.D_fc1.weight"] = torch.randn(hidden, dim, generator=generator) / dim**0.5
            tensors[f"{prefix}.D_fc1.bias"] = 0.02 * torch.randn(hidden, generator=generator)
            tensors[f"{prefix}.D_fc2.weight"] = 0.02 * torch.randn(dim, hidden, generator=generator)
            tensors[f"{prefix}.D_fc2.bias"] = 0.02 * torch.randn(dim, generator=generator)
    return tensors


def hooked(model: torch.nn.Module, adapter: Any) -> torch.nn.Module:
    """``model`` with each of peftc's parsed activation sites applied by a forward (pre-)hook."""
    modules = dict(model.named_modules())
    for site in adapter.sites:
        tensors = [t.tensor if t is not None else None for t in site.tensors.values()]
        scalars = list(site.scalars.values())
        op = getattr(torch.ops.peftc, site.op)

        def apply(x: torch.Tensor, op: Any = op, tensors: list = tensors, scalars: list = scalars) -> torch.Tensor:
            return op(x, *tensors, *scalars)

        if site.position == "input":
            modules[site.module].register_forward_pre_hook(lambda m, args, apply=apply: (apply(args[0]), *args[1:]))
        else:
            modules[site.module].register_forward_hook(lambda m, args, out, apply=apply: apply(out))
    return model


def as_array(value: Any) -> np.ndarray:
    if isinstance(value, Mapping):
        value = next(iter(value.values()))
    return value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# ------------------------------------------------------------------------------------------------


def section(
    label: str,
    base: torch.nn.Module,
    adapter_path: Path,
    inputs: list[str],
    example: torch.Tensor,
    workdir: Path,
    reps: int,
    rng: random.Random,
    spec: Any = None,
    variants: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    signature = parse_inputs(inputs)
    log(f"== {label}: trace the base and lower it to ONNX")
    program = ir.trace(base, signature.example(signature.trace_sizes()), signature.dynamic_shapes())
    (workdir / f"{label}-base").mkdir()
    get_backend("onnx").lower(LowerRequest(program, signature), workdir / f"{label}-base", lambda m: None)
    log(f"== {label}: peftc.compile")
    start = time.perf_counter()
    artifact = peftc.compile(
        spec if spec is not None else base,
        adapter_path,
        out=workdir / f"{label}-folded",
        inputs=inputs,
        progress=lambda m: log(f"   {m}"),
    )
    compile_s = time.perf_counter() - start
    folds = {p["name"]: p["stats"] for p in artifact.manifest.pipeline if p["name"].startswith("fold-")}
    extra = {}
    for variant, path in (variants or {}).items():
        log(f"== {label}: peftc.compile ({variant})")
        out = workdir / f"{label}-{variant}"
        extra[variant] = peftc.load(
            peftc.compile(spec if spec is not None else base, path, out=out, inputs=inputs).path
        )
    unfolded = hooked(_copy(base), load_adapter(adapter_path, ir.module_table(program)))
    folded_runner = peftc.load(artifact.path).backend_runner
    base_runner = OrtRunner(workdir / f"{label}-base" / "model.onnx")
    feeds = {"x": example.numpy()}
    calls: dict[str, Call] = {
        f"{label}_eager_unfolded": lambda: unfolded(example),
        f"{label}_eager_base": lambda: base(example),
        f"{label}_artifact_folded": lambda: folded_runner.run(feeds),
        f"{label}_artifact_base": lambda: base_runner.run(feeds),
    }
    for variant, runner in extra.items():
        calls[f"{label}_artifact_{variant}"] = lambda runner=runner.backend_runner: runner.run(feeds)
    with torch.no_grad():
        reference = as_array(calls[f"{label}_eager_unfolded"]())
        errors = {name: float(np.abs(as_array(call()) - reference).max()) for name, call in calls.items()}
        log(f"== {label}: {reps} interleaved repetitions of {len(calls)} paths")
        times = time_interleaved(calls, reps, rng)
    ratios = {
        "artifact_folded / artifact_base": paired_ratio(times, f"{label}_artifact_folded", f"{label}_artifact_base"),
        "eager_unfolded / artifact_folded": paired_ratio(times, f"{label}_eager_unfolded", f"{label}_artifact_folded"),
        "eager_unfolded / eager_base": paired_ratio(times, f"{label}_eager_unfolded", f"{label}_eager_base"),
    }
    for variant in extra:
        ratios[f"artifact_{variant} / artifact_base"] = paired_ratio(
            times, f"{label}_artifact_{variant}", f"{label}_artifact_base"
        )
    return {
        "label": label,
        "input_shape": list(example.shape),
        "compile_s": compile_s,
        "folds": folds,
        "paths": {
            name: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "max_abs_err": errors[name]}
            for name, ts in times.items()
        },
        "ratios": ratios,
        "goal_met": ratios["artifact_folded / artifact_base"]["median"] <= GOAL,
    }


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def run(model_name: str, reps: int, frames: int, video_size: int) -> dict[str, Any]:
    torch.set_num_threads(2)
    rng = random.Random(ORDER_SEED)
    generator = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory(prefix="peftc-reparam-") as tmp:
        work = Path(tmp)
        vit = build_vit(model_name, seed=0)
        size = vit.pretrained_cfg["input_size"][1]
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(work / "vit.safetensors"))
        save_file(ssf_checkpoint(vit, generator), str(work / "ssf.safetensors"))
        image = torch.randn(1, 3, size, size, generator=generator)
        ssf = section(
            "ssf",
            vit,
            work / "ssf.safetensors",
            [f"x:batch,3,{size},{size}:float32"],
            image,
            work,
            reps,
            rng,
            spec=f"timm:{model_name}@{work / 'vit.safetensors'}",
        )
        video = VideoViT(build_vit(model_name, seed=0, img_size=video_size), frames).eval()
        heads = video.vit.blocks[0].attn.num_heads
        config = {"peft_type": "ZEROI2V", "scale": 0.5, "num_frames": frames, "stdha": {"shift_div": heads}}
        folder = work / "zeroi2v"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file(zeroi2v_checkpoint(video, generator), str(folder / "adapter_model.safetensors"))
        clip = torch.randn(1, frames, 3, video_size, video_size, generator=generator)
        inputs = [f"x:batch,{frames},3,{video_size},{video_size}:float32"]
        # the same adapters without STDHA: how much of the artifact's cost is the temporal shift
        plain = work / "zeroi2v-no-stdha"
        plain.mkdir()
        (plain / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "stdha"}))
        (plain / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
        zeroi2v = section("zeroi2v", video, folder, inputs, clip, work, reps, rng, variants={"no_stdha": plain})
    return {
        "model": model_name,
        "reps": reps,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "peftc_version": peftc.__version__,
        "sections": [ssf, zeroi2v],
    }


def print_report(result: Mapping[str, Any]) -> None:
    print(f"peftc re-parameterisation benchmark: {result['model']}, {result['reps']} interleaved repetitions")
    print(f"torch threads {result['torch_threads']}; {result['cpus']} CPUs; peftc {result['peftc_version']}")
    for s in result["sections"]:
        print()
        print(f"{s['label']}: input {s['input_shape']}, compile {s['compile_s']:.1f} s, folds {s['folds']}")
        print(f"  {'path':26s} {'median ms':>10s} {'min ms':>9s}   max abs err vs eager unfolded")
        for name, p in s["paths"].items():
            print(f"  {name:26s} {p['median_ms']:10.1f} {p['min_ms']:9.1f}   {p['max_abs_err']:.1e}")
        for name, r in s["ratios"].items():
            headline = name == "artifact_folded / artifact_base"
            goal = f"goal <= {GOAL}x: {'goal met' if s['goal_met'] else 'goal missed'}" if headline else ""
            print(f"  {name:34s} {r['median']:5.3f}x  [{r['q1']:.3f}-{r['q3']:.3f}]  {goal}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT (default vit_small_patch16_224)")
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions per section (default 20)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip for ZeroI2V (default 8)")
    parser.add_argument("--video-size", type=int, default=112, help="frame size for ZeroI2V (default 112)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    if args.reps < 2:
        parser.error("--reps must be >= 2")
    result = run(args.model, args.reps, args.frames, args.video_size)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
