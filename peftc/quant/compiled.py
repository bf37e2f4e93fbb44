"""What a compile of a LoRA on a quantized base (QLoRA) adds to the build modes and verification.

* the manifest's ``target.quantized_sites``: one row per adapted site (module, format, policy, error
  added, bytes, why), from the ``merge-quantized`` pass; ``peftc inspect`` prints it (:func:`table`);
* the budgets of verification: the artifact against the unmerged reference program within
  :data:`RMS_TO_MAX` times the sum of the errors the sites added (each site's error is the relative RMS
  change of its output for isotropic inputs; through layers of gain about one, relative errors of
  successive sites add to first order; verification compares the largest deviation with the largest
  output, which for Gaussian-like errors stays within about three RMS), and against PEFT's own QLoRA
  model (bitsandbytes' CPU kernels) within that plus those kernels' rounding: the 4-bit GEMM runs in
  bf16 and the int8 one quantizes each activation row to int8, so ``peftc.precision.budget`` of bf16
  (resp. int8) at the model's matmul depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

RMS_TO_MAX = 3.0
"""From the sites' RMS errors to a bound on max|Δy| / max|y| (measured on the tiny test models: 0.5× the sum
for NF4 requantization, 1.6× for int8 embedding and head tables)."""
FP32 = 1e-5
"""fp32 against fp32, the same products summed in another order (as ``compare.py``'s float32 bound)."""


SITE_OPS = ("lora_bnb4", "lora_int8", "lora_nbits")
"""The QLoRA site ops (``peftc/quant/sites.py``), by name: this module imports no torch (``peftc inspect``)."""


PACKED_OPS = ("bnb4_linear", "nbits_linear")
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
    added = RMS_TO_MAX * sum(float(r["error"]) for r in rows)
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


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-site table ``peftc inspect`` prints."""
    lines = [f"{'site':<40} {'format':<6} {'policy':<13} {'error added':>11} {'bytes':>10}  why"]
    for r in rows:
        lines.append(
            f"{r['module']:<40} {r.get('format', '?'):<6} {r['policy']:<13} {r['error']:>11.3g} {r['bytes']:>10}  "
            f"{r['reason']}"
        )
    return "\n".join(lines)
