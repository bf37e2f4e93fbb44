"""peftc.ir: the editor, module table, canonical text, fingerprints and safe .pt2 loading."""

from __future__ import annotations

import json
import zipfile

import models
import pytest
import torch
from conftest import export

from peftc import ir
from peftc.errors import InputError


def test_editor_adds_parameter_without_touching_source(bert_program):
    before = ir.fingerprint(bert_program)
    editor = ir.ProgramEditor(bert_program)
    node = editor.add_parameter("extra.lora_A.default", torch.ones(2, 3), adapter="default", source="f:k")
    program = editor.finish()
    assert ir.fingerprint(bert_program) == before
    kinds = [s.kind.name for s in program.graph_signature.input_specs]
    assert kinds.index("USER_INPUT") > max(i for i, k in enumerate(kinds) if k == "PARAMETER")
    assert tuple(program.state_dict["extra.lora_A.default"].shape) == (2, 3)
    assert node.meta["val"].shape == (2, 3) and node.meta["peftc"] == {"adapter": "default", "source": "f:k"}
    ir.validate(program)


def test_editor_set_tensor_replaces_value_not_storage(bert_program):
    key = "encoder.layer.0.attention.self.query.weight"
    old = bert_program.state_dict[key]
    editor = ir.ProgramEditor(bert_program)
    editor.set_tensor(key, old * 2)
    program = editor.finish()
    assert torch.equal(program.state_dict[key], old * 2)
    assert torch.equal(bert_program.state_dict[key], old)


def test_fingerprint_sees_in_place_writes(bert_program):
    editor = ir.ProgramEditor(bert_program)
    key = "pooler.dense.bias"
    editor.set_tensor(key, bert_program.state_dict[key].clone())
    program = editor.finish()
    before = ir.fingerprint(program)
    with torch.no_grad():
        program.state_dict[key].add_(1.0)
    assert ir.fingerprint(program) != before


def test_module_table_linear_call_is_one_node(bert_program):
    table = ir.module_table(bert_program)
    query = table["encoder.layer.0.attention.self.query"]
    assert query.class_name == "Linear"
    assert query.params == {
        "weight": "encoder.layer.0.attention.self.query.weight",
        "bias": "encoder.layer.0.attention.self.query.bias",
    }
    (call,) = query.calls
    assert [n.target for n in call.nodes] == [torch.ops.aten.linear.default]
    assert len(call.inputs) == 1 and len(call.outputs) == 1


def test_module_table_gpt2_conv1d_call_is_a_region(gpt2_program):
    (call,) = ir.module_table(gpt2_program)["h.0.attn.c_attn"].calls
    targets = [ir.target_name(n) for n in call.nodes]
    assert "aten.addmm" in targets and len(targets) >= 3
    assert len(call.inputs) == 1 and len(call.outputs) == 1


def test_output_names_follow_the_output_pytree(bert_program):
    assert ir.output_names(bert_program) == ["last_hidden_state", "pooler_output"]


def test_canonical_text_ignores_node_names_but_not_structure():
    a, b = export(models.tiny_bert()), export(models.tiny_bert(seed=3))
    assert ir.text(a) == ir.text(b)  # same architecture, different weights
    assert ir.text(a) != ir.text(export(models.tiny_gpt2()))
    assert ir.op_counts(a)["aten.linear"] == 2 * 6 + 1


def test_pt2_round_trip(tmp_path, bert_program):
    path = tmp_path / "bert.pt2"
    ir.save_program(bert_program, path)
    loaded = ir.load_program(path)
    assert ir.text(loaded) == ir.text(bert_program)
    assert ir.module_table(loaded).keys() == ir.module_table(bert_program).keys()


def test_pt2_with_pickled_tensor_is_refused(tmp_path, bert_program):
    good = tmp_path / "good.pt2"
    ir.save_program(bert_program, good)
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with pytest.raises(InputError, match="stored pickled.*--allow-pickle"):
        ir.load_program(bad)


def test_not_a_pt2_file_is_refused(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(InputError, match="not a torch.export .pt2 archive"):
        ir.load_program(path)
