"""LoRA on a quantized layer (QLoRA) as a call site: the packed base GEMM plus the unmerged LoRA branch.

``peftc compile`` reads a LoRA adapter on a ``peftc::bnb4_linear`` / ``int8_linear`` / ``nbits_linear``
layer (``peftc/quant/ops.py``) as one of these call sites; the reference program computes the unmerged
QLoRA model with them, and the ``merge-quantized`` pass (``peftc/quant/merge.py``) then folds each one
by the merge policy (float, requant) or keeps it (two-path). Arguments follow ``peftc/ops.py``: ``x``,
the quantized module's tensors (``base_params``), ``lora_A``, ``lora_B``, then ``scale`` and the base
op's own scalars. Each body is the base op's body plus ``s · (x Aᵀ) Bᵀ`` added in fp32, as
:class:`~peftc.quant.modules.TwoPathLinear` computes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from peftc.errors import InputError, UnsupportedError
from peftc.ops import call_op
from peftc.quant import ops as quant_ops

QUANTIZED_CLASSES = {
    "Bnb4Linear": "bnb4_linear",
    "Bnb4NestedLinear": "bnb4dq_linear",
    "Int8Linear": "int8_linear",
    "NBitsLinear": "nbits_linear",
}
"""Class name of the packed module (``peftc/quant/modules.py``) → the base op its call traces to."""


def _plus_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    h = F.linear(F.linear(x.to(torch.float32), a.to(torch.float32)), b.to(torch.float32))
    return (y + h * scale).to(y.dtype)


def lora_bnb4(
    x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, bias: torch.Tensor | None,
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, blocksize: int, quant_type: int, out_features: int,
    in_features: int,
) -> torch.Tensor:  # fmt: skip
    """``bnb4_linear(x, …) + s·(x Aᵀ) Bᵀ``."""
    y = quant_ops.bnb4_linear(x, packed, absmax, code, bias, blocksize, quant_type, out_features, in_features)
    return _plus_lora(y, x, lora_a, lora_b, scale)


def lora_bnb4dq(
    x: torch.Tensor, packed: torch.Tensor, absmax_codes: torch.Tensor, nested_absmax: torch.Tensor,
    nested_code: torch.Tensor, code: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scale: float, blocksize: int, quant_type: int, nested_blocksize: int, nested_offset: float,
    out_features: int, in_features: int,
) -> torch.Tensor:  # fmt: skip
    """``bnb4dq_linear(x, …) + s·(x Aᵀ) Bᵀ``."""
    y = quant_ops.bnb4dq_linear(
        x, packed, absmax_codes, nested_absmax, nested_code, code, bias, blocksize, quant_type, nested_blocksize,
        nested_offset, out_features, in_features,
    )  # fmt: skip
    return _plus_lora(y, x, lora_a, lora_b, scale)


def lora_int8(
    x: torch.Tensor, weight_int8: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
    lora_b: torch.Tensor, scale: float,
) -> torch.Tensor:  # fmt: skip
    """``int8_linear(x, …) + s·(x Aᵀ) Bᵀ``."""
    return _plus_lora(quant_ops.int8_linear(x, weight_int8, scb, bias), x, lora_a, lora_b, scale)


def lora_nbits(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
    bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, fmt: int, bits: int,
    version: int, group_size: int, out_features: int, in_features: int,
) -> torch.Tensor:  # fmt: skip
    """``nbits_linear(x, …) + s·(x Aᵀ) Bᵀ``."""
    y = quant_ops.nbits_linear(
        x, qweight, qzeros, scales, g_idx, bias, fmt, bits, version, group_size, out_features, in_features
    )
    return _plus_lora(y, x, lora_a, lora_b, scale)


LORA_BNB4 = call_op(
    "lora_bnb4",
    lora_bnb4,
    lambda x, packed, absmax, code, bias, a, b, scale, *rest: x.new_empty((*x.shape[:-1], b.shape[0])),
    tensor_roles=("lora_A", "lora_B"),
    scalars=("scale", "blocksize", "quant_type", "out_features", "in_features"),
    base_params=("packed", "absmax", "code", "bias"),
    onnx="peftc.quant.onnx:lora_bnb4",
)
LORA_BNB4DQ = call_op(
    "lora_bnb4dq",
    lora_bnb4dq,
    lambda x, packed, codes, nested, nested_code, code, bias, a, b, *rest: x.new_empty((*x.shape[:-1], b.shape[0])),
    tensor_roles=("lora_A", "lora_B"),
    scalars=("scale", "blocksize", "quant_type", "nested_blocksize", "nested_offset", "out_features", "in_features"),
    base_params=("packed", "absmax_codes", "nested_absmax", "nested_code", "code", "bias"),
    onnx="peftc.quant.onnx:lora_bnb4dq",
)
LORA_INT8 = call_op(
    "lora_int8",
    lora_int8,
    lambda x, weight, scb, bias, a, b, scale: x.new_empty((*x.shape[:-1], b.shape[0])),
    tensor_roles=("lora_A", "lora_B"),
    scalars=("scale",),
    base_params=("weight_int8", "scb", "bias"),
    onnx="peftc.quant.onnx:lora_int8",
)
LORA_NBITS = call_op(
    "lora_nbits",
    lora_nbits,
    lambda x, qw, qz, scales, g_idx, bias, a, b, scale, *rest: x.new_empty((*x.shape[:-1], b.shape[0])),
    tensor_roles=("lora_A", "lora_B"),
    scalars=("scale", "fmt", "bits", "version", "group_size", "out_features", "in_features"),
    base_params=("qweight", "qzeros", "scales", "g_idx", "bias"),
    onnx="peftc.quant.onnx:lora_nbits",
)
OPS = (LORA_BNB4, LORA_BNB4DQ, LORA_INT8, LORA_NBITS)
BASE_OF = {
    LORA_BNB4.name: quant_ops.BNB4_LINEAR,
    LORA_BNB4DQ.name: quant_ops.BNB4DQ_LINEAR,
    LORA_INT8.name: quant_ops.INT8_LINEAR,
    LORA_NBITS.name: quant_ops.NBITS_LINEAR,
}
"""Each LoRA site op → the quantized op it wraps (the same base tensors and scalars, in order)."""
_BY_BASE = {base.name: lora for lora, base in ((o, BASE_OF[o.name]) for o in OPS)}


def lora_site(source: Any, module: Any, tensors: Mapping[str, Any], rank: int, alpha: float, scale: float):
    """The call site of a LoRA adapter on the quantized ``module`` (a ``ModuleInfo``).

    Raises:
        UnsupportedError: DoRA, ``lora_bias`` or any role besides ``lora_A``/``lora_B`` on it.
        InputError: LoRA factors whose shapes do not fit the layer, naming the key.
    """
    from peftc.methods.base import Site
    from peftc.methods.common import expect_shape

    for option in ("use_dora", "lora_bias"):
        if source.config.get(option):
            raise UnsupportedError(
                f"{source.config_path.name}: {option} = true on the quantized layer {module.path!r}; peftc compiles "
                "plain LoRA on quantized bases (QLoRA)"
            )
    extra = sorted(set(tensors) - {"lora_A", "lora_B"})
    if extra:
        raise UnsupportedError(f"{source.describe(tensors[extra[0]].key)}: {extra[0]} on a quantized layer")
    base_name = QUANTIZED_CLASSES[module.class_name]
    op = _BY_BASE[base_name]
    base = quant_ops.OPS[[o.name for o in quant_ops.OPS].index(base_name)]
    node = next((n for call in module.calls for n in call.nodes if n.target == base.overload), None)
    if node is None:
        raise UnsupportedError(f"{module.path!r}: a {module.class_name} whose call has no peftc::{base_name} node")
    start = 1 + len(base.tensor_roles) + 1  # x, the packed tensors, the bias
    scalars = dict(zip(base.scalars, node.args[start:], strict=True))
    out_features, in_features = _features(node, base_name, scalars)
    a, b = tensors["lora_A"], tensors["lora_B"]
    expect_shape(source, a, (rank, in_features), f"[r={rank}, in_features={in_features}]")
    expect_shape(source, b, (out_features, rank), f"[out_features={out_features}, r={rank}]")
    info = {"module_type": module.class_name, "r": rank, "alpha": alpha}
    return Site(module.path, op.name, {"lora_A": a, "lora_B": b}, {"scale": scale, **scalars}, info)


def _features(node: Any, base_name: str, scalars: Mapping[str, Any]) -> tuple[int, int]:
    if base_name == "int8_linear":
        weight = node.args[1].meta["val"]
        return int(weight.shape[0]), int(weight.shape[1])
    if "out_features" not in scalars:
        raise InputError(f"{node.name}: no out_features")  # pragma: no cover
    return int(scalars["out_features"]), int(scalars["in_features"])
