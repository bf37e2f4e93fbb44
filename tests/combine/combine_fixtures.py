"""Fixtures of the combine tests: two adapters per (model, variant), made with PEFT and perturbed so
every update changes the outputs; the second targets a different set of modules (union with zeros).

Not a ``conftest.py``: a second conftest module would shadow ``tests/conftest.py`` for the test files
that ``from conftest import …``. The test modules import the fixtures; the adapters are cached per
process, so each is made once however many modules use it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
import models

VARIANTS = ("lora", "rslora", "dora", "loha")
TARGETS = {
    "bert": (["query", "value"], ["query", "dense"]),
    "llama": (["q_proj", "v_proj"], ["q_proj", "down_proj"]),
}
FACTORIES = {"bert": models.tiny_bert, "llama": models.tiny_llama}


def _config(variant: str, targets: list[str]):
    from peft import LoHaConfig, LoraConfig

    if variant == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules=targets)
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=variant == "rslora", use_dora=variant == "dora"
    )


_MADE: dict = {}


@pytest.fixture(name="make_pair")
def make_pair_fixture(tmp_path_factory):
    """``(model, [adapter a, adapter b])`` for a model name and variant, made once per process."""

    def make(model_name: str, variant: str):
        if "root" not in _MADE:
            _MADE["root"] = tmp_path_factory.mktemp("combine")
        if model_name not in _MADE:
            _MADE[model_name] = FACTORIES[model_name]()
        if (model_name, variant) not in _MADE:
            model = _MADE[model_name]
            paths = []
            for index, targets in enumerate(TARGETS[model_name]):
                path = _MADE["root"] / f"{model_name}-{variant}-{index}"
                paths.append(models.make_adapter(model, path, _config(variant, targets), seed=10 + index))
            _MADE[model_name, variant] = (model, paths)
        return _MADE[model_name, variant]

    return make
