"""The module peftc traces for an X-LoRA adapter: PEFT's two passes and its classifier in one forward.

``peftc/methods/xlora.py`` reads the adapter and builds :class:`TwoPass` around the base model. The
math (PEFT's ``peft/tuners/xlora/{model,classifier,layer}.py``) is in that module's docstring; here
each piece is one method: :meth:`Gates.forward` (classifier, layer-wise broadcast, temperature softmax),
:func:`pick` (top-k mask, softmax over the kept experts) and :meth:`Experts.delta` (the gated sum of
one module's experts as two matrix products).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Routing:
    """The config fields of the gates (PEFT's ``XLoraConfig``)."""

    n_experts: int
    n_layers: int
    layerwise: bool
    softmax: bool
    temperature: float
    top_k: int | None
    softmax_topk: bool
    scaling_pass_value: float
    global_weight: float


def pick(gates: torch.Tensor, routing: Routing) -> torch.Tensor:
    """PEFT's ``get_maybe_topk_scalings`` on one layer's gates ``[b, s, E]``: keep the ``top_k`` largest
    (others 0), then, with ``enable_softmax_topk``, a softmax over the non-zero entries (zeros stay 0)."""
    if routing.top_k is not None:
        kept = torch.topk(gates, k=routing.top_k, dim=-1).indices
        mask = torch.zeros_like(gates).scatter(-1, kept, 1.0)
        gates = gates * mask
    if routing.softmax_topk:
        nonzero = gates != 0
        probs = torch.softmax(gates.masked_fill(~nonzero, float("-inf")), dim=-1)
        gates = probs.masked_fill(~nonzero, 0.0)
    return gates


class Gates(torch.nn.Module):
    """The classifier: ``Linear (ReLU Linear)*`` on the scaling pass's last hidden state, then PEFT's
    reshape to ``[b, s, n_layers, n_experts]`` and temperature softmax over the experts."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], routing: Routing) -> None:
        super().__init__()
        self.routing = routing
        self.linears = torch.nn.ModuleList()
        for weight, bias in layers:
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
            linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
            linear.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
            self.linears.append(linear)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalings ``[b, s, n_layers, n_experts]`` for the hidden state ``[b, s, hidden_size]``."""
        r = self.routing
        logits = hidden.to(self.linears[0].weight.dtype)
        for index, linear in enumerate(self.linears):
            logits = linear(torch.relu(logits) if index else logits)
        if not r.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, r.n_layers, -1)
        scalings = logits.reshape(*hidden.shape[:2], r.n_layers, r.n_experts)
        return torch.softmax(scalings / r.temperature, dim=-1) if r.softmax else scalings


class Experts(torch.nn.Module):
    """One adapted ``nn.Linear``'s experts, their ranks concatenated: ``lora_A`` ``[Σr, d_in]``, ``lora_B``
    ``[d_out, Σr]``, and per rank column the expert it belongs to and that expert's ``scale``."""

    def __init__(self, factors: list[tuple[int, torch.Tensor, torch.Tensor, float]], global_weight: float) -> None:
        super().__init__()
        a = torch.cat([f[1].float() for f in factors])
        self.lora_A = torch.nn.Parameter(a, requires_grad=False)
        self.lora_B = torch.nn.Parameter(torch.cat([f[2].float() for f in factors], dim=1), requires_grad=False)
        experts = [e for e, fa, _, _ in factors for _ in range(fa.shape[0])]
        scales = [s * global_weight for _, fa, _, s in factors for _ in range(fa.shape[0])]
        self.register_buffer("expert", torch.tensor(experts, dtype=torch.int64), persistent=False)
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32), persistent=False)

    def delta(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``Σ_e scale_e·w·B_e A_e (x ⊙ g_e)`` for ``x`` ``[b, s, d_in]`` and gates ``[b, s, E]``: the gate is a
        scalar per token, so it moves past ``A_e`` onto each of expert ``e``'s rank columns."""
        h = x.to(self.lora_A.dtype) @ self.lora_A.T
        h = h * (gates.to(h.dtype).index_select(-1, self.expert) * self.scale)
        return h @ self.lora_B.T


class TwoPass(torch.nn.Module):
    """``base`` run twice: the scaling pass (every gate ``scaling_pass_value``; the experts skipped when it
    is 0, where they add exactly 0), whose last hidden state feeds :class:`Gates`, then the main pass
    with each adapted module's output plus its experts' gated update."""

    def __init__(self, base: torch.nn.Module, paths: list[str], experts: list[Experts], gates: Gates) -> None:
        super().__init__()
        self.base_model = base
        self.paths = paths
        self.xlora_experts = torch.nn.ModuleList(experts)
        self.xlora_gates = gates

    def _run(self, scalings: torch.Tensor | None, inputs: dict[str, torch.Tensor], **extra: Any) -> Any:
        routing = self.xlora_gates.routing

        def hook(layer: int, experts: Experts) -> Any:
            def add(_module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
                gates = pick(scalings[:, :, layer, :], routing)
                return (output + experts.delta(args[0], gates)).to(output.dtype)

            return add

        handles = []
        if scalings is not None:
            handles = [
                self.base_model.get_submodule(path).register_forward_hook(hook(layer, experts))
                for layer, (path, experts) in enumerate(zip(self.paths, self.xlora_experts, strict=True))
            ]
        try:
            return self.base_model(**inputs, **extra)
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        inputs = {k: v for k, v in given.items() if v is not None}
        routing = self.xlora_gates.routing
        dummy = None
        if routing.scaling_pass_value != 0:
            shape = (*input_ids.shape[:2], routing.n_layers, routing.n_experts)
            dummy = torch.full(shape, routing.scaling_pass_value, dtype=self.xlora_gates.linears[0].weight.dtype)
        scaling = self._run(dummy, inputs, output_hidden_states=True, return_dict=True)
        scalings = self.xlora_gates(scaling.hidden_states[-1])
        return self._run(scalings, inputs)
