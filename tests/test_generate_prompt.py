"""``--task text-generation`` with prompt tuning, P-tuning, CPT and multitask prompt tuning (``--task-id``):
the base model's step, the virtual tokens' keys and values as the cache's head.

The oracle is PEFT's own forward over the whole sequence at every step (no cache): it prepends the
prompt's embeddings, extends the mask and drops position ids, so the model numbers every column. It is
not ``PeftModel.generate``: with PEFT 0.21.2 and transformers 5.25, PEFT's
``prepare_inputs_for_generation`` looks for the cache under ``past_key_values`` while generate passes
it as ``cache``, so every decode step prepends the virtual tokens again (the step sees ``n + 1`` new
embeddings) and its greedy tokens diverge from PEFT's forward after a few steps.

One artifact is compiled (multitask prompt tuning for task 1, the task inferred from the saved
model's architecture): the step is the base model's for every prompt method, so the other methods'
heads are checked on its step in place of its head.
"""

from __future__ import annotations

import copy
import warnings

import models
import numpy as np
import pytest
import torch
from cli_run import error_line, run
from test_generate import _llama as plain_llama
from test_generate import _prompts

import peftc
from peftc.errors import InputError
from peftc.generation import decode, prefix, prefix_check, prompt_head
from peftc.loaders.causal import key_name, value_name
from peftc.methods.loading import read_adapter

NEW = 12
TASK = 1


def _llama() -> torch.nn.Module:
    """``test_generate``'s tiny LLaMA (GQA) with weights of std 0.2: at the default 0.02 its attention is
    nearly uniform, so no greedy token depends on the positions this module checks."""
    import transformers

    config = transformers.LlamaConfig(**{**plain_llama().config.to_dict(), "initializer_range": 0.2})
    return models._seeded(lambda: transformers.LlamaForCausalLM(config))


def _configs() -> dict:
    from peft import CPTConfig, MultitaskPromptTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        "p_tuning": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
        "cpt": CPTConfig(
            task_type="CAUSAL_LM", cpt_token_ids=[3, 1, 4], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 3]
        ),
        "multitask": MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2),
    }


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A tiny LLaMA (GQA) directory, perturbed PEFT prompts of each method, and the multitask prompt's
    generation artifact for task ``TASK``."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("gen-prompt")
    model = _llama()
    model.save_pretrained(str(root / "base"))
    peft_models = {}
    for seed, (name, config) in enumerate(_configs().items()):
        peft_model = get_peft_model(copy.deepcopy(model), config)
        with torch.no_grad():
            for param in peft_model.prompt_encoder.parameters():  # P-tuning's MLP too: PEFT saves its output
                param.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed))
        peft_model.save_pretrained(str(root / name))
        peft_models[name] = peft_model.eval()
    peftc.compile(root / "base", [root / "multitask"], out=root / "out", task_id=TASK)
    return root, model, peft_models, peftc.load(root / "out")


def _peft_greedy(peft_model, ids: torch.Tensor, mask: torch.Tensor, **given) -> torch.Tensor:
    """Greedy tokens from PEFT's forward over the whole sequence at each step (module docstring)."""
    tokens = ids
    for _ in range(NEW):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = peft_model(input_ids=tokens, attention_mask=mask, **given).logits
        chosen = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, chosen], dim=1)
        mask = torch.cat([mask, torch.ones_like(chosen)], dim=1)
    return tokens


def _generate_with(runner, head: dict, monkeypatch) -> torch.Tensor:
    """``runner.generate`` on the prompts with ``head`` in place of the artifact's own."""
    ids, mask = _prompts()
    count = int(next(iter(head.values())).shape[1])
    with monkeypatch.context() as patch:
        patch.setattr(
            prefix, "read_head", lambda r, dtype: (count, {k: v.numpy().astype(dtype) for k, v in head.items()})
        )
        return runner.generate(ids, mask, max_new_tokens=NEW)


def test_multitask_artifact_is_token_identical_to_peft_for_its_task(compiled):
    _, _, peft_models, runner = compiled
    assert runner.manifest.options["task"] == "text-generation"  # inferred from the saved architecture
    assert "task_ids" not in runner.input_names  # the task is fixed
    assert runner.manifest.target["prefix"] == {"file": prefix.FILE, "virtual_tokens": 4, "positions": prefix.COLUMNS}
    assert [(a["method"], a["sites"]) for a in runner.manifest.adapters] == [("multitask_prompt_tuning", [])]
    assert runner.manifest.adapters[0]["config_honoured"]["task_id"] == TASK
    cases = {c["oracle"]: c for c in runner.manifest.verification["cases"]}
    assert all(o["ok"] for o in cases[prefix_check.ORACLE]["outputs"])  # compile checked the head with PEFT
    assert runner.manifest.verification["adapter_effect"]["logits (prompt)"] > 0.05
    ids, mask = _prompts()
    got = runner.generate(ids, mask, max_new_tokens=NEW)
    peft_model = peft_models["multitask"]
    assert torch.equal(got, _peft_greedy(peft_model, ids, mask, task_ids=torch.full((3,), TASK)))
    assert not torch.equal(got, _peft_greedy(peft_model, ids, mask, task_ids=torch.full((3,), 0)))  # the task counts


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "cpt"])
def test_prompt_heads_are_token_identical_to_peft(compiled, method, monkeypatch):
    """Each method's head (``prompt_head.head``, as compile computes it) on the artifact's step: the compile
    check passes, and greedy generation (batch 3, left padding) gives PEFT's tokens."""
    root, model, peft_models, runner = compiled
    source = read_adapter(root / method)
    head = prompt_head.head(source, [source], model, True, None)
    assert prefix_check.report(runner.backend_runner, model, source, head, 0).passed
    ids, mask = _prompts()
    assert torch.equal(_generate_with(runner, head, monkeypatch), _peft_greedy(peft_models[method], ids, mask))


def test_mutations_are_caught(compiled, monkeypatch):
    """The prompt numbered from its mask (as after a prefix), the head dropped, or the head computed at
    positions 1 … n: the compile check fails, and greedy tokens are not PEFT's."""
    root, model, peft_models, runner = compiled
    ids, mask = _prompts()
    task_ids = torch.full((3,), TASK)
    multitask, p_tuning = read_adapter(root / "multitask"), read_adapter(root / "p_tuning")
    own = {k: torch.from_numpy(v) for k, v in prefix.read_head(runner, np.float32)[1].items()}
    with monkeypatch.context() as patch:
        patch.setattr(decode, "column_positions", decode._prefix_positions)
        assert not prefix_check.report(runner.backend_runner, model, multitask, own, 0, TASK).passed
        head = prompt_head.head(p_tuning, [p_tuning], model, True, None)
        got = _generate_with(runner, head, patch)
        assert not torch.equal(got, _peft_greedy(peft_models["p_tuning"], ids, mask))
    with monkeypatch.context() as patch:
        patch.setattr(
            prefix, "expanded", lambda kv, batch: {n: np.zeros((batch, *v.shape), v.dtype) for n, v in kv.items()}
        )
        got = runner.generate(ids, mask, max_new_tokens=NEW)
        assert not torch.equal(got, _peft_greedy(peft_models["multitask"], ids, mask, task_ids=task_ids))
    from transformers import DynamicCache

    rows = p_tuning.tensors["prompt_embeddings"].float()[None]
    with torch.no_grad():
        out = type(model).forward(
            model, inputs_embeds=rows, position_ids=torch.arange(1, 5)[None], cache=DynamicCache(config=model.config),
            use_cache=True,
        )  # fmt: skip
    shifted = {}
    for layer, cached in enumerate(out.cache.layers):
        shifted[key_name(layer)], shifted[value_name(layer)] = cached.keys[0], cached.values[0]
    assert not prefix_check.report(runner.backend_runner, model, p_tuning, shifted, 0).passed
    got = _generate_with(runner, shifted, monkeypatch)
    assert not torch.equal(got, _peft_greedy(peft_models["p_tuning"], ids, mask))


def test_multitask_without_a_task_id_is_refused_in_one_line(compiled, capsys):
    root, *_ = compiled
    argv = ["compile", root / "base", "--adapter", root / "multitask", "-o", root / "o", "--task", "text-generation"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--task-id K" in error_line(err), err


def test_prompt_with_swappable_is_refused_in_one_line(compiled, capsys):
    root, *_ = compiled
    argv = ["compile", root / "base", "--adapter", root / "prompt_tuning", "-o", root / "o", "--swappable"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "compile the prompt alone" in error_line(err), err


def test_task_id_outside_the_tasks_is_refused(compiled):
    root, model, *_ = compiled
    source = read_adapter(root / "multitask")
    with pytest.raises(InputError, match=r"--task-id 3: .* has num_tasks=3; give one in \[0, 3\)"):
        prompt_head.head(source, [source], model, True, 3)
