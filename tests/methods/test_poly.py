"""Poly (``peftc/methods/poly.py``): the router stays in the program, ``task_ids`` is an input.

PEFT builds and saves each adapter with every trained tensor perturbed (``models.make_adapter``); the
program peftc traces must match PEFT's eager ``PeftModelFor<task>`` within the fp32 bound on tiny BERT
(``SEQ_CLS``, with its ``modules_to_save`` head) and tiny LLaMA (``CAUSAL_LM``), the ONNX artifact
must match PEFT on a batch of mixed tasks, a sign-flipped update must fail verification, and
each refusal has its own test. With a task id (``--task-id``) the mix is merged into the weights: the
merged program has no router and no ``task_ids`` input and matches PEFT given ``task_ids = K``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import models
import numpy as np
import peft
import pytest
import torch
import transformers
import workdirs
from conftest import assert_outputs_close, edited_adapter

import peftc
from peftc import ir
from peftc.driver.build import Sources, Stages, build
from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.loaders.inputs import InputSignature, from_transformers
from peftc.methods import poly, registry
from peftc.methods.base import ParseOptions
from peftc.methods.loading import read_adapter
from peftc.passes import PassContext, PassManager, pipelines
from peftc.verification import OraclePlan, peft_oracle, program_oracle, verify

_WORK = workdirs.work_dir("peftc-poly-")


def _llama_lm() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    return models._seeded(lambda: transformers.LlamaForCausalLM(config))


FAMILIES = {
    "bert": (functools.partial(models.tiny_bert, head=True), "SEQ_CLS", ["query", "value"]),
    "llama": (_llama_lm, "CAUSAL_LM", ["q_proj", "up_proj"]),
}


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return FAMILIES[family][0]()


@functools.cache
def _adapter(family: str) -> Path:
    _, task, targets = FAMILIES[family]
    config = peft.PolyConfig(task_type=task, target_modules=targets, r=4, n_tasks=3, n_skills=2, n_splits=2)
    return models.make_adapter(_model(family), _WORK / family, config, noise=1.0)


def _verified(family: str):
    built = build(Sources(model=_model(family), adapters=(_adapter(family),)), Stages(), stack=True)
    world = built.fp32
    assert world.inserted and not any(a.sites for a in built.adapters)
    oracles, missing = OraclePlan(world.module).oracles(program_oracle(world.reference), built.adapters)
    assert not missing and "peft" in oracles
    return built, oracles, verify(oracles["reference"], built.loaded.signature, {"peft": oracles["peft"]})


def test_llama_matches_peft_and_the_task_changes_the_output():
    built, oracles, report = _verified("llama")
    assert report.passed, {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}
    signature = built.loaded.signature
    assert signature.names[-1] == "task_ids"
    inputs = signature.example({**signature.cases(1)[0], "batch": 2}, seed=3)
    base = {k: v for k, v in inputs.items() if k != "task_ids"}
    with torch.no_grad():
        plain = _model("llama")(**base).logits.numpy()
    outputs = [oracles["peft"]({**base, "task_ids": torch.tensor([t, t])})["logits"] for t in (0, 2)]
    for got in outputs:  # the adapter moves the output, and the task id moves it differently
        assert np.abs(got - plain).max() / np.abs(plain).max() > 0.02
    assert np.abs(outputs[0] - outputs[1]).max() / np.abs(plain).max() > 0.01


def test_bert_matches_peft_with_its_head_copied():
    built, _, report = _verified("bert")
    assert report.passed, {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}
    (adapter,) = built.adapters
    assert [r.param for r in adapter.replacements] == ["base_model.classifier.bias", "base_model.classifier.weight"]


def test_onnx_artifact_matches_peft_on_mixed_tasks(tmp_path):
    module, path = _model("bert"), _adapter("bert")
    artifact = peftc.compile(module, path, out=tmp_path / "out")
    verification = artifact.manifest.verification
    assert verification["passed"] and {c["oracle"] for c in verification["cases"]} == {"reference", "peft"}
    signature = InputSignature.from_json(artifact.manifest.target["signature"])
    assert signature.names == [i.name for i in from_transformers(module).inputs] + ["task_ids"]
    assert artifact.manifest.target["index_ranges"]["task_ids"] == [0, 3]  # the runner refuses others
    inputs = signature.example({**signature.cases(1)[0], "batch": 3}, seed=11)
    inputs["task_ids"] = torch.tensor([2, 0, 1])
    runner = peftc.load(artifact.path)
    assert_outputs_close(runner(**inputs), models.peft_outputs(module, path, inputs))
    with pytest.raises(InputError, match=r"input 'task_ids': value 3 at \[1\] is outside \[0, 3\)"):
        runner(**{**inputs, "task_ids": torch.tensor([2, 3, 1])})


def test_verification_catches_a_sign_flipped_update(monkeypatch):
    delta = poly.Skills.delta
    monkeypatch.setattr(poly.Skills, "delta", lambda self, x, ids: -delta(self, x, ids))
    _, _, report = _verified("bert")
    assert not report.passed


def _source(tmp_path, *, config=None, tensors=None):
    return read_adapter(edited_adapter(_adapter("bert"), tmp_path / "edited", config=config, tensors=tensors))


def _insert(source):
    module = _model("bert")
    return registry.insertion([source], module, from_transformers(module))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"task_type": None}, "POLY with task_type=None: PEFT's model for it passes no task_ids to the router"),
        ({"task_type": "TOKEN_CLS"}, "task_type='TOKEN_CLS': PEFT's model for it passes no task_ids"),
        ({"poly_type": "mhr"}, "poly_type='mhr': PEFT implements only 'poly'"),
    ],
    ids=["no-task-type", "token-cls", "poly-type"],
)
def test_refuses_what_peft_does_not_route(tmp_path, config, message):
    with pytest.raises(UnsupportedError, match=re.escape(message)):
        _insert(_source(tmp_path, config=config))


def test_refuses_a_router_of_another_task_count(tmp_path):
    with pytest.raises(InputError, match=r"query.poly_router.module_logits: shape \[3, 4\].*\[n_tasks=5"):
        _insert(_source(tmp_path, config={"n_tasks": 5}))


def test_refuses_a_module_without_its_router(tmp_path):
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.poly_router.module_logits"
    with pytest.raises(InputError, match=re.escape(f"no {key!r} tensor")):
        _insert(_source(tmp_path, tensors={key: None}))


def test_refuses_skills_that_do_not_fit_the_module(tmp_path):
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.poly_lora_A"
    with pytest.raises(InputError, match=r"poly_lora_A: shapes \[2, 2, 8, 4\].*\[32, 32\]"):
        _insert(_source(tmp_path, tensors={key: torch.randn(2, 2, 8, 4)}))


def test_refuses_a_program_traced_without_the_router():
    table = module_table_from_module(models.tiny_bert(head=True))
    with pytest.raises(UnsupportedError, match="POLY adapter is inserted when peftc traces the model"):
        registry.parse_adapter(read_adapter(_adapter("bert")), table)


def test_refuses_a_stack():
    source = read_adapter(_adapter("bert"))
    module = _model("bert")
    with pytest.raises(
        UnsupportedError, match=r"a POLY adapter is inserted by wrapping the base model .* \(compile it alone\)"
    ):
        registry.insertion([source, source], module, from_transformers(module))


def test_refuses_a_key_that_is_not_a_poly_tensor(tmp_path):
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.poly_lora_C"
    with pytest.raises(InputError, match=re.escape(f"{key}: not a Poly tensor (poly_lora_A, ")):
        _insert(_source(tmp_path, tensors={key: torch.ones(2)}))


def test_refuses_a_head_copy_the_model_lacks(tmp_path):
    key = "base_model.model.classifier.extra"
    with pytest.raises(InputError, match=re.escape(f"{key}: not a Poly tensor or a modules_to_save copy")):
        registry.parse_adapter(_source(tmp_path, tensors={key: torch.ones(2)}), _traced_table())


def _traced_table():
    """The module table of the wrapper the BERT adapter is traced in (built from the module, untraced)."""
    inserted = _insert(read_adapter(_adapter("bert")))
    return module_table_from_module(inserted.wrap(_model("bert")))


@functools.cache
def _task_built():
    """The BERT adapter built for task 0 (the base is traced once for every task)."""
    return build(Sources(model=_model("bert"), adapters=(_adapter("bert"),), task_id=0), Stages(), stack=True)


@functools.cache
def _task_merged(task: int):
    """The BERT adapter compiled for ``task``: the merged program, its inputs, and PEFT with ``task_ids = task``."""
    built = _task_built()
    world = built.fp32
    assert not world.inserted
    adapter = registry.parse_adapter(
        read_adapter(_adapter("bert")), ir.module_table(world.base), ParseOptions(task_id=task)
    )
    assert {s.op for s in adapter.sites} == {"poly_task_weight"}
    merged, _ = PassManager([*pipelines.adapt([adapter]), *pipelines.optimize(merge=True)]).run(
        world.base, PassContext()
    )
    peft, why = peft_oracle(_model("bert"), [adapter])
    assert peft is not None, why
    return merged, built.loaded.signature, peft


@pytest.mark.parametrize("task", [0, 2])
def test_a_fixed_task_merges_and_matches_peft(task):
    merged, signature, peft = _task_merged(task)
    assert "task_ids" not in signature.names
    targets = [n.target for n in merged.graph.nodes if n.op == "call_function"]
    assert not any("sigmoid" in str(t) or "poly" in str(t) for t in targets)  # no router, sites merged
    assert not any("poly" in name for name in merged.state_dict)
    report = verify(program_oracle(merged), signature, {"peft": peft})
    assert report.passed, {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}


def test_the_two_tasks_merge_differently_and_verification_tells_them_apart():
    (zero, signature, _), (two, _, peft_two) = _task_merged(0), _task_merged(2)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert (zero.state_dict[key] - two.state_dict[key]).abs().max() > 1e-3 * zero.state_dict[key].abs().max()
    assert not verify(program_oracle(zero), signature, {"peft": peft_two}).passed  # task 0 merged, PEFT on task 2


def test_the_task_id_option_reaches_the_build_and_the_rebuild_command():
    from peftc.driver.pipeline import _sources
    from peftc.options import CompileOptions

    options = CompileOptions(model="bert-dir", adapters=("poly",), out="out", task_id=2)
    assert _sources(options).task_id == 2
    assert options.command()[-2:] == ["--task-id", "2"]
    with pytest.raises(InputError, match=re.escape("--task-id -1: give a task index >= 0")):
        CompileOptions(model="bert-dir", adapters=("poly",), out="out", task_id=-1)


def test_a_task_id_outside_the_router_or_without_poly_is_refused(bert_adapter):
    table, options = ir.module_table(_task_built().fp32.base), ParseOptions(task_id=3)
    with pytest.raises(InputError, match=re.escape("--task-id 3: the router of adapter_model.safetensors:")):
        registry.parse_adapter(read_adapter(_adapter("bert")), table, options)
    module = models.tiny_bert()
    with pytest.raises(InputError, match=re.escape("--task-id 0: no adapter is routed by task (POLY is)")):
        registry.insertion([read_adapter(bert_adapter)], module, from_transformers(module), task_id=0)
