"""DEFT-trained test models: a tiny ReLU BERT and a LoRA adapter trained with the density loss.

DEFT (``methods.md`` §6.1, ``FORMATS.md`` §2) adds ``d = mean(a² / (a² + ε))`` over the MLP activations
``a`` to the task loss; ``d`` is a smooth count of the non-zero entries. Here the task loss is a
distillation one (stay close to the untrained model's output, so the model still computes something
non-trivial), trained for a few seeded CPU steps with Adam on one thread (chaotic enough that the
thread count's summation order changes which neurons die). ε = 1e-7 as in the DEFT code; Adam's
per-parameter normalisation makes its small gradients move the MLP's up projection within a few steps.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

EPS = 1e-7
LAYERS = ("intermediate.dense", "output.dense")


def relu_bert(seed: int = 0) -> torch.nn.Module:
    """The tiny BERT of ``models.tiny_bert`` with ``hidden_act="relu"``."""
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, hidden_act="relu",
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def density_loss(acts: list[torch.Tensor]) -> torch.Tensor:
    """DEFT's ``mean(a² / (a² + ε))``, averaged over the hooked activations."""
    return torch.stack([(a * a / (a * a + EPS)).mean() for a in acts]).mean()


def _train(model: torch.nn.Module, teacher: torch.nn.Module, params: list, steps: int, lr: float, seed: int) -> list:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order whatever the machine's thread count
    try:
        return _steps(model, teacher, params, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _steps(model: torch.nn.Module, teacher: torch.nn.Module, params: list, steps: int, lr: float, seed: int) -> list:
    acts: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: acts.append(out))
        for name, m in model.named_modules()
        if name.endswith("intermediate_act_fn")
    ]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    densities = []
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 100, (8, 16), generator=generator)
        with torch.no_grad():
            target = teacher(input_ids=ids).last_hidden_state
        acts.clear()
        out = model(input_ids=ids).last_hidden_state
        density = density_loss(acts)
        loss = torch.nn.functional.mse_loss(out, target) + density
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        densities.append(float(density.detach()))
    for hook in hooks:
        hook.remove()
    model.eval()
    return densities


def deft_bert(steps: int = 10, lr: float = 5e-2, seed: int = 0) -> tuple[torch.nn.Module, list[float]]:
    """``relu_bert`` trained with the density loss (dropout off); the model and the loss per step."""
    teacher = relu_bert(seed)
    model = copy.deepcopy(teacher)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    densities = _train(model, teacher, list(model.parameters()), steps, lr, seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, densities


def deft_lora(model: torch.nn.Module, path: Path, steps: int = 10, lr: float = 3e-2, seed: int = 1) -> Any:
    """A LoRA adapter on the MLPs of ``model`` trained with the density loss, saved at ``path``; returns
    the loss per step."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(LAYERS), lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    densities = _train(peft_model, model, params, steps, lr, seed)
    peft_model.save_pretrained(str(path))
    return densities
