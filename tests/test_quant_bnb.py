"""Reading bitsandbytes checkpoints: peftc's own decoders, bit for bit against bitsandbytes."""

from __future__ import annotations

import json

import bnb_checkpoints
import pytest
import torch

from peftc.errors import InputError, UnsupportedError
from peftc.loaders.models import load_model
from peftc.quant import bnb, formats

bitsandbytes = pytest.importorskip("bitsandbytes")
F = bitsandbytes.functional


@pytest.fixture(scope="module")
def checkpoints():
    return bnb_checkpoints.root()


def layers(directory):
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    return config, formats.quantized_layers(load_file(directory / "model.safetensors"))


def library_dequant(fmt: str, tensors: dict) -> torch.Tensor:
    """bitsandbytes' own dequantization of one layer (the expected value)."""
    if fmt == "bnb-int8":
        return F.int8_vectorwise_dequant(tensors["weight"], tensors["SCB"])
    state = F.QuantState.from_dict({k: v for k, v in tensors.items() if k != "weight"}, torch.device("cpu"))
    return F.dequantize_4bit(tensors["weight"], state)


@pytest.mark.parametrize("name", list(bnb_checkpoints.FORMATS))
def test_dequantize_is_bitsandbytes_bit_for_bit(checkpoints, name):
    config, found = layers(checkpoints / name)
    assert formats.check_config(config) == "bitsandbytes"
    assert len(found) == 7  # q k v o gate up down; lm_head stays float
    for prefix, (fmt, tensors) in found.items():
        assert fmt == {"int8": "bnb-int8", "fp4": "bnb-fp4"}.get(name, "bnb-nf4")
        ours = formats.dequantize(fmt, tensors, config, prefix)
        assert ours.dtype == torch.float32 and torch.equal(ours, library_dequant(fmt, tensors)), prefix


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_is_bitsandbytes_bit_for_bit(quant_type):
    weight = torch.randn(48, 64)
    packed, absmax = bnb.quantize_4bit(weight, quant_type, 64)
    expected, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, expected) and torch.equal(absmax, state.absmax)


def test_ir_keeps_the_packed_weight(checkpoints):
    model = load_model(checkpoints / "nf4-dq", task="none")
    program = torch.export.export(model.module, (), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    sites = [n for n in program.graph.nodes if n.target is torch.ops.peftc.bnb4dq_linear.default]
    assert len(sites) == 7
    for suffix in (".packed", ".absmax_codes"):  # double quantization kept: 8-bit absmax codes
        packed = [v for k, v in program.state_dict.items() if k.endswith(suffix)]
        assert len(packed) == 7 and all(t.dtype == torch.uint8 for t in packed)
    assert not any(k.endswith("q_proj.weight") for k in program.state_dict)


def test_wrong_nibble_order_is_caught(checkpoints, monkeypatch):
    """A mutation: low nibble first. The bit-exact comparison with bitsandbytes must fail."""
    config, found = layers(checkpoints / "nf4")
    prefix, (fmt, tensors) = next(iter(found.items()))
    expected = library_dequant(fmt, tensors)
    swapped = lambda p: torch.stack([p.flatten().long() & 0xF, p.flatten().long() >> 4], dim=1).flatten()  # noqa: E731
    monkeypatch.setattr(bnb, "unpack_nibbles", swapped)
    assert not torch.equal(formats.dequantize(fmt, tensors, config, prefix), expected)


def _state(tensors: dict, **changes) -> dict:
    name = next(k for k in tensors if "quant_state" in k)
    state = json.loads(bytes(tensors[name].tolist()).decode())
    state.update(changes)
    text = json.dumps(state).encode()
    return {**tensors, name: torch.tensor(list(text), dtype=torch.uint8)}


BAD = {
    "shape": (lambda t: _state(t, shape=[64, 32]), "packed bytes"),
    "blocksize": (lambda t: _state(t, blocksize=48), "blocksize 48"),
    "quant_type": (lambda t: _state(t, quant_type="nf5"), "unknown quant_type 'nf5'"),
    "packed": (lambda t: {**t, "weight": t["weight"][:-1]}, "packed bytes"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_packed_tensors_name_the_key(checkpoints, case):
    config, found = layers(checkpoints / "nf4-dq")
    prefix = "model.layers.0.self_attn.q_proj"
    fmt, tensors = found[prefix]
    edit, words = BAD[case]
    with pytest.raises(InputError) as error:
        formats.dequantize(fmt, edit(tensors), config, prefix)
    message = str(error.value)
    assert prefix in message and words in message and "\n" not in message


@pytest.mark.parametrize(
    "change, named",
    [({"bnb_4bit_quant_storage": "bfloat16"}, "bnb_4bit_quant_storage"), ({"quant_method": "hqq"}, "hqq"),
     ({"bnb_4bit_new_option": 1}, "bnb_4bit_new_option")],
)  # fmt: skip
def test_unsupported_options_are_named(checkpoints, change, named):
    config, _ = layers(checkpoints / "nf4")
    with pytest.raises(UnsupportedError, match=named):
        formats.check_config({**config, **change})


def test_loading_refuses_a_bad_checkpoint_naming_the_key(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoints / "int8", tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.SCB"] = tensors["model.layers.0.mlp.up_proj.SCB"][:3]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(InputError, match=r"model\.layers\.0\.mlp\.up_proj\.SCB: 3 row scales"):
        load_model(tmp_path / "m")
