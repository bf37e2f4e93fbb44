"""The modules the density rewrites put into an eager model (each exportable except :class:`GatherLinear`,
whose active set depends on the data)."""

from __future__ import annotations

import torch


def sliced_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` ([out, in], either may be 0) and ``bias``."""
    layer = torch.nn.Linear(1, 1, bias=bias is not None)
    layer.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    layer.out_features, layer.in_features = weight.shape
    return layer


def folded_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, removed: torch.Tensor, means: torch.Tensor
) -> torch.Tensor | None:
    """The down projection's bias once the neurons ``removed`` (indices) are gone: their mean
    contribution ``W[:, removed] · mean(h)[removed]`` folded into ``bias`` (``weight`` [out, in],
    ``means`` per input neuron); None, the contribution dropped, without a bias."""
    if bias is None:
        return None
    shift = weight.detach().double()[:, removed] @ means.double()[removed]
    return (bias.detach().double() + shift).to(bias.dtype)


class NoNeurons(torch.nn.Module):
    """An up/gate projection of a skipped block: no output feature, ``[..., 0]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class BiasOnly(torch.nn.Module):
    """The down projection of a skipped block: its bias (zeros without one) for every row."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.new_zeros(*h.shape[:-1], self.bias.shape[0]) + self.bias


class GatherLinear(torch.nn.Module):
    """A down projection that multiplies only the input columns non-zero in some row of the call
    (gather-GEMM): ``y = h[:, A] · Wᵀ[A, :] + b`` with ``A`` the active set, the same sum as the dense
    ``h · Wᵀ + b`` without its zero terms."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        active = flat.ne(0).any(0).nonzero().flatten()
        rows = flat.index_select(1, active)
        weight = self.weight_t.index_select(0, active)
        out = rows @ weight if self.bias is None else torch.addmm(self.bias, rows, weight)
        return out.reshape(*h.shape[:-1], out.shape[-1])
