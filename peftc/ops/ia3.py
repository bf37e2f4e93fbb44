"""(IA)³ as a weight transform (``shared/methods.md`` §4.2; PEFT ``peft_type: "IA3"``).

(IA)³ multiplies activations by a trained vector ``l``. PEFT scales the *output* of an ordinary
target (bias included) and the *input* of a ``feedforward_modules`` target; both fold exactly::

    output:  y = l ⊙ (x Wᵀ + b)   ⇔  W' = diag(l)·W,  b' = l ⊙ b
    input:   y = (l ⊙ x) Wᵀ + b   ⇔  W' = W·diag(l)

so one op scales a parameter along one axis: the output axis of a weight (0 for ``nn.Linear`` and
convolutions, 1 for a ``Conv1D`` stored ``[d_in, d_out]``), the input axis, or the only axis of a
bias. A grouped convolution's input axis holds ``d_in / groups`` channels per output channel, so the
vector is laid out per group first, as PEFT does.
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, weight_op

IA3_WEIGHT = SiteOp(name="ia3_weight", form="weight", tensor_roles=("ia3_l",), scalars=("axis", "groups"))


def broadcast(vector: torch.Tensor, weight: torch.Tensor, axis: int, groups: int) -> torch.Tensor:
    """The fp32 vector shaped to multiply ``weight`` along ``axis``."""
    vector = vector.to(torch.float32).reshape(-1)
    if groups > 1:  # input axis of a grouped convolution: [d_out, d_in/groups, *kernel]
        out, per_group = weight.shape[0], weight.shape[1]
        vector = vector.reshape(groups, 1, per_group).expand(groups, out // groups, per_group)
        return vector.reshape(out, per_group, *([1] * (weight.dim() - 2)))
    shape = [1] * weight.dim()
    shape[axis] = -1
    return vector.reshape(shape)


@weight_op("ia3_weight(Tensor weight, Tensor ia3_l, int axis, int groups) -> Tensor")
def ia3_weight(weight: torch.Tensor, ia3_l: torch.Tensor, axis: int, groups: int) -> torch.Tensor:
    """``weight`` scaled by ``ia3_l`` along ``axis`` (fp32, cast back to ``weight``'s dtype)."""
    return (weight.to(torch.float32) * broadcast(ia3_l, weight, axis, groups)).to(weight.dtype)
