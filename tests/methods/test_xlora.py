"""X-LoRA (``peftc/methods/xlora.py``): the scaling pass, the classifier and the gated experts in one program.

PEFT makes each expert (``models.make_lora``: ``init_lora_weights=False``, B re-drawn) and the X-LoRA
model around them; the classifier is re-drawn from a seed so the routing really varies per token, and
its ``state_dict`` is saved as the weights file (PEFT's own ``save_pretrained`` drops classifier keys
that contain an expert's name, ``layers.0``). On a tiny LLaMA (PEFT's X-LoRA loads experts only for
models whose layers are under ``model.``: not BERT, refused), peftc's module must match PEFT's eager
``XLoraModel`` on padded batches of several shapes for three configurations (depth 1–3, layer-wise
gates, temperature, top-k with and without softmax over the kept experts, a non-zero scaling-pass
value, a global weight); one ONNX artifact is compiled and verified against PEFT; mutated formulas
must be caught, and each refusal has its own test.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import warnings
from pathlib import Path

import models
import peft
import pytest
import torch
import transformers
import workdirs
from cli_run import error_line, run
from conftest import edited_adapter
from safetensors.torch import save_file

from peftc.driver.build import Sources, Stages, build
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import from_transformers
from peftc.methods import registry, xlora_model
from peftc.methods.loading import read_adapter
from peftc.methods.xlora import PREFIX
from peftc.verification import OraclePlan, program_oracle, verify

_WORK = workdirs.work_dir("peftc-xlora-")


def _llama_lm() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return models._seeded(lambda: transformers.LlamaForCausalLM(config))


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return models._seeded(lambda: transformers.BertModel(config))


FAMILIES = {
    "llama": (_llama_lm, "CAUSAL_LM", [["q_proj", "v_proj"], ["q_proj", "down_proj"], ["up_proj"]]),
    "bert": (_bert, None, [["query", "value"], ["query", "dense"]]),
}
CONFIGS = {
    # depth 2, a gate per layer, a sharp softmax, the experts active in the scaling pass
    "llama-deep": (
        "llama",
        {
            "xlora_depth": 2,
            "xlora_size": 16,
            "layerwise_scalings": True,
            "softmax_temperature": 0.5,
            "scaling_pass_value": 0.3,
        },
    ),
    # raw logits, the two largest kept and re-normalised
    "llama-topk": ("llama", {"enable_softmax": False, "top_k_lora": 2, "enable_softmax_topk": True}),
    # depth 3 without dropout (other Sequential indices), one gate for every layer, the best expert only
    "llama-flat": (
        "llama",
        {"xlora_depth": 3, "xlora_size": 8, "xlora_dropout_p": 0.0, "top_k_lora": 1, "global_scaling_weight": 0.7},
    ),
}
SHAPES = [(1, 5), (2, 6), (3, 9)]
"""(batch, seq) of the eager comparisons; batches of more than one row have their last row half padded."""


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return FAMILIES[family][0]()


@functools.cache
def _experts(family: str) -> tuple[Path, ...]:
    _, task, targets = FAMILIES[family]
    return tuple(
        models.make_lora(_model(family), _WORK / family / f"expert{i}", seed=i + 1, target_modules=t, task_type=task)
        for i, t in enumerate(targets)
    )


@functools.cache
def _adapter(name: str) -> Path:
    family, options = CONFIGS[name]
    task = FAMILIES[family][1]
    adapters = {str(i): str(path) for i, path in enumerate(_experts(family))}
    config = peft.XLoraConfig(task_type=task, hidden_size=32, adapters=adapters, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(_model(family)), config)
    torch.manual_seed(5)
    classifier = model.base_model.internal_xlora_classifier
    with torch.no_grad():
        for param in classifier.parameters():
            param.copy_(torch.randn_like(param) * 0.5)
    path = _WORK / name
    model.save_pretrained(str(path))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k}
    save_file(state, str(path / "adapter_model.safetensors"))
    return path


@functools.cache
def _peft(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """PEFT's model of adapter ``name`` and its logits on :data:`SHAPES` (the oracle)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(_model(CONFIGS[name][0])), str(_adapter(name))).eval()
        with torch.no_grad():
            return model, tuple(model(**models.text_inputs(b, s)).logits for b, s in SHAPES)


def _wrapped(name: str) -> torch.nn.Module:
    """peftc's module for adapter ``name`` (the one it traces), run eagerly."""
    module = _model(CONFIGS[name][0])
    inserted = registry.insertion([read_adapter(_adapter(name))], module, from_transformers(module))
    return inserted.wrap(copy.deepcopy(module))


def _max_rel(name: str, wrapped: torch.nn.Module) -> float:
    """The largest error of ``wrapped`` relative to PEFT's output scale over :data:`SHAPES`."""
    worst = 0.0
    for (batch, seq), expected in zip(SHAPES, _peft(name)[1], strict=True):
        with torch.no_grad():
            got = wrapped(**models.text_inputs(batch, seq)).logits
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_peft_and_routes_per_token(name):
    assert _max_rel(name, _wrapped(name)) < 1e-5
    model, (_, moved, _) = _peft(name)
    with torch.no_grad():
        model(**models.text_inputs(*SHAPES[1]))
        plain = _model("llama")(**models.text_inputs(*SHAPES[1])).logits
    gates = model.base_model.get_latest_scalings()  # [batch, seq, layers, experts]
    assert gates.std(dim=1).mean() > 0.05  # the routing differs from token to token
    assert (moved - plain).abs().max() / plain.abs().max() > 0.02  # and the experts move the output


def test_the_traced_program_matches_peft():
    built = build(Sources(model=_model("llama"), adapters=(_adapter("llama-deep"),)), Stages(), stack=True)
    world = built.fp32
    assert built.loaded.task is None  # a causal LM, compiled as its own forward around the inserted wrapper
    assert world.inserted and [a.method for a in built.adapters] == ["xlora"] and not built.adapters[0].sites
    experts = built.adapters[0].honoured["experts"]  # recorded in the manifest with their hashes
    assert list(experts) == ["0", "1", "2"] and all(len(e["sha256"]["weights"]) == 64 for e in experts.values())
    oracles, missing = OraclePlan(world.module).oracles(program_oracle(world.reference), built.adapters)
    assert not missing and "peft" in oracles
    report = verify(oracles["reference"], built.loaded.signature, {"peft": oracles["peft"]})
    assert report.passed, {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}
    assert sum(n.target == torch.ops.aten.softmax.int for n in world.reference.graph.nodes) >= 1


@pytest.mark.parametrize("mutation", ["no-temperature", "scaling-pass-without-experts", "main-pass-as-scaling-pass"])
def test_a_broken_formula_is_caught(monkeypatch, mutation):
    wrapped = _wrapped("llama-deep")
    if mutation == "no-temperature":
        wrapped.xlora_gates.routing = dataclasses.replace(wrapped.xlora_gates.routing, temperature=1.0)
    elif mutation == "scaling-pass-without-experts":  # PEFT's scaling pass runs them, gated by scaling_pass_value
        run_ = xlora_model.TwoPass._run
        monkeypatch.setattr(
            xlora_model.TwoPass, "_run", lambda self, s, inputs, **kw: run_(self, None if kw else s, inputs, **kw)
        )
    else:  # the scaling pass gated like the main pass (uniform gates) instead of by scaling_pass_value
        wrapped.xlora_gates.routing = dataclasses.replace(wrapped.xlora_gates.routing, scaling_pass_value=1 / 3)
    assert _max_rel("llama-deep", wrapped) > 1e-4


def _insert(tmp_path, *, config=None, tensors=None, name="llama-flat"):
    source = read_adapter(edited_adapter(_adapter(name), tmp_path / "edited", config=config, tensors=tensors))
    module = _model(CONFIGS[name][0])
    return registry.insertion([source], module, from_transformers(module))


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"adapters": "names"}, UnsupportedError, "adapters named ['a', 'b', 'c']; PEFT's XLoraModel loads expert i"),
        ({"scaling_pass_value": 0.5}, UnsupportedError, "top_k_lora=1 with scaling_pass_value=0.5: PEFT takes the top k of equal gates"),
        ({"top_k_lora": 4}, InputError, "top_k_lora=4 is more than the 3 experts"),
        ({"hidden_size": 48}, InputError, "hidden_size=48; the model's hidden states are 32 wide"),
        ({"adapters": {"0": "/nonexistent"}}, InputError, "expert '0': no LoRA adapter at '/nonexistent'"),
    ],
    ids=["names", "topk-ties", "topk-range", "hidden-size", "missing-expert"],
)  # fmt: skip
def test_refuses_what_it_does_not_lower(tmp_path, config, error, message):
    if config.get("adapters") == "names":
        config = {"adapters": {k: str(p) for k, p in zip("abc", _experts("llama"), strict=True)}}
    with pytest.raises(error, match=re.escape(message)):
        _insert(tmp_path, config=config)


def test_refuses_a_classifier_saved_by_peft_without_its_first_layer(tmp_path):
    key = "base_model.internal_xlora_classifier.layers.0.weight"
    with pytest.raises(InputError, match=re.escape(f"no '{key}' tensor (xlora_depth=3); PEFT's own save drops")):
        _insert(tmp_path, tensors={key: None})


def test_refuses_a_dora_expert(tmp_path):
    expert = edited_adapter(_experts("llama")[0], tmp_path / "dora", config={"use_dora": True})
    adapters = {"0": str(expert), **{str(i): str(p) for i, p in enumerate(_experts("llama")) if i}}
    with pytest.raises(UnsupportedError, match="X-LoRA expert '0' uses DoRA; PEFT's X-LoRA layers refuse it"):
        _insert(tmp_path, config={"adapters": adapters})


def test_refuses_a_model_peft_cannot_load_the_experts_of(tmp_path):
    adapters = {str(i): str(path) for i, path in enumerate(_experts("bert"))}
    with pytest.raises(ValueError, match="unexpected keys"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(_model("bert")), peft.XLoraConfig(hidden_size=32, adapters=adapters))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "XLORA", "hidden_size": 32, "adapters": adapters})
    )
    save_file({PREFIX + "0.weight": torch.zeros(2, 32)}, str(tmp_path / "adapter_model.safetensors"))
    module = _model("bert")
    with pytest.raises(
        UnsupportedError, match=r"adapts encoder.layer.0.attention.self.query; PEFT's XLoraModel renames"
    ):
        registry.insertion([read_adapter(tmp_path)], module, from_transformers(module))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("xlora-llama") / "hf"
    _model("llama").save_pretrained(str(path))
    return path


def test_cli_refuses_a_generation_task_in_one_line(capsys, tmp_path, llama_dir):
    # The adapter wraps the model's own forward: a causal LM's task is not inferred for it (the default
    # compile traces the plain forward), and asking for the generation step is refused before loading.
    code, _, err = run(
        capsys, "compile", llama_dir, "--adapter", _adapter("llama-flat"), "--task", "text-generation",
        "-o", tmp_path / "out",
    )  # fmt: skip
    line = error_line(err)
    assert code == 2 and "--task text-generation: a XLORA adapter is inserted around the model's own" in line
    assert line.endswith("compile it without --task") and not (tmp_path / "out").exists()


def test_cli_refuses_an_option_it_does_not_lower_in_one_line(capsys, tmp_path, llama_dir):
    adapter = edited_adapter(_adapter("llama-flat"), tmp_path / "ties", config={"scaling_pass_value": 0.5})
    code, _, err = run(capsys, "compile", llama_dir, "--adapter", adapter, "--no-merge", "-o", tmp_path / "out")
    assert code == 2 and "top_k_lora=1 with scaling_pass_value=0.5: PEFT takes the top k" in error_line(err)
