"""Coverage-matrix configurations of the one-transform-per-module PEFT types: MiSS, HRA, SHiRA,
FourierFT, C3A and WaveFT (``tests/matrix.py`` lists them in ``METHODS``).

Each function returns the PEFT config of its method on a :class:`matrix.Family`, or the reason the
method does not apply to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matrix import Family


LINEAR_ONLY = "PEFT adapts only nn.Linear with this method, not transformers' Conv1D"
ONE_PER_SHAPE = {"bert": ["value", "dense"], "llama": ["k_proj", "o_proj", "up_proj", "down_proj"]}
"""One target of each weight shape, for the methods whose PEFT oracle is slow per module (an inverse
FFT or wavelet transform on every call): the other projections add test time, not coverage."""


def miss(family: Family) -> Any:
    from peft import MissConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    # One MiSS form per family: balance with a padded last chunk (32 % 5, 6 % 4 inputs), the tiled
    # "bat" form, and "mini" (mini_r divides every d_out).
    forms = {"llama": {"r": 4, "init_weights": "bat"}, "vit": {"r": 4, "init_weights": "mini", "mini_r": 8}}
    form = forms.get(family.name, {"r": 5 if family.name == "bert" else 4})
    return MissConfig(target_modules=list(family.linear), **form)


def hra(family: Family) -> Any:
    from peft import HRAConfig

    if family.linear_type != "Linear":
        return "PEFT's HRA adapts nn.Linear and nn.Conv2d, not transformers' Conv1D"
    # Gram–Schmidt on LLaMA; the plain product of reflections elsewhere (with the k×k convolutions).
    return HRAConfig(r=4, target_modules=[*family.linear, *family.conv], apply_GS=family.name == "llama")


def shira(family: Family) -> Any:
    from peft import ShiraConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    # r=2: the conv net's 6→4 head holds at most r·(6 + 4) ≤ 24 entries.
    return ShiraConfig(r=2, target_modules=list(family.linear), random_seed=7)


def fourierft(family: Family) -> Any:
    from peft import FourierFTConfig

    n = 16 if family.name == "convnet" else 48  # the conv net's head has 6·4 weights
    conv1d = family.linear_type == "Conv1D"
    return FourierFTConfig(
        n_frequency=n,
        scaling=8.0,
        target_modules=ONE_PER_SHAPE.get(family.name, list(family.linear)),
        random_loc_seed=11,
        fan_in_fan_out=conv1d,
    )


def c3a(family: Family) -> Any:
    from peft import C3AConfig

    if family.linear_type != "Linear":
        return LINEAR_ONLY
    # The block size divides every adapted dimension (the conv net's head is 6→4).
    return C3AConfig(block_size=2 if family.name == "convnet" else 8, target_modules=list(family.linear))


def waveft(family: Family) -> Any:
    from peft import WaveFTConfig

    # A different wavelet per family (longer filters pad and crop more); the conv net's head has 24 weights.
    wavelet = {"llama": "db2", "gpt2": "db3", "vit": "sym2"}.get(family.name, "db1")
    return WaveFTConfig(
        n_frequency=16 if family.name == "convnet" else 48,
        scaling=2.0,
        wavelet_family=wavelet,
        target_modules=ONE_PER_SHAPE.get(family.name, list(family.linear)),
        fan_in_fan_out=family.linear_type == "Conv1D",
    )
