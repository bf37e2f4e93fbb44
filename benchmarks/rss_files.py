"""Peak memory of peftc's read paths on a ~1 GB weights file (``python benchmarks/rss.py --bigfile``).

A seeded timm ViT-L/16 cut to ``--depth`` blocks (20: 254M parameters, 1.02 GB of fp32) is written as a
safetensors state dict, and a BERT of the same size as a Hugging Face directory. Each read path then runs
in a fresh child that imports everything first, resets its peak (``VmHWM``, by writing 5 to
``/proc/self/clear_refs``; Linux only) and reads it after the operation: the peak above the imports,
divided by the file's size, is how many times the file's bytes were held at once.

* ``header``: ``peftc.reading.read_safetensors`` stopped after the header is validated (no data read);
* ``hash``: ``peftc.hashing.sha256_file`` (streamed in 4 MiB chunks);
* ``read``: ``peftc.reading.read_safetensors`` keeping every tensor (the adapter path: one copy);
* ``timm``: ``load_model("timm:...@file")``: the model is built, then each tensor copied in as it is read;
* ``timm-whole-file``: what that loader did before: the whole file read, then ``load_state_dict``;
* ``huggingface``: ``load_model(directory)`` (transformers' own safetensors loading, plus the hash).

``--compile`` also compiles the BERT directory with a LoRA (r=8, query/value) as ``rss.py`` does without
``--bigfile`` (``peftc compile`` in a child, its peak against the fp32 weight bytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIT = "vit_large_patch16_224"

WRITE = f"""
import sys, torch, transformers
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
from safetensors.torch import save_file
import models
out, depth = sys.argv[1], int(sys.argv[2])
timm = models.import_timm()
generator = torch.Generator().manual_seed(0)
def seeded(module):
    return {{k: torch.randn(v.shape, generator=generator) * 0.02 for k, v in module.state_dict().items()}}
with torch.device("meta"):
    vit = timm.create_model({VIT!r}, pretrained=False, depth=depth)
    config = transformers.BertConfig(hidden_size=1024, num_hidden_layers=depth, num_attention_heads=16,
                                     intermediate_size=4096, architectures=["BertModel"])
    bert = transformers.BertModel(config)
save_file(seeded(vit), out + "/vit.safetensors")
import os; os.makedirs(out + "/bert")
save_file(seeded(bert), out + "/bert/model.safetensors")
config.save_pretrained(out + "/bert")
import peft  # a LoRA r=8 on query/value with non-zero B, for --compile
peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]).save_pretrained(out + "/lora")
lora = {{}}
for i in range(depth):
    for name in ("query", "value"):
        key = f"base_model.model.encoder.layer.{{i}}.attention.self.{{name}}"
        lora[key + ".lora_A.weight"] = torch.randn(8, 1024, generator=generator) * 0.02
        lora[key + ".lora_B.weight"] = torch.randn(1024, 8, generator=generator) * 0.02
save_file(lora, out + "/lora/adapter_model.safetensors")
"""

MEASURE = f"""
import json, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import torch, transformers, peft, models
timm = models.import_timm()
from peftc import reading
from peftc.errors import InputError
from peftc.hashing import sha256_file
from peftc.loaders.models import load_model
from peftc.loaders.timm_models import read_state_dict

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {{k: int(fields[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")}}

def stop(header):
    raise InputError("header read")

mode, path, depth = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = f"timm:{VIT},depth={{depth}}@{{path}}"
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status()["VmRSS"]
if mode == "header":
    try:
        reading.read_safetensors(path, check=stop)
    except InputError:
        pass
elif mode == "hash":
    sha256_file(path)
elif mode == "read":
    kept = reading.read_safetensors(path)
elif mode == "timm":
    kept = load_model(spec)
elif mode == "timm-whole-file":
    tensors = read_state_dict(__import__("pathlib").Path(path), False)
    kept = timm.create_model({VIT!r}, pretrained=False, depth=depth, dynamic_img_size=True)
    kept.load_state_dict(tensors)
elif mode == "huggingface":
    kept = load_model(path)
print(json.dumps({{"before": before, "peak": status()["VmHWM"]}}))
"""

MODES = ("header", "hash", "read", "timm", "timm-whole-file", "huggingface")


def bigfile(depth: int, compile_with: Callable[[Path, Path], dict] | None = None) -> dict:
    """Write the files, then measure each mode in its own child; ``compile_with(model, adapter)`` also
    measures a compile of the BERT directory with a LoRA (``rss.py --bigfile --compile``)."""
    rows, compiled = [], None
    with tempfile.TemporaryDirectory(prefix="peftc-rss-big-") as tmp:
        subprocess.run([sys.executable, "-c", WRITE, tmp, str(depth)], check=True, capture_output=True)
        for mode in MODES:
            path = Path(tmp) / ("bert" if mode == "huggingface" else "vit.safetensors")
            file = path / "model.safetensors" if path.is_dir() else path
            run = subprocess.run(
                [sys.executable, "-c", MEASURE, mode, str(path), str(depth)], capture_output=True, text=True
            )
            if run.returncode != 0:
                raise SystemExit(f"{mode} failed:\n{run.stderr[-2000:]}")
            result = json.loads(run.stdout.splitlines()[-1])
            size = file.stat().st_size
            rows.append(
                {"mode": mode, "file_bytes": size, **result, "held": (result["peak"] - result["before"]) / size}
            )
        if compile_with is not None:
            compiled = compile_with(Path(tmp) / "bert", Path(tmp) / "lora")
    return {"depth": depth, "rows": rows, "compile": compiled}


def report(result: dict, report_compile: Callable[[dict], None] = print) -> None:
    """The table of :func:`bigfile`'s result."""
    mb = 1 << 20
    print(f"{'mode':16} {'file MiB':>9} {'imports MiB':>12} {'peak MiB':>9} {'held x file':>12}")
    for row in result["rows"]:
        print(
            f"{row['mode']:16} {row['file_bytes'] / mb:9.0f} {row['before'] / mb:12.0f} {row['peak'] / mb:9.0f} "
            f"{row['held']:12.2f}"
        )
    if result.get("compile"):
        print()
        report_compile(result["compile"])
