"""The machine an artifact is built, verified or timed on: the CPU's model and the ISA extensions that
decide which kernels run (AVX-512, VNNI, AMX). Recorded in the manifest and printed with timings."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
"""The x86 flags that select onnxruntime's, oneDNN's and Inductor's CPU kernels."""


def cpu() -> dict[str, Any]:
    """``{"model", "cores", "isa"}``: the CPU model name, the CPUs this process may use, and which of
    :data:`ISA` it has (read from ``/proc/cpuinfo``; model and isa empty where that is missing)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    lines = text.splitlines()
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {"model": model or platform.processor(), "cores": cores, "isa": [f for f in ISA if f in flags]}
