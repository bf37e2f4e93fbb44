"""Several adapters in one compile: applied in the given order, as if each were merged before the
next; multiplicative methods compose (so order matters); the order is recorded in the manifest."""

from __future__ import annotations

import models
import pytest
from conftest import assert_outputs_close

import peftc
from peftc.errors import UnsupportedError


def _adapters(tmp_path, model):
    from peft import IA3Config, LoraConfig

    lora = models.make_adapter(model, tmp_path / "lora", LoraConfig(target_modules=["query", "value", "dense"]))
    dora = models.make_adapter(
        model, tmp_path / "dora", LoraConfig(target_modules=["key", "dense"], use_dora=True), seed=2
    )
    ia3 = models.make_adapter(
        model,
        tmp_path / "ia3",
        IA3Config(target_modules=["value", "dense"], feedforward_modules=["value"]),
        seed=3,
        noise=0.6,
    )
    return lora, dora, ia3


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_three_methods_stack_in_order_like_sequential_peft_merges(tmp_path, merge):
    model = models.tiny_bert()
    stack = list(_adapters(tmp_path, model))
    artifact = peftc.compile(model, stack, out=tmp_path / "out", merge=merge)
    manifest = artifact.manifest
    assert [a["name"] for a in manifest.adapters] == ["lora", "dora", "ia3"]
    assert manifest.options["stack"] == ["lora", "dora", "ia3"]
    insert = next(p for p in manifest.pipeline if p["name"] == "insert-sites")
    composed = {d["site"]: d["message"] for d in insert["diagnostics"] if d["kind"] == "info"}
    assert composed["encoder.layer.0.output.dense"] == "composed in order: lora → dora → ia3"
    assert composed["encoder.layer.1.attention.self.value"] == "composed in order: lora → ia3"
    assert insert["stats"]["stacked"] == 2 * 4 + 1  # value and three dense per layer, and the pooler's dense
    for shape in [(2, 12), (1, 5)]:
        inputs = models.text_inputs(*shape)
        assert_outputs_close(peftc.load(artifact.path)(**inputs), models.peft_outputs(model, stack, inputs))


def test_order_matters_for_multiplicative_methods(tmp_path):
    model = models.tiny_bert()
    _, dora, ia3 = _adapters(tmp_path, model)
    inputs = models.text_inputs(2, 9)
    outputs = {}
    for order in ([dora, ia3], [ia3, dora]):
        artifact = peftc.compile(model, order, out=tmp_path / "-".join(p.name for p in order))
        outputs[order[0].name] = peftc.load(artifact.path)(**inputs)["last_hidden_state"]
        assert_outputs_close(
            {"y": outputs[order[0].name]}, {"y": models.peft_outputs(model, order, inputs)["last_hidden_state"]}
        )
    difference = (outputs["dora"] - outputs["ia3"]).abs().max() / outputs["dora"].abs().max()
    # DoRA first: (IA)³ then scales the normalised rows. (IA)³ first: DoRA's row norm undoes most of it.
    assert difference > 1e-2


def test_a_later_full_replacement_overwrites_earlier_sites(tmp_path):
    from peft import LoraConfig

    model = models.tiny_bert(head=True)
    lora = models.make_adapter(model, tmp_path / "lora", LoraConfig(target_modules=["query", "classifier"]))
    head = models.make_adapter(
        model, tmp_path / "head", LoraConfig(target_modules=["value"], modules_to_save=["classifier"]), seed=4
    )
    artifact = peftc.compile(model, [lora, head], out=tmp_path / "out")
    insert = next(p for p in artifact.manifest.pipeline if p["name"] == "insert-sites")
    assert insert["stats"]["overwritten"] == 1  # lora's update of the classifier's weight
    assert "overwritten by head's full tensor" in next(
        d["message"] for d in insert["diagnostics"] if d["kind"] == "skipped"
    )
    inputs = models.text_inputs(2, 7)
    assert_outputs_close(peftc.load(artifact.path)(**inputs), models.peft_outputs(model, [lora, head], inputs))


def test_a_residual_base_adapter_must_come_first(tmp_path, bert_adapter):
    import copy

    from peft import LoraConfig, get_peft_model

    model = models.tiny_bert()
    pissa = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=["query"], init_lora_weights="pissa"))
    pissa.save_pretrained(str(tmp_path / "pissa"))
    with pytest.raises(
        UnsupportedError, match="residual base of 'encoder.layer.0.attention.self.query'.*put 'pissa' first"
    ):
        peftc.compile(model, [bert_adapter, tmp_path / "pissa"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stacked_weight_sites_keep_a_module_input_read_from_the_program_input(tmp_path):
    """Two adapters on a layer that reads the program's input directly: the second weight site
    rewires only the weight, not the input (a user input holds no stored tensor, unlike a tied name)."""
    import torch
    from conftest import adapt, eager, export

    from peftc.loaders.inputs import parse_inputs

    model = models.mlp()
    first = models.make_lora(model, tmp_path / "first", target_modules=["lin0"])
    second = models.make_lora(model, tmp_path / "second", target_modules=["lin0"], seed=3)
    signature = parse_inputs(list(models.MLP_INPUTS))
    stacked = adapt(export(model, signature), first, second)
    inputs = signature.example({"batch": 3}, seed=0)
    expected = models.peft_outputs(model, [first, second], inputs)
    assert_outputs_close({k: torch.as_tensor(v) for k, v in eager(stacked, inputs).items()}, expected)
