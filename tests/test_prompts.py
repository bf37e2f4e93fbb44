"""Prompt learning (``peftc/methods/prompt``), inserted before tracing, verified against PEFT.

Every cell of ``tests/prompt_matrix.py``: PEFT builds and saves the adapter with every trained tensor
perturbed (``models.make_adapter``); peftc's build stage wraps the family model and traces it, and the
reference program must match PEFT's eager ``PeftModelFor<task>`` within the fp32 bound (1e-5 relative
to max|y|) on three seeded input shapes, virtual positions included, while the prompt visibly changes
the real tokens' outputs. One cell per program (prompt tuning's, multitask's) also compiles to ONNX. Each refusal has its own test.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import models
import numpy as np
import prompt_matrix
import pytest
import torch
import workdirs
from conftest import assert_outputs_close, edited_adapter

import peftc
from peftc.driver.build import Sources, Stages, build
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import InputSignature, from_transformers
from peftc.methods import registry
from peftc.methods.loading import read_adapter
from peftc.methods.prompt import wrapper
from peftc.verification import OraclePlan, program_oracle, to_numpy, verify

FAMILIES = {f.name: f for f in prompt_matrix.FAMILIES}
METHODS = {m.name: m for m in prompt_matrix.METHODS}
_WORK = workdirs.work_dir("peftc-prompts-")


@functools.cache
def _model(family: str) -> torch.nn.Module:
    return FAMILIES[family].build()


@functools.cache
def _adapter(method: str, family: str) -> Path:
    config = METHODS[method].config(FAMILIES[family])
    return models.make_adapter(_model(family), _WORK / f"{method}-{family}", config)


def _built(path: Path, family: str):
    return build(Sources(model=_model(family), adapters=(path,)), Stages(), stack=True)


@pytest.mark.parametrize(("method", "family"), [(m.name, f.name) for m, f in prompt_matrix.cells()])
def test_cell_matches_peft(method, family):
    path = _adapter(method, family)
    built = _built(path, family)
    world = built.fp32
    assert world.inserted and not any(a.sites for a in built.adapters)
    oracles, missing = OraclePlan(world.module).oracles(program_oracle(world.reference), built.adapters)
    assert not missing and "peft" in oracles
    signature = built.loaded.signature
    report = verify(oracles["reference"], signature, {"peft": oracles["peft"]})
    worst = {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}
    assert report.passed, worst
    # The adapter changes the real tokens' outputs (prompts' per-position outputs keep the virtual ones first).
    prompt = read_adapter(path).tensors.get("prompt_embeddings")  # none for the adaption prompt
    count = int(prompt.shape[0]) if prompt is not None else 0
    inputs = signature.example(signature.cases(1)[0], seed=3)
    base_inputs = {k: v for k, v in inputs.items() if k != wrapper.TASK_IDS}
    with torch.no_grad():
        plain = to_numpy(world.module(**base_inputs))
    prompted = oracles["peft"](inputs)
    for name, value in plain.items():
        got = prompted[name]
        if got.ndim == 3 and got.shape[1] == value.shape[1] + count:
            got = got[:, count:]
        change = float(np.abs(got - value).max() / np.abs(got).max())
        assert change > 0.02, f"{name}: the prompt barely changes the output ({change:.3g})"


@pytest.mark.parametrize("method", [m.name for m in prompt_matrix.METHODS if m.onnx_family])
def test_method_compiles_to_a_verified_onnx_artifact(tmp_path, method):
    family = METHODS[method].onnx_family
    module, path = _model(family), _adapter(method, family)
    artifact = peftc.compile(module, path, out=tmp_path / "out")
    verification = artifact.manifest.verification
    assert verification["passed"] and {c["oracle"] for c in verification["cases"]} == {"reference", "peft"}
    task = FAMILIES[family].task
    names = [i.name for i in from_transformers(module).inputs]
    expected = [n for n in names if n != "token_type_ids" or task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")]
    signature = InputSignature.from_json(artifact.manifest.target["signature"])
    assert signature.names == expected + ([wrapper.TASK_IDS] if method == "multitask_prompt_tuning" else [])
    if method == "multitask_prompt_tuning":  # the runner refuses task ids outside [0, num_tasks)
        assert artifact.manifest.target["index_ranges"][wrapper.TASK_IDS] == [0, 3]
    runner = peftc.load(artifact.path)
    inputs = signature.example({**signature.cases(1)[0], "batch": 5}, seed=11)
    assert_outputs_close(runner(**inputs), models.peft_outputs(module, path, inputs))


def test_readme_table_is_generated_from_the_matrix():
    assert prompt_matrix.readme_section(prompt_matrix.README.read_text()) == prompt_matrix.render()


def _source(tmp_path, method="prompt_tuning", family="bert", *, config=None, tensors=None):
    """The matrix adapter of ``method`` on ``family``, read after editing a copy (``edited_adapter``)."""
    path = _adapter(method, family)
    if config or tensors is not None:
        path = edited_adapter(path, tmp_path / "edited", config=config, tensors=tensors)
    return read_adapter(path)


def _insert(source, family="bert", signature=None):
    module = _model(family)
    return registry.insertion([source], module, signature or from_transformers(module))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"task_type": None}, "task_type=None: PEFT's plain PeftModel ignores the prompt without a task type"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type='SEQ_2_SEQ_LM': encoder-decoder prompts"),
        ({"num_transformer_submodules": 2}, "num_transformer_submodules=2: one prompt per model is supported"),
    ],
    ids=["no-task-type", "seq2seq", "two-submodules"],
)
def test_refuses_a_task_peft_does_not_prompt_as_peftc_wires(tmp_path, config, message):
    with pytest.raises(UnsupportedError, match=re.escape(message)):
        _insert(_source(tmp_path, config=config))


def test_refuses_a_prompt_whose_length_is_not_num_virtual_tokens(tmp_path):
    source = _source(tmp_path, tensors={"prompt_embeddings": torch.randn(3, 32)})
    with pytest.raises(
        InputError, match=r"adapter_model.safetensors:prompt_embeddings: shape \[3, 32\].*\[num_virtual"
    ):
        _insert(source)


def test_refuses_a_file_without_a_prompt(tmp_path):
    with pytest.raises(InputError, match="no 'prompt_embeddings' tensor"):
        _insert(_source(tmp_path, tensors={"prompt_embeddings": None, "other": torch.ones(2)}))


def test_refuses_a_key_that_is_not_a_prompt_tensor(tmp_path):
    with pytest.raises(InputError, match="safetensors:encoder.weight: not a PROMPT_TUNING tensor"):
        _insert(_source(tmp_path, tensors={"encoder.weight": torch.ones(2, 2)}))


def test_refuses_a_prompt_wider_than_the_word_embedding(tmp_path):
    source = _source(tmp_path, config={"token_dim": 16}, tensors={"prompt_embeddings": torch.randn(5, 16)})
    with pytest.raises(UnsupportedError, match=r"prompt width 16 does not fit the word embedding .*\[100, 32\]"):
        _insert(source)


def test_refuses_multitask_prompts_for_a_task_without_task_ids(tmp_path):
    source = _source(tmp_path, "multitask_prompt_tuning", "bert-cls", config={"task_type": "FEATURE_EXTRACTION"})
    with pytest.raises(UnsupportedError, match="passes no task_ids to the prompt"):
        _insert(source, "bert-cls")


def test_refuses_a_model_without_word_embeddings(tmp_path):
    from peftc.loaders.inputs import parse_inputs

    signature = parse_inputs(["input_ids:batch,seq:int64:0..16"])
    with pytest.raises(UnsupportedError, match="PEFT finds no word embedding in MLP"):
        registry.insertion([_source(tmp_path)], models.mlp(), signature)


def test_refuses_an_input_the_wrapper_does_not_wire(tmp_path):
    from peftc.loaders.inputs import parse_inputs

    signature = parse_inputs(["input_ids:batch,seq:int64:0..100", "position_ids:batch,seq:int64"])
    with pytest.raises(UnsupportedError, match="the model's input 'position_ids' is not supported"):
        _insert(_source(tmp_path), signature=signature)


def test_refuses_a_prompt_in_a_stack(tmp_path):
    source = _source(tmp_path)
    with pytest.raises(UnsupportedError, match="cannot be stacked with other adapters"):
        registry.insertion([source, source], _model("bert"), from_transformers(_model("bert")))


def test_refuses_an_exported_program_for_a_base(tmp_path):
    with pytest.raises(UnsupportedError, match="the base is an exported program"):
        registry.insertion([_source(tmp_path)], None, None)


def test_refuses_a_swappable_prompt(tmp_path):
    with pytest.raises(
        UnsupportedError, match=r"--swappable: adapter .* is inserted by wrapping the base model, so it has no slots"
    ):
        peftc.compile(_model("bert"), _adapter("prompt_tuning", "bert"), out=tmp_path / "out", swappable=True)


def test_refuses_adding_a_prompt_to_a_program_traced_without_it(tmp_path):
    from conftest import export

    from peftc import ir
    from peftc.loaders.inputs import parse_inputs

    table = ir.module_table(export(models.mlp(), parse_inputs(models.MLP_INPUTS)))
    with pytest.raises(UnsupportedError, match="inserted when peftc traces the model"):
        registry.parse_adapter(_source(tmp_path), table)


def test_verification_catches_a_broken_prompt(monkeypatch):
    """The check against PEFT fails when the wrapper's prompt is wrong (mutations: its sign, its order), and
    passes without the mutation."""
    import copy

    from peft import PeftModel

    path, module = _adapter("prompt_tuning", "llama"), _model("llama")
    inserted = _insert(read_adapter(path), "llama")
    wrapped = inserted.wrap(module)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(module), str(path)).eval()

    def run(model):
        def call(inputs):
            with torch.no_grad():
                return to_numpy(model(**inputs))

        return call

    oracle = {"peft": run(peft_model)}
    assert verify(run(wrapped), inserted.signature, oracle, cases=1).passed
    real = wrapper.Prompted.prompts
    for broken in (lambda p: -p, lambda p: p.flip(1)):
        monkeypatch.setattr(wrapper.Prompted, "prompts", lambda self, *a, broken=broken: broken(real(self, *a)))
        assert not verify(run(wrapped), inserted.signature, oracle, cases=1).passed


def test_refuses_prefix_tuning_for_a_classifier(tmp_path):
    source = _source(tmp_path, "prefix_tuning", "gpt2", config={"task_type": "SEQ_CLS"})
    with pytest.raises(UnsupportedError, match="PREFIX_TUNING with task_type='SEQ_CLS': not a task type peftc inserts"):
        _insert(source, "gpt2")


def test_refuses_prefix_tuning_on_a_model_peft_gives_another_cache(tmp_path):
    import types

    other = torch.nn.Module()
    other.config = types.SimpleNamespace(model_type="bloom")
    with pytest.raises(UnsupportedError, match="prefix tuning on 'bloom': PEFT builds another cache"):
        registry.insertion([_source(tmp_path, "prefix_tuning", "gpt2")], other, from_transformers(_model("gpt2")))


def test_refuses_a_prefix_for_other_layers(tmp_path):
    source = _source(
        tmp_path, "prefix_tuning", "gpt2", config={"num_layers": 1}, tensors={"prompt_embeddings": torch.randn(3, 64)}
    )
    with pytest.raises(
        UnsupportedError, match="num_layers=1, token_dim=32 .* do not fit the model's 2 layers of width 32"
    ):
        _insert(source, "gpt2")


def test_refuses_prefix_rows_of_the_wrong_width(tmp_path):
    source = _source(tmp_path, "prefix_tuning", "gpt2", tensors={"prompt_embeddings": torch.randn(3, 100)})
    with pytest.raises(InputError, match=r"prompt_embeddings: shape \[3, 100\].*2·num_layers·token_dim=128"):
        _insert(source, "gpt2")


def _renamed(tensors, old: str, new: str):
    return {k.replace(old, new): v for k, v in tensors.items()}


def test_refuses_an_adaption_prompt_on_a_model_peft_does_not_adapt(tmp_path):
    with pytest.raises(UnsupportedError, match="ADAPTION_PROMPT on model type 'bert'; PEFT adapts"):
        registry.insertion(
            [_source(tmp_path, "adaption_prompt", "llama")], _model("bert"), from_transformers(_model("bert"))
        )


def test_refuses_an_adaption_prompt_on_other_layers_than_peft_picks(tmp_path):
    source = _source(tmp_path, "adaption_prompt", "llama", tensors=lambda t: _renamed(t, "layers.1.", "layers.0."))
    with pytest.raises(UnsupportedError, match=r"adapted layers \['layers.0.self_attn'\]; PEFT adapts the last 1"):
        _insert(source, "llama")


def test_refuses_an_adaption_prompt_key_of_another_kind(tmp_path):
    source = _source(
        tmp_path, "adaption_prompt", "llama", tensors=lambda t: _renamed(t, "adaption_gate", "adapter_gate")
    )
    with pytest.raises(InputError, match=r"adapter_gate: not an ADAPTION_PROMPT tensor"):
        _insert(source, "llama")


def test_refuses_an_adaption_gate_that_is_not_one_number(tmp_path):
    key = "base_model.model.layers.1.self_attn.adaption_gate"
    source = _source(tmp_path, "adaption_prompt", "llama", tensors={key: torch.ones(2)})
    with pytest.raises(InputError, match=r"adaption_gate: shape \[2\] does not match .*\[1\]"):
        _insert(source, "llama")


def test_refuses_adding_an_adaption_prompt_to_a_program_traced_without_it(tmp_path):
    from conftest import export

    from peftc import ir
    from peftc.loaders.inputs import parse_inputs

    table = ir.module_table(export(models.mlp(), parse_inputs(models.MLP_INPUTS)))
    with pytest.raises(UnsupportedError, match="ADAPTION_PROMPT adapter is inserted when peftc traces the model"):
        registry.parse_adapter(_source(tmp_path, "adaption_prompt", "llama"), table)


def test_verification_catches_a_broken_adaption_prompt(monkeypatch):
    """The check against PEFT fails when the adapted attention swaps the prompt's keys and values."""
    import copy

    from peft import PeftModel

    from peftc.methods.prompt import adaption

    path, module = _adapter("adaption_prompt", "llama"), _model("llama")
    inserted = _insert(read_adapter(path), "llama")
    wrapped = inserted.wrap(module)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(module), str(path)).eval()

    def run(model):
        def call(inputs):
            with torch.no_grad():
                return to_numpy(model(**inputs))

        return call

    oracle = {"peft": run(peft_model)}
    assert verify(run(wrapped), inserted.signature, oracle, cases=1).passed
    real = adaption.Adapted._llama

    def swapped(self, *args):
        query, key, value = real(self, *args)
        return query, value, key

    monkeypatch.setattr(adaption.Adapted, "_llama", swapped)
    assert not verify(run(wrapped), inserted.signature, oracle, cases=1).passed
