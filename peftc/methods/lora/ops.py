"""LoRA site ops and their reference math (``shared/methods.md`` §2.1).

For a linear module ``y = x Wᵀ + b`` LoRA adds a rank-r update::

    y = x Wᵀ + b + s · (x Aᵀ Bᵀ + b_B)        A ∈ R^{r×d_in}, B ∈ R^{d_out×r}
    s = α / r   (α / √r with rsLoRA; r and α per module from rank_pattern / alpha_pattern)

``b_B`` is ``lora_B.bias`` (``lora_bias=True``), usually absent. GPT-2's ``Conv1D`` stores the base
weight transposed (``[d_in, d_out]``, ``fan_in_fan_out``) while A and B keep the ``nn.Linear`` layout.

Merging is exact up to rounding: ``W' = W + s·B·A`` (transposed for ``fan_in_fan_out``) and
``b' = b + s·b_B``, computed in fp32 and cast back to the base dtype (PEFT upcasts the same way,
because fp16/bf16 products of two small factors lose most of their mantissa).

The eager body below computes the update on the activation side (``(x Aᵀ) Bᵀ``), while merging goes
through :func:`delta_weight`: two independent routes to the same numbers, which is what lets
verification catch a wrong merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.ops import SiteOp, call_op, composite_op

LORA_WEIGHT = SiteOp(name="lora_weight", form="weight", tensor_roles=("lora_A", "lora_B"), scalars=("scale", "layout"))
LORA_BIAS = SiteOp(name="lora_bias", form="weight", tensor_roles=("lora_B_bias",), scalars=("scale",))
LORA_EXPERTS = SiteOp(
    name="lora_experts_weight", form="weight", tensor_roles=("lora_A", "lora_B"), scalars=("scale", "transposed")
)


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """``α/r``, or ``α/√r`` for rsLoRA."""
    return float(alpha) / (r**0.5 if use_rslora else r)


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, layout: str) -> torch.Tensor:
    """``s·B·A`` in fp32, in the layout of the parameter it adds to (see ``peftc.ops.LAYOUTS``).

    For convolutions ``A`` is a ``k×k`` conv ``d_in → r`` and ``B`` a ``1×1`` conv ``r → d_out``, so the
    kernel update is ``B[:, :, 0, 0] @ A`` over the flattened ``(d_in, k…)`` axes. For embeddings
    ``A`` is ``[r, num]`` and ``B`` ``[dim, r]``, and the update ``(B·A)ᵀ`` is ``[num, dim]``.
    """
    delta = (lora_b.flatten(1).to(torch.float32) @ lora_a.flatten(1).to(torch.float32)) * scale
    if layout in ("linear_t", "embedding"):
        return delta.T
    if layout == "conv":
        return delta.reshape(lora_b.shape[0], *lora_a.shape[1:])
    return delta


@composite_op("lora_weight(Tensor weight, Tensor lora_a, Tensor lora_b, float scale, str layout) -> Tensor")
def lora_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, layout: str
) -> torch.Tensor:
    """``W + s·B·A`` (fp32, cast back to ``W``'s dtype): LoRA as a weight transform."""
    return (weight.to(torch.float32) + delta_weight(lora_a, lora_b, scale, layout)).to(weight.dtype)


@composite_op("lora_bias(Tensor bias, Tensor lora_b_bias, float scale) -> Tensor")
def lora_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``b + s·b_B`` (``lora_bias=True``)."""
    return (bias.to(torch.float32) + lora_b_bias.to(torch.float32) * scale).to(bias.dtype)


@composite_op(
    "lora_experts_weight(Tensor weight, Tensor lora_a, Tensor lora_b, float scale, bool transposed) -> Tensor"
)
def lora_experts_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, transposed: bool
) -> torch.Tensor:
    """LoRA on a raw ``[E, d_out, d_in]`` parameter (``target_parameters``, e.g. MoE experts).

    PEFT interleaves the experts differently in the two factors: expert ``e`` owns rows
    ``e·r … e·r + r - 1`` of ``A`` (``[E·r, d_in]``) but columns ``e, e + E, …`` of ``B``
    (``[d_out, E·r]``). ``transposed`` parameters are stored ``[E, d_in, d_out]``.
    """
    experts = weight.shape[0]
    rank = lora_a.shape[0] // experts
    a = lora_a.to(torch.float32).reshape(experts, rank, -1)  # [E, r, d_in]
    b = lora_b.to(torch.float32).reshape(lora_b.shape[0], rank, experts).permute(2, 0, 1)  # [E, d_out, r]
    delta = torch.bmm(b, a) * scale  # [E, d_out, d_in]
    if transposed:
        delta = delta.transpose(1, 2)
    return (weight.to(torch.float32) + delta).to(weight.dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_b_bias: torch.Tensor | None,
    scale: float,
    fan_in_fan_out: bool,
) -> torch.Tensor:
    """A linear (or ``Conv1D``) module with an unmerged LoRA update; see the module docstring."""
    y = F.linear(x, weight.T if fan_in_fan_out else weight, bias)
    h = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b, lora_b_bias)
    return (y + h * scale).to(y.dtype)  # added in the wider dtype (the adapter's), as PEFT does


def _base_call(x, weight, bias, lora_a, lora_b, lora_b_bias, scale, fan_in_fan_out):
    return F.linear(x, weight.T if fan_in_fan_out else weight, bias)


def weight_form(lora_a, lora_b, lora_b_bias, scale, fan_in_fan_out):
    """One ``lora_linear`` call as weight sites: ``W' = W + s·B·A`` (transposed for a Conv1D) and,
    with ``lora_B.bias``, ``b' = b + s·b_B``. The merge pass, stacking and the TensorRT refit all use it."""
    forms = {"weight": (LORA_WEIGHT, (lora_a, lora_b, scale, "linear_t" if fan_in_fan_out else "linear"))}
    if lora_b_bias is not None:
        forms["bias"] = (LORA_BIAS, (lora_b_bias, scale))
    return forms


LORA_LINEAR = call_op(
    "lora_linear",
    lora_linear,
    _base_call,
    base_params=("weight", "bias"),
    tensor_roles=("lora_A", "lora_B", "lora_B_bias"),
    scalars=("scale", "fan_in_fan_out"),
    onnx="peftc.methods.lora.onnx:lora_linear",
    weight_form=weight_form,
)
