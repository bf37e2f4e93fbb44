"""The method × model-family coverage matrix, and the README table generated from it.

Each :class:`Method` says how to configure a Hugging Face PEFT adapter of that method on each
:class:`Family` (or why it does not apply). ``tests/test_matrix.py`` builds every cell with PEFT
itself, compiles it with peftc merged and unmerged, and checks the compiled program against PEFT's
eager model; one cell per method also goes through the whole ``peftc.compile`` to an ONNX artifact.
The README's supported-methods table is rendered from these tables::

    python tests/matrix.py            # print the table
    python tests/matrix.py --write    # rewrite it in README.md (a test checks they agree)
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matrix_lowrank as lowrank
import matrix_projections as projections
import matrix_transforms as transforms
import models

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model from a config, with the module names methods target."""

    name: str
    title: str
    build: Callable[[], Any]
    inputs: tuple[str, ...] | None
    """``--input`` descriptions, or None where peftc derives them (transformers models)."""
    linear: tuple[str, ...]
    """Linear-like targets: attention and MLP projections."""
    feedforward: tuple[str, ...]
    """The subset (IA)³ scales on the input side."""
    norms: tuple[str, ...] = ()
    embedding: str | None = None
    conv: tuple[str, ...] = ()
    """``nn.Conv2d`` targets."""
    conv1d: tuple[str, ...] = ()
    """``nn.Conv1d`` targets."""
    pointwise: tuple[str, ...] = ()
    """The 1×1 subset of ``conv`` (OFT rotates only those as its merge does)."""
    linear_type: str = "Linear"
    """``Linear`` or ``Conv1D`` (GPT-2)."""


FAMILIES = (
    Family(
        "bert",
        "tiny BERT",
        models.tiny_bert,
        None,
        ("query", "key", "value", "dense"),
        ("output.dense",),
        norms=("LayerNorm",),
        embedding="word_embeddings",
    ),
    Family(
        "llama",
        "tiny LLaMA (GQA)",
        models.tiny_llama,
        None,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ("down_proj",),
        norms=("input_layernorm", "post_attention_layernorm"),
        embedding="embed_tokens",
    ),
    Family(
        "gpt2",
        "tiny GPT-2 (Conv1D)",
        models.tiny_gpt2,
        None,
        ("c_attn", "c_proj", "c_fc"),
        ("mlp.c_proj",),
        norms=("ln_1", "ln_2"),
        embedding="wte",
        linear_type="Conv1D",
    ),
    Family(
        "convnet",
        "conv net",
        models.convnet,
        tuple(models.CONVNET_INPUTS),
        ("head",),
        ("conv2",),
        conv=("conv1", "conv2"),
        conv1d=("conv3",),
        pointwise=("conv2",),
    ),
    Family(
        "vit",
        "timm ViT",
        models.timm_vit,
        tuple(models.VIT_INPUTS),
        ("qkv", "attn.proj", "fc1", "fc2"),
        ("fc2",),
        norms=("norm1", "norm2"),
        conv=("patch_embed.proj",),
    ),
)


@dataclasses.dataclass(frozen=True)
class Method:
    """How to configure one PEFT method on each family: a PEFT config, or why it does not apply."""

    name: str
    title: str
    config: Callable[[Family], Any]
    onnx_family: str
    """The family whose cell also runs the whole compile to ONNX (unmerged, so the method's ops are lowered)."""
    noise: float = 0.3
    """How far ``models.make_adapter`` moves each trained tensor (relative), so the adapter matters."""


def _lora(family: Family, **extra: Any) -> Any:
    from peft import LoraConfig

    targets = [*family.linear, *family.conv, *family.conv1d]
    fan_in_fan_out = family.linear_type == "Conv1D"
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out, **extra)


def _dora(family: Family) -> Any:
    return _lora(family, use_dora=True)


def _lora_embedding(family: Family) -> Any:
    from peft import LoraConfig

    if family.embedding is None:
        return "the model has no token embedding"
    return LoraConfig(r=4, lora_alpha=8, target_modules=[family.embedding])


def _ia3(family: Family) -> Any:
    from peft import IA3Config

    targets = sorted({*family.linear, *family.conv, *family.feedforward})  # PEFT: feedforward ⊆ targets
    return IA3Config(
        target_modules=targets,
        feedforward_modules=list(family.feedforward),
        fan_in_fan_out=family.linear_type == "Conv1D",
    )


def _adalora(family: Family) -> Any:
    from peft import AdaLoraConfig

    # Pruned ranks as the rank allocator leaves them: a mask per module, some singular values kept.
    return AdaLoraConfig(
        init_r=6, target_r=3, total_step=10, lora_alpha=8, target_modules=[*family.linear, *family.conv],
        fan_in_fan_out=family.linear_type == "Conv1D",
    )  # fmt: skip


def _ln_tuning(family: Family) -> Any:
    from peft import LNTuningConfig

    if not family.norms:
        return "the model has no normalisation layers"
    return LNTuningConfig(target_modules=list(family.norms))


def _trainable_tokens(family: Family) -> Any:
    from peft import TrainableTokensConfig

    if family.embedding is None:
        return "the model has no token embedding"
    return TrainableTokensConfig(target_modules=[family.embedding], token_indices=[0, 3, 7, 42])


def _beft(family: Family) -> Any:
    from peft import BeftConfig

    if family.linear_type != "Linear":
        return "PEFT's BEFT adapts nn.Linear only"
    if family.name == "llama":
        return "LLaMA's projections have no bias to fold into (PEFT cannot merge BEFT there either)"
    return BeftConfig(target_modules=list(family.linear))


CONV1D_REASON = "PEFT's OFT and BOFT do not adapt transformers Conv1D"


def _oft(family: Family) -> Any:
    from peft import OFTConfig

    if family.linear_type == "Conv1D":
        return CONV1D_REASON
    targets = [*family.linear, *family.pointwise, *([family.embedding] if family.embedding else [])]
    # Larger convolutions are refused (PEFT's OFT forward and merge disagree on them, see
    # peftc/methods/oft.py); the ViT's patch_embed.proj would match the target "proj".
    larger = [c for c in family.conv if c not in family.pointwise]
    return OFTConfig(target_modules=targets, exclude_modules=larger or None, oft_block_size=8)


def _boft(family: Family) -> Any:
    from peft import BOFTConfig

    if family.linear_type == "Conv1D":
        return CONV1D_REASON
    targets = [*family.linear, *family.conv]
    if family.name == "convnet":  # 27, 8 and 6 inputs: only one block (block_num=1) fits them all
        return BOFTConfig(target_modules=targets, boft_block_size=0, boft_block_num=1)
    return BOFTConfig(target_modules=targets, boft_block_size=4)


_NO_CONV1D = "PEFT's LoHa and LoKr adapt nn.Linear and nn.Conv1d/2d, not transformers' Conv1D"


def _lycoris_targets(family: Family) -> list[str] | str:
    if family.linear_type == "Conv1D":
        return _NO_CONV1D
    return [*family.linear, *family.conv, *family.conv1d]


def _loha(family: Family) -> Any:
    from peft import LoHaConfig

    targets = _lycoris_targets(family)
    if isinstance(targets, str):
        return targets
    # use_effective_conv2d: k×k convolutions take the CP form (1×1 ones stay flat, as in PEFT).
    return LoHaConfig(r=4, alpha=8, target_modules=targets, use_effective_conv2d=True)


def _lokr(family: Family) -> Any:
    from peft import LoKrConfig

    targets = _lycoris_targets(family)
    if isinstance(targets, str):
        return targets
    # r=2 with decompose_both gives every factor form across the families: full and low-rank W1
    # and W2, the CP form (ViT patch embedding) and full Conv1d kernels (conv net).
    return LoKrConfig(r=2, alpha=4, target_modules=targets, decompose_both=True, use_effective_conv2d=True)


def _vera(family: Family) -> Any:
    from peft import VeraConfig

    # PEFT's VeRA adapts linear layers only, and a suffix such as the ViT's "proj" also names its
    # patch-embedding convolution, so where a family has convolutions a regex leaves them out.
    targets: Any = list(family.linear)
    convs = "|".join(re.escape(c) for c in (*family.conv, *family.conv1d))
    if convs:
        targets = rf"(?!(?:.*\.)?(?:{convs})$)(?:.*\.)?(?:{'|'.join(map(re.escape, family.linear))})"
    # d_initial=1: λ_d starts at 1 rather than 0.1, so the perturbed adapter visibly changes outputs.
    return VeraConfig(r=16, target_modules=targets, fan_in_fan_out=family.linear_type == "Conv1D", d_initial=1.0)


# Methods whose frozen factors are rebuilt from the base weight, or that multiply it.


LINEAR_ONLY_REASON = transforms.LINEAR_ONLY


def _nn_linear_only(family: Family) -> str | None:
    """Why a method that adapts ``nn.Linear`` only does not apply to ``family``, or None."""
    return LINEAR_ONLY_REASON if family.linear_type != "Linear" else None


def _osf(family: Family) -> Any:
    from peft import OSFConfig

    # effective_rank 0.5: half of each weight's singular directions are trained (a fraction, as PEFT reads it).
    return _nn_linear_only(family) or OSFConfig(target_modules=list(family.linear), effective_rank=0.5)


def _psoft(family: Family) -> Any:
    from peft import PsoftConfig

    # Each family takes another form of R and of the frozen factors.
    form = {
        "bert": {},  # exact Cayley, psoft_init, full SVD
        "llama": {"use_cayley_neumann": True, "cayley_neumann_eps": 0.9, "ab_svd_init": "pissa_init"},
        "vit": {"psoft_orth": False, "psoft_mag_a": False},
        "convnet": {"psoft_svd": "lowrank", "random_seed": 3, "psoft_alpha": 8},
    }.get(family.name, {})
    return _nn_linear_only(family) or PsoftConfig(target_modules=list(family.linear), r=4, **form)


def _hira(family: Family) -> Any:
    from peft import HiraConfig

    # Every layer kind PEFT's HiRA adapts: linear (or Conv1D), convolutions, the token embedding.
    targets = [*family.linear, *family.conv, *family.conv1d, *([family.embedding] if family.embedding else [])]
    return HiraConfig(target_modules=targets, r=4, fan_in_fan_out=family.linear_type == "Conv1D")


def _adamss(family: Family) -> Any:
    from peft import AdamssConfig

    return _nn_linear_only(family) or AdamssConfig(
        target_modules=list(family.linear), r=8, num_subspaces=3, subspace_rank=2, init_weights=None
    )


def _deft(family: Family) -> Any:
    from peft import DeftConfig

    # Each family takes another form: relu or QR projector, with or without alpha, PaRa.
    form = {
        "llama": {"decomposition_method": "qr", "alpha": 8},
        "gpt2": {"alpha": 2},
        "vit": {"para": True},
        "convnet": {"decomposition_method": "qr"},
    }.get(family.name, {})
    targets = list(family.linear)
    return DeftConfig(target_modules=targets, r=4, fan_in_fan_out=family.linear_type == "Conv1D", **form)


METHODS = (
    Method("lora", "LoRA (Linear, Conv1D, Conv1d/2d)", _lora, "bert"),
    Method("lora-embedding", "LoRA on Embedding", _lora_embedding, "gpt2"),
    Method("dora", "DoRA (`use_dora`)", _dora, "llama"),
    Method("ia3", "(IA)³", _ia3, "gpt2"),
    Method("ln_tuning", "LayerNorm tuning (`LN_TUNING`)", _ln_tuning, "llama"),
    Method("trainable_tokens", "Trainable tokens (`TRAINABLE_TOKENS`)", _trainable_tokens, "bert"),
    Method("beft", "Bias tuning (`BEFT`)", _beft, "vit"),
    Method("adalora", "AdaLoRA (pruned `rank_pattern`; Linear, Conv1D, Conv2d)", _adalora, "gpt2", noise=1.0),
    Method("oft", "OFT (Linear, 1×1 Conv2d, Embedding)", _oft, "bert"),
    Method("boft", "BOFT (Linear, Conv2d)", _boft, "vit"),
    Method("loha", "LoHa (Linear, Conv1d/2d)", _loha, "vit"),
    Method("lokr", "LoKr (Linear, Conv1d/2d)", _lokr, "convnet"),
    Method("vera", "VeRA (Linear, Conv1D)", _vera, "gpt2"),
    Method("miss", "MiSS (Linear; balance, mini, bat)", transforms.miss, "convnet"),
    Method("hra", "HRA (Linear, Conv2d)", transforms.hra, "convnet"),
    # noise=1: only r·(d_in + d_out) of each weight's entries are trained, each from zero.
    Method("shira", "SHiRA (Linear)", transforms.shira, "convnet", noise=1.0),
    Method("fourierft", "FourierFT (Linear, Conv1D)", transforms.fourierft, "convnet"),
    Method("c3a", "C3A (Linear)", transforms.c3a, "convnet"),
    Method("waveft", "WaveFT (Linear, Conv1D; Daubechies db1–db10)", transforms.waveft, "convnet"),
    Method("randlora", "RandLoRA (Linear, Conv1D)", projections.randlora, "convnet"),
    Method("vblora", "VB-LoRA (Linear, Conv1D)", projections.vblora, "convnet", noise=1.0),
    Method("unilora", "UniLoRA (Linear, Conv1D)", projections.unilora, "convnet", noise=3.0),
    Method("pvera", "PVeRA (Linear, Conv1D; mean at inference)", projections.pvera, "convnet"),
    Method("tinylora", "TinyLoRA (Linear, Conv1D, Embedding)", projections.tinylora, "convnet"),
    Method("osf", "OSF (Linear)", _osf, "convnet", noise=0.6),
    Method("psoft", "PSOFT (Linear)", _psoft, "convnet"),
    Method("hira", "HiRA (Linear, Conv1D, Conv1d/2d, Embedding)", _hira, "convnet"),
    Method("adamss", "AdaMSS (Linear)", _adamss, "convnet"),
    Method("deft", "DEFT (Linear, Conv1D)", _deft, "convnet"),
    Method("delora", "DeLoRA (Linear)", lowrank.delora, "convnet"),
    Method("road", "RoAd (Linear; `road_1`, `road_2`, `road_4`)", lowrank.road, "convnet"),
    Method("gralora", "GraLoRA (Linear, Conv1D; `hybrid_r`)", lowrank.gralora, "gpt2"),
    Method("glora", "GLoRA (Linear; every path form)", lowrank.glora, "convnet"),
    Method("peanut", "PEANuT (Linear; `depth`, `act_fn`)", lowrank.peanut, "convnet"),
    Method("supertuning", "Super-Tuning (Linear; with `r`)", lowrank.supertuning, "convnet"),
    Method("frod", "FRoD (Linear, Conv1D; projections saved or rebuilt)", lowrank.frod, "convnet"),
)


def cells() -> list[tuple[Method, Family]]:
    """Every (method, family) pair the matrix verifies."""
    return [(m, f) for m in METHODS for f in FAMILIES if not isinstance(m.config(f), str)]


def render() -> str:
    """The README table: ✓ where a cell is verified merged and unmerged, else a numbered reason."""
    reasons: list[str] = []
    header = ["method", *(f.title for f in FAMILIES), "ONNX end to end"]
    rows = []
    for method in METHODS:
        row = [method.title]
        for family in FAMILIES:
            config = method.config(family)
            if isinstance(config, str):
                if config not in reasons:
                    reasons.append(config)
                row.append(f"—{_superscript(reasons.index(config) + 1)}")
            else:
                row.append("✓")
        row.append(next(f.title for f in FAMILIES if f.name == method.onnx_family))
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [f"{_superscript(i + 1)} {reason}" for i, reason in enumerate(reasons)]
    return "\n".join(lines) + ("\n\n" + "<br>\n".join(notes) if notes else "") + "\n"


def readme_section(text: str) -> str:
    """The generated part of README.md, between the coverage markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


def _superscript(number: int) -> str:
    return str(number).translate(str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹"))


if __name__ == "__main__":
    table = render()
    if "--write" in sys.argv:
        text = README.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        README.write_text(text[:start] + "\n" + table + text[end:])
    print(table, end="")
