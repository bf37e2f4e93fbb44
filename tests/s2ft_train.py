"""An S²FT-style trainer for test checkpoints: what the official code writes, on a tiny LLaMA with GQA.

Per layer, a seeded draw selects KV groups (whole groups: a KV head and the query heads that read it)
whose ``v_proj`` rows are trained, groups whose ``o_proj`` columns are trained, and FFN channels whose
``up_proj`` rows and ``down_proj`` columns are trained. The model is co-permuted so the selected
components are contiguous (groups ``only_v + vo + only_o + rest`` on the rows of q/k/v and columns
of o; channels ``only_u + ud + only_d + rest`` on the rows of gate/up and columns of down) — a
function-preserving change — and only those contiguous sub-blocks are trained, a few Adam steps on a
regression loss. The checkpoint is saved dense (``model.safetensors`` + ``config.json``), with the
permutation baked in and no indices, as the official ``save_hf_format`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch


@dataclasses.dataclass
class Trained:
    """A saved S²FT-style checkpoint and the ground truth a test compares extraction with."""

    base: Path
    finetuned: Path
    groups: dict[int, torch.Tensor]
    """Layer → the KV-group order baked into q/k/v rows and o columns (original group per position)."""
    channels: dict[int, torch.Tensor]
    """Layer → the FFN channel order baked into gate/up rows and down columns."""
    v_groups: dict[int, list[int]]
    o_groups: dict[int, list[int]]
    up_channels: dict[int, list[int]]
    down_channels: dict[int, list[int]]


def tiny_llama_config(kind: str = "llama"):
    """A 2-layer LLaMA (``kind="qwen2"``: Qwen2, whose q/k/v have biases), hidden 32, 4 query heads over 2 KV
    heads (GQA), FFN 64."""
    import transformers

    config = transformers.Qwen2Config if kind == "qwen2" else transformers.LlamaConfig
    return config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip


def base_model(seed: int = 0, kind: str = "llama"):
    """The seeded base (``LlamaModel`` or ``Qwen2Model``, eval, no grad)."""
    import transformers

    torch.manual_seed(seed)
    cls = transformers.Qwen2Model if kind == "qwen2" else transformers.LlamaModel
    model = cls(tiny_llama_config(kind)).eval()
    if kind == "qwen2":  # Qwen2 initialises its biases to 0: make them tell the rows apart
        for layer in model.layers:
            for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                linear.bias.data.normal_(0, 0.5)
    return model.requires_grad_(False)


def _order(first: list[int], both: list[int], second: list[int], size: int) -> torch.Tensor:
    chosen = first + both + second
    return torch.tensor(chosen + [i for i in range(size) if i not in chosen])


def _split(generator: torch.Generator, size: int, count: int) -> tuple[list[int], list[int], list[int]]:
    """Two seeded selections of ``count`` out of ``size``: (only the first, both, only the second), sorted."""
    a = set(torch.randperm(size, generator=generator)[:count].tolist())
    b = set(torch.randperm(size, generator=generator)[:count].tolist())
    return sorted(a - b), sorted(a & b), sorted(b - a)


def _expand(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Group order → the row order of a matrix with ``width`` rows per group."""
    return (groups[:, None] * width + torch.arange(width)).flatten()


def permute(model, groups: dict[int, torch.Tensor], channels: dict[int, torch.Tensor]) -> None:
    """Co-permute ``model`` in place (whole KV groups; FFN channels): function-preserving."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for index, layer in enumerate(model.layers):
        att, mlp = layer.self_attn, layer.mlp
        q_rows, kv_rows = _expand(groups[index], rep * hd), _expand(groups[index], hd)
        for linear, rows in ((att.q_proj, q_rows), (att.k_proj, kv_rows), (att.v_proj, kv_rows)):
            linear.weight.copy_(linear.weight[rows])
            if linear.bias is not None:  # Qwen2: a bias entry moves with its row
                linear.bias.copy_(linear.bias[rows])
        att.o_proj.weight.copy_(att.o_proj.weight[:, q_rows])
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[channels[index]])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[channels[index]])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, channels[index]])


def train(root: Path, seed: int = 0, steps: int = 4, lr: float = 0.05, kind: str = "llama") -> Trained:
    """Select, permute, train and save base and fine-tuned checkpoints (of ``kind``) under ``root``."""
    model = base_model(seed, kind)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // cfg.num_key_value_heads
    model.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(seed + 1)
    truth = Trained(root / "base", root / "finetuned", {}, {}, {}, {}, {}, {})
    blocks = []  # (parameter name, dim, start, count)
    for index in range(cfg.num_hidden_layers):
        only_v, vo, only_o = _split(generator, cfg.num_key_value_heads, 1)
        only_u, ud, only_d = _split(generator, cfg.intermediate_size, 8)
        truth.groups[index] = _order(only_v, vo, only_o, cfg.num_key_value_heads)
        truth.channels[index] = _order(only_u, ud, only_d, cfg.intermediate_size)
        truth.v_groups[index], truth.o_groups[index] = sorted(only_v + vo), sorted(vo + only_o)
        truth.up_channels[index], truth.down_channels[index] = sorted(only_u + ud), sorted(ud + only_d)
        prefix = f"layers.{index}."
        v, o = len(only_v + vo), len(vo + only_o)
        u, d = len(only_u + ud), len(ud + only_d)
        blocks += [
            (prefix + "self_attn.v_proj.weight", 0, 0, v * hd),
            (prefix + "self_attn.o_proj.weight", 1, len(only_v) * rep * hd, o * rep * hd),
            (prefix + "mlp.up_proj.weight", 0, 0, u),
            (prefix + "mlp.down_proj.weight", 1, len(only_u), d),
        ]
    permute(model, truth.groups, truth.channels)
    _fit(model, blocks, steps, lr, seed)
    model.save_pretrained(root / "finetuned")
    return truth


def _fit(model, blocks, steps: int, lr: float, seed: int) -> None:
    """Train only the contiguous sub-blocks (zero-initialised, added to the frozen weights)."""
    params = dict(model.named_parameters())
    deltas = {}
    for name, dim, start, count in blocks:
        shape = list(params[name].shape)
        shape[dim] = count
        deltas[name] = (dim, torch.arange(start, start + count), torch.zeros(shape, requires_grad=True))
    optimizer = torch.optim.Adam([d for _, _, d in deltas.values()], lr=lr)
    generator = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=generator)
    target = torch.randn(2, 8, model.config.hidden_size, generator=generator)
    for _ in range(steps):
        weights = {n: params[n].index_add(dim, rows, d) for n, (dim, rows, d) in deltas.items()}
        out = torch.func.functional_call(model, weights, (ids,)).last_hidden_state
        loss = torch.nn.functional.mse_loss(out, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for name, (dim, rows, d) in deltas.items():
            params[name].copy_(params[name].index_add(dim, rows, d))
