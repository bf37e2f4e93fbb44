"""Dtypes and precisions, in one place: what an adapter computes in, what an artifact computes in, and how
far a reduced-precision artifact may be from the fp32 answer.

**Adapter tensors** compute as PEFT loads them (``peft/tuners/tuners_utils.py``: an adapter layer is
moved to its base layer's dtype, then ``cast_adapter_dtype`` widens fp16/bf16 to fp32): a float tensor
takes its base parameter's float dtype, and fp16/bf16 become fp32. The file's own dtype never
matters: an fp16 LoRA on an fp32 base computes in fp32, a bf16 LoRA on a bf16 base computes in fp32,
on an fp64 base in fp64 (:func:`adapter_dtype`). A call site therefore runs its adapter branch in that
dtype and adds it to the base output in the wider of the two, then casts back to the base output's
dtype, as PEFT's ``result = result + lora_B(lora_A(x)) * scaling; result.to(torch_result_dtype)``.
Weight transforms (merges) compute in fp32 whatever the dtypes and cast once to the parameter's
dtype. An integer adapter tensor is refused, naming its key.

==============  ==================  =====================================================
base dtype      adapter file dtype  adapter computes in / merge computes in
==============  ==================  =====================================================
fp32            fp32, fp16, bf16    fp32 / fp32, cast to fp32
fp16 or bf16    fp32, fp16, bf16    fp32 (LoRA branch added in fp32, cast back) / fp32, cast to base
fp64            any float           fp64 / fp32 (weight ops), cast to fp64
==============  ==================  =====================================================
"""

from __future__ import annotations

from typing import Any

import torch

HALF = (torch.float16, torch.bfloat16)


def adapter_dtype(base: torch.dtype | None, stored: torch.dtype) -> torch.dtype:
    """The dtype a float adapter tensor stored as ``stored`` computes in beside a ``base`` parameter
    (None: the site has no parameter, e.g. an activation site on a parameterless module)."""
    dtype = base if base is not None and base.is_floating_point else stored
    return torch.float32 if dtype in HALF else dtype


FLOATS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The precisions an artifact computes in (``--precision``), by name."""
QUANTIZED: dict[str, tuple[int, int]] = {"int8": (8, 2), "int8-static": (8, 2), "int8-weight": (8, 2), "int4": (4, 2)}
"""The integer precisions (``peftc/backends/onnx/quantize.py`` and ``aoti/quantize.py`` say what each
quantizes on each target), each with its bits and how many of a weighted op's operands it rounds to
them (its weight and its input activation; the weight-only formats' kernels round activations to int8
blocks too)."""
PRECISIONS = (*FLOATS, *QUANTIZED)
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
MATMULS = ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "conv1d", "conv2d", "conv3d", "convolution")
MATMULS += ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu")
WEIGHTED = ("linear", "addmm", "conv1d", "conv2d", "conv3d", "convolution", "embedding")
"""The ops whose weights a quantizer rounds: the depth that counts for an integer precision."""


def name_of(dtype: torch.dtype) -> str:
    """``fp32``… for a float dtype."""
    return {v: k for k, v in FLOATS.items()}.get(dtype, str(dtype).removeprefix("torch."))


def budget(precision: str, depth: int) -> float:
    """The default error budget of an artifact computing in ``precision``, relative to max|y| of each
    output, against the fp32 oracles.

    Each matmul-like op (linear, matmul, convolution, attention) rounds three things to the precision:
    its input activation, its weight and its output, each a relative error of up to one unit roundoff
    ``u`` (the accumulators are fp32 on every target peftc lowers to). These errors are independent
    and add like a random walk, and normalisations and softmax rescale rather than amplify them, so
    after ``depth`` such ops on the longest path the error is about ``u·√(3·depth)``: the budget.
    Measured on tiny BERT, tiny LLaMA and MiniLM: eager PyTorch in fp16 and bf16 reaches 0.26–0.43×
    this bound of the fp32 outputs, onnxruntime's fp16 kernels up to 0.67×. fp32 artifacts keep the
    per-dtype bound of ``verification/compare.py``.

    An integer precision rounds each quantized operand to a grid of ``2^(bits-1) - 1`` steps either
    side of zero, scaled to the largest magnitude of its group (a weight row or block, an activation
    tensor): an error of up to half a step, ``u = 1 / (2·(2^(bits-1) - 1))`` of that magnitude
    (1/254 for int8, 1/14 for int4). Two operands per weighted op (:data:`WEIGHTED`) are rounded
    so, over ``depth`` such ops: ``u·√(2·depth)``. Activation outliers break the assumption that a
    tensor's values use its whole range (transformers' activations do not): the layer search keeps the
    layers that break it in fp32 (``peftc/driver/quantize.py``).
    """
    if precision in QUANTIZED:
        bits, operands = QUANTIZED[precision]
        return (operands * max(depth, 1)) ** 0.5 / (2 * (2 ** (bits - 1) - 1))
    return UNIT_ROUNDOFF[FLOATS[precision]] * (3 * max(depth, 1)) ** 0.5


def matmul_depth(program: Any, ops: tuple[str, ...] = MATMULS) -> int:
    """The most matmul-like ops (``ops``) on one path from an input to an output of ``program``."""
    depth: dict[Any, int] = {}
    for node in program.graph.nodes:
        before = max((depth[a] for a in node.all_input_nodes), default=0)
        target = getattr(node.target, "_opname", "") if node.op == "call_function" else ""
        depth[node] = before + (target in ops)
    return max(depth.values(), default=0)
