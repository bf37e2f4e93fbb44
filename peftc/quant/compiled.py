"""What a compile of a LoRA on a quantized base (QLoRA) adds to the build modes and verification.

* the manifest's ``target.quantized_sites``: one row per adapted site (module, format, policy, error
  added, bytes, why), from the ``merge-quantized`` pass; ``peftc inspect`` prints it (:func:`table`);
* the budgets of verification: the artifact against the unmerged reference program within
  :data:`SAFETY` times the root-sum-square of the errors the sites added (:func:`root_sum_square`; each site's
  error is the relative RMS change of its output for isotropic inputs), and against PEFT's own QLoRA
  model (bitsandbytes' CPU kernels) within that plus those kernels' rounding: the 4-bit GEMM runs in
  bf16 and the int8 one quantizes each activation row to int8, so ``peftc.precision.budget`` of bf16
  (resp. int8) at the model's matmul depth.

Why root-sum-square: each site's error is its own weights' rounding (a requantization grid, fp16
factors, an int8 table), independent of every other site's; through layers of gain about one, the
relative output error is a sum of independent zero-mean terms, whose RMS is ``√Σ eᵢ²`` — not the
first-order worst case ``Σ eᵢ`` (which on the 84-site benchmark model allowed 1.85 for a measured 0.034).
:data:`SAFETY` covers what the model adds on top: propagation gain (an embedding table's error reaches
the logits of the 12-layer benchmark model 2.1× larger) and verification comparing maxima, not RMS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

SAFETY = 3.0
"""Measured max|Δy| / max|y| over ``√Σ eᵢ²`` (eager, the test inputs): 0.80 (tiny NF4 model, requant), 1.19 (tiny
int8, requant), 1.22 (tiny NF4, requant-int8), 0.61 (two-path-fp16), 2.25 (tiny NF4, int8 tables), 1.49 (tiny
int8, requant and int8 tables); on the benchmark model 1.74 (``auto``, int8 tables: 0.019 / 0.0109) and 0.51
(``auto-speed``: 84 requant-int8 sites and int8 tables, 0.034 / 0.066). The largest, 2.25, with a margin of 1.3."""
FP32 = 1e-5
"""fp32 against fp32, the same products summed in another order (as ``compare.py``'s float32 bound)."""


SITE_OPS = ("lora_bnb4", "lora_bnb4dq", "lora_int8", "lora_nbits")
"""The QLoRA site ops (``peftc/quant/sites.py``), by name: this module imports no torch (``peftc inspect``)."""


PACKED_OPS = ("bnb4_linear", "bnb4dq_linear", "nbits_linear")
"""The 4-bit layer ops (``peftc/quant/ops.py``) ``--target trt`` dequantizes, by name."""


def has_packed(program: Any) -> bool:
    """Whether ``program`` has a 4-bit layer (``--target trt`` dequantizes them even without a LoRA on one)."""
    nodes = (n for n in program.graph.nodes if n.op == "call_function")
    return any(str(n.target).removeprefix("peftc.").partition(".")[0] in PACKED_OPS for n in nodes)


def has_sites(adapters: Sequence[Any]) -> bool:
    """Whether any of ``adapters`` has a LoRA site on a quantized layer."""
    return any(site.op in SITE_OPS for adapter in adapters for site in adapter.sites)


def passes(policy: str, max_error: float | None, embeddings: str = "none", dequantize: bool = False) -> list[Any]:
    """New ``merge-quantized`` (``peftc/quant/merge.py``; ``dequantize``: float weights for every 4-bit layer,
    ``--target trt``) and, unless ``embeddings`` is ``none``, ``quantize-embeddings``
    (``peftc/quant/embeddings.py``) passes; each keeps its rows of the site table."""
    from peftc.quant.embeddings import QuantizeEmbeddingsPass
    from peftc.quant.merge import MergeQuantizedPass

    made = [MergeQuantizedPass(policy, max_error, dequantize)]
    return made + ([QuantizeEmbeddingsPass(embeddings)] if embeddings != "none" else [])


def target_fields(rows: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """The manifest ``target`` fields of the QLoRA site table (none without QLoRA sites)."""
    return {} if rows is None else {"quantized_sites": [dict(r) for r in rows]}


def tolerances(target: Mapping[str, Any], oracles: Mapping[str, Any]) -> dict[str, Any]:
    """Oracle name → :class:`~peftc.verification.compare.Tolerance` for an artifact with QLoRA sites (see the
    module docstring); empty otherwise."""
    from peftc.precision import budget
    from peftc.verification.compare import Tolerance

    rows = target.get("quantized_sites")
    if not rows:
        return {}
    added = SAFETY * root_sum_square(rows)
    depth = int((target.get("precision") or {}).get("depth") or 1)
    formats = {r.get("format") for r in rows if r.get("policy") != "quantized"}  # the base's layers PEFT runs
    kernel = max(
        budget("bf16", depth) if formats & {"nf4", "fp4"} else 0.0, budget("int8", depth) if "int8" in formats else 0.0
    )
    out = {}
    for name in oracles:
        if name.startswith("peft"):
            out[name] = Tolerance(None, kernel + added + FP32)
        elif added:
            out[name] = Tolerance(None, added + FP32)
    return out


def root_sum_square(rows: Sequence[Mapping[str, Any]]) -> float:
    """``√Σ eᵢ²`` over the site table's errors: the RMS of independent per-site errors added together."""
    return math.fsum(float(r["error"]) ** 2 for r in rows) ** 0.5


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-site table ``peftc inspect`` prints."""
    lines = [f"{'site':<40} {'format':<6} {'policy':<13} {'error added':>11} {'bytes':>10}  why"]
    for r in rows:
        lines.append(
            f"{r['module']:<40} {r.get('format', '?'):<6} {r['policy']:<13} {r['error']:>11.3g} {r['bytes']:>10}  "
            f"{r['reason']}"
        )
    return "\n".join(lines)
