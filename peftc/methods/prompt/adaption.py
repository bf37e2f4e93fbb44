"""Adaption prompt (PEFT ``ADAPTION_PROMPT``, LLaMA-Adapter): a gated prompt attended to by the top layers.

PEFT (``peft/tuners/adaption_prompt/layer.py``) wraps the attention module of each of the last
``adapter_layers`` layers. With the layer's input ``x``, its own output ``o``, the prompt ``P``
(``[1, adapter_len, hidden]``) and the gate ``g`` (``[1]``, used as it is)::

    q   = the layer's queries of x (LLaMA: q_proj, rotary embedding; GPT-2: c_attn's first third)
    K,V = the layer's key/value projections of P (no rotary), per head (LLaMA: repeated per query group)
    o'  = o + W_o · (g · softmax(q Kᵀ / √d) V)          no mask: every token sees the whole prompt

where ``W_o`` is LLaMA's ``o_proj`` (GPT-2's adapter output skips ``c_proj``, as in PEFT). LLaMA's group
count is PEFT's ``k_proj.in_features // k_proj.out_features``. The model's inputs and outputs do not
change. peftc inserts it like the prompts: the base is traced with those attention modules wrapped
(a copy of the module tree along their paths; the base itself is not changed).

**Adapter files.** ``base_model.model.<attention>.adaption_prompt`` and ``.adaption_gate`` for each
adapted layer, which must be the last ``adapter_layers`` modules named ``target_modules``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.loaders.inputs import InputSignature
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions
from peftc.methods.prompt.parse import cfg_int
from peftc.methods.record import Inserted, Method

KINDS = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}
"""Model types PEFT adapts, and the attention modules it wraps."""
ROLES = ("adaption_prompt", "adaption_gate")
PREFIX = "base_model.model."


class Adapted(torch.nn.Module):
    """An attention module plus the gated prompt (see the module docstring)."""

    def __init__(self, attention: torch.nn.Module, kind: str, prompt: torch.Tensor, gate: torch.Tensor) -> None:
        super().__init__()
        self.model = attention
        self.kind = kind
        dtype = _weight(attention).dtype
        self.adaption_prompt = torch.nn.Parameter(prompt.detach().clone().to(dtype), requires_grad=False)
        self.adaption_gate = torch.nn.Parameter(gate.detach().clone().to(dtype), requires_grad=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output, *rest = self.model(*args, **kwargs)
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        query, key, value = self._llama(x, kwargs) if self.kind != "gpt2" else self._gpt2(x)
        batch, length = x.shape[0], x.shape[1]
        dtype = query.dtype
        scores = torch.matmul(query, key.transpose(2, 3).to(dtype)) / math.sqrt(query.shape[-1])
        scores = self.adaption_gate * torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        added = torch.matmul(scores, value).transpose(1, 2).reshape(batch, length, -1)
        if self.kind != "gpt2":
            added = self.model.o_proj(added)
        return ((output + added).to(dtype), *rest)

    def _llama(self, x: torch.Tensor, kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        attn = self.model
        heads, size = attn.config.num_attention_heads, attn.head_dim
        groups = attn.k_proj.in_features // attn.k_proj.out_features
        batch, length = x.shape[0], x.shape[1]
        query = attn.q_proj(x).view(batch, length, heads, size).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in kwargs["position_embeddings"])
        half = query.shape[-1] // 2
        query = query * cos + torch.cat((-query[..., half:], query[..., :half]), dim=-1) * sin
        count = self.adaption_prompt.shape[1]

        def project(layer: torch.nn.Module) -> torch.Tensor:
            rows = layer(self.adaption_prompt).view(1, count, heads // groups, size).expand(batch, -1, -1, -1)
            return torch.repeat_interleave(rows.transpose(1, 2), repeats=groups, dim=1)

        return query, project(attn.k_proj), project(attn.v_proj)

    def _gpt2(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn = self.model
        width, size = x.shape[-1], attn.head_dim
        query = attn.c_attn(x).split(attn.split_size, dim=2)[0]
        query = query.view(*query.shape[:-1], -1, size).transpose(1, 2)
        _, key, value = attn.c_attn(self.adaption_prompt).split(width, dim=2)
        count, batch = self.adaption_prompt.shape[1], x.shape[0]
        heads = attn.num_heads

        def per_head(rows: torch.Tensor) -> torch.Tensor:
            return rows.view(1, count, heads, size).expand(batch, -1, -1, -1).transpose(1, 2)

        return query, per_head(key), per_head(value)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    return next(p for p in module.parameters() if p.is_floating_point())


def read(source: AdapterSource) -> dict[str, dict[str, AdapterTensor]]:
    """Attention path → ``{adaption_prompt, adaption_gate}``, checked against the config.

    Raises:
        InputError: a key that is neither, a path without both, or a misshapen tensor.
    """
    cfg = source.config
    length = cfg_int(source, "adapter_len", None)
    cfg_int(source, "adapter_layers", None)
    found: dict[str, dict[str, AdapterTensor]] = {}
    for key, tensor in source.tensors.items():
        path, _, role = key.removeprefix(PREFIX).rpartition(".")
        if not key.startswith(PREFIX) or role not in ROLES:
            raise InputError(f"{source.describe(key)}: not an ADAPTION_PROMPT tensor ({', '.join(ROLES)})")
        found.setdefault(path, {})[role] = AdapterTensor(key, tensor)
    for path, roles in sorted(found.items()):
        common.require_roles(source, path, roles, ROLES)
        prompt, gate = roles["adaption_prompt"], roles["adaption_gate"]
        common.expect_shape(source, gate, (1,), "[1]")
        if prompt.tensor.dim() != 3 or tuple(prompt.tensor.shape[:2]) != (1, length):
            raise InputError(
                f"{source.describe(prompt.key)}: shape {list(prompt.tensor.shape)}; expected [1, adapter_len={length}, "
                "hidden]"
            )
    if len(found) != cfg.get("adapter_layers"):
        raise InputError(f"{source.weights_path}: {len(found)} adapted layers; the config says {cfg['adapter_layers']}")
    return found


def insert(source: AdapterSource, module: torch.nn.Module, base: InputSignature) -> Inserted:
    """The base with its adapted attention modules wrapped, and its inputs (unchanged).

    Raises:
        UnsupportedError: a model type PEFT does not adapt, or adapted modules other than the last
            ``adapter_layers`` attention modules PEFT would pick.
    """
    found = read(source)
    where = source.config_path
    kind = getattr(getattr(module, "config", None), "model_type", None)
    if kind not in KINDS:
        raise UnsupportedError(f"{where}: ADAPTION_PROMPT on model type {kind!r}; PEFT adapts {sorted(KINDS)}")
    target = source.config.get("target_modules") or KINDS[kind]
    named = [name for name, _ in module.named_modules() if name.endswith(f".{target}")]
    expected = named[-source.config["adapter_layers"] :]
    if sorted(found) != sorted(expected):
        raise UnsupportedError(
            f"{where}: adapted layers {sorted(found)}; PEFT adapts the last {len(expected)} '{target}' modules {expected}"
        )

    def wrap(traced: torch.nn.Module) -> torch.nn.Module:
        root = copy.copy(traced)
        root._modules = dict(traced._modules)
        for path, roles in found.items():
            parent_path, _, name = path.rpartition(".")
            parent = _copied(root, parent_path)
            attention = parent._modules[name]
            prompt, gate = roles["adaption_prompt"].tensor, roles["adaption_gate"].tensor
            parent._modules[name] = Adapted(attention, kind, prompt, gate)
        return root

    return Inserted(wrap, base)


def _copied(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module at ``path`` under ``root``, each module on the way a shallow copy with its own child
    table (so the original tree is not changed)."""
    module = root
    for name in path.split(".") if path else []:
        child = copy.copy(module._modules[name])
        child._modules = dict(child._modules)
        module._modules[name] = child
        module = child
    return module


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """The adapter, found in the program its wrapper was traced in: no sites.

    Raises:
        UnsupportedError: the program was not traced with the wrapper (adding it to an artifact).
    """
    honoured, ignored = common.classify_fields(source, "ADAPTION_PROMPT", FIELDS)
    for path in read(source):
        if f"{path}.adaption_prompt" not in modules.tensors:
            raise UnsupportedError(
                f"{source.config_path}: an ADAPTION_PROMPT adapter is inserted when peftc traces the model (compile "
                "with it alone); it cannot be added to a program traced without it"
            )
    honoured["inserted"] = "gated prompts in the top attention layers (adaption_prompt)"
    return Adapter(source.name, "adaption_prompt", source, (), (), (), honoured, ignored)


FIELDS = common.Fields(honoured=("adapter_len", "adapter_layers", "target_modules"), ignored={})
METHOD = Method("adaption_prompt", ("ADAPTION_PROMPT",), parse, fields=FIELDS, insert=insert)
