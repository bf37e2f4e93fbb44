"""peftc's re-implementation of PEFT's target rules agrees with PEFT itself on every module."""

from __future__ import annotations

import models
import pytest

from peftc.methods import peft_config

CONFIGS = [
    {"target_modules": ["query", "value"]},
    {"target_modules": ["dense"], "exclude_modules": ["attention.output.dense"]},
    {"target_modules": r".*layer\.1\.attention\.self\.(query|key)"},
    {"target_modules": ["query", "dense"], "exclude_modules": r".*pooler.*"},
    {"target_modules": ["query", "value"], "layers_to_transform": [1]},
    {"target_modules": ["query", "value"], "layers_to_transform": 0, "layers_pattern": "layer"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0], "layers_pattern": ["layers"]},
    {"target_modules": ["dense", "query"], "modules_to_save": ["pooler"]},
    {"target_modules": ["self.query", "output.dense"]},
]


def _module_names():
    names = [n for n, _ in models.tiny_bert(head=True).named_modules() if n]
    return names + [n for n, _ in models.tiny_llama().named_modules() if n]


@pytest.mark.parametrize("config", CONFIGS, ids=range(len(CONFIGS)))
def test_is_target_agrees_with_peft(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    peft_cfg = LoraConfig(**config)
    for name in _module_names():
        found = check_target_module_exists(peft_cfg, name)
        expected = bool(found) and not isinstance(found, _ExcludedModule)
        assert peft_config.is_target(config, name) == expected, name


@pytest.mark.parametrize(
    "patterns",
    [{"query": 2, "value": 3}, {"layer.1.attention.self.query": 5}, {r"layer\.[01]\.output\.dense": 7, "dense": 9}],
)
def test_pattern_value_agrees_with_peft(patterns):
    from peft.utils.other import get_pattern_key

    for name in _module_names():
        key = get_pattern_key(list(patterns), name)
        assert peft_config.pattern_value(patterns, name, -1) == patterns.get(key, -1), name


def test_layer_index_takes_the_first_numbered_segment():
    assert peft_config.layer_index("model.layers.3.mlp.experts.7.up", None) == 3
    assert peft_config.layer_index("encoder.layer.2.attention.self.query", "layer") == 2
    assert peft_config.layer_index("pooler.dense", None) is None
