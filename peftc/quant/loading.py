"""Loading a Hugging Face directory whose ``config.json`` has a ``quantization_config``.

The model is built from its config in fp32 (nothing is quantized by transformers, bitsandbytes is not
imported), the checkpoint's plain tensors are loaded into it, and every quantized linear layer is
replaced by its packed form (``peftc/quant/modules.py``), after its tensors have been checked by
decoding them once (every inconsistency is an :class:`~peftc.errors.InputError` naming the key).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc import reading
from peftc.errors import InputError, UnsupportedError
from peftc.quant import bnb, formats, gptq, intpack
from peftc.quant.modules import Bnb4Linear, Bnb4NestedLinear, Int8Linear, NBitsLinear


def quantization_config(path: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of the model directory ``path`` (None when it has none)."""
    config = json.loads(reading.read_bytes(path / "config.json"))
    value = config.get("quantization_config") if isinstance(config, dict) else None
    if value is not None and not isinstance(value, dict):
        raise InputError(f"{path / 'config.json'}: quantization_config is not an object")
    return value


def load_quantized(path: Path, cls: Any, config: Any, quant: Mapping[str, Any]) -> nn.Module:
    """The model of class ``cls`` with the checkpoint's quantized layers in packed form.

    Raises:
        UnsupportedError: a ``quant_method`` or option peftc does not read, a quantized layer that is not
            an ``nn.Linear`` of the model.
        InputError: inconsistent packed tensors (naming the key), plain tensors that do not fit.
    """
    method = formats.check_config(quant)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(reading.read_safetensors(file)[0])
    module = cls._from_config(config, dtype=torch.float32)
    layers = formats.quantized_layers(state, method)
    for prefix, (fmt, tensors) in layers.items():
        target = module.get_submodule(prefix) if _has(module, prefix) else None
        if not isinstance(target, nn.Linear):
            raise UnsupportedError(f"{prefix}: quantized tensors for a {type(target).__name__}, peftc reads nn.Linear")
        if fmt in ("gptq", "awq-gemm"):
            _check_qweight(fmt, tensors, target, prefix, quant)
        formats.dequantize(fmt, tensors, quant, prefix)  # checks every tensor once
        replacement = _packed(fmt, tensors, target, prefix, quant)
        parent, _, child = prefix.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, replacement)
        for suffix in tensors:
            state.pop(f"{prefix}.{suffix}")
    missing, unexpected = module.load_state_dict(state, strict=False)
    own = {f"{p}.{n}" for p in layers for n, _ in module.get_submodule(p).named_buffers()}
    missing = [k for k in missing if k not in own and not _tied(module, k)]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise InputError(f"{path}: checkpoint key {first!r} is {'missing' if missing else 'unexpected'}")
    return module


def _packed(
    fmt: str, tensors: Mapping[str, torch.Tensor], linear: nn.Linear, prefix: str, quant: Mapping[str, Any]
) -> nn.Module:
    bias = tensors.get("bias")
    if (bias is None) != (linear.bias is None) or (bias is not None and bias.shape != linear.bias.shape):
        raise InputError(f"{prefix}.bias: {'missing' if bias is None else list(bias.shape)} for the model's layer")
    if fmt in ("gptq", "awq-gemm"):
        return _nbits(fmt, tensors, linear, prefix, quant, bias)
    if fmt == "bnb-int8":
        return Int8Linear(tensors["weight"], tensors["SCB"], bias)
    if fmt not in ("bnb-nf4", "bnb-fp4"):
        raise UnsupportedError(f"{prefix}: peftc decodes {fmt!r} layers but has no packed module for them yet")
    state = bnb.quant_state(tensors, prefix)
    rows, cols = state["shape"]
    if (rows, cols) != (linear.out_features, linear.in_features):
        raise InputError(
            f"{prefix}: quant_state shape {[rows, cols]}, the model's layer is {list(linear.weight.shape)}"
        )
    if not torch.equal(tensors["weight.quant_map"], bnb.code_table(state["quant_type"])):
        raise UnsupportedError(f"{prefix}.weight.quant_map: not bitsandbytes' {state['quant_type']} code table")
    if "weight.nested_absmax" in tensors:  # double quantization, kept as stored (decoded in the graph)
        nested = {"absmax_codes": tensors["weight.absmax"], "nested_absmax": tensors["weight.nested_absmax"],
                  "nested_code": tensors["weight.nested_quant_map"]}  # fmt: skip
        return Bnb4NestedLinear(
            tensors["weight"], nested, state["nested_blocksize"], float(state["nested_offset"]),
            tensors["weight.quant_map"], state["blocksize"], state["quant_type"], (rows, cols), bias,
        )  # fmt: skip
    return Bnb4Linear(
        tensors["weight"], tensors["weight.absmax"], tensors["weight.quant_map"], state["blocksize"],
        state["quant_type"], (rows, cols), bias,
    )  # fmt: skip


def _check_qweight(
    fmt: str, tensors: Mapping[str, torch.Tensor], linear: nn.Linear, prefix: str, quant: Mapping[str, Any]
) -> None:
    """``qweight`` must hold the model's layer: GPTQ ``[in·bits/32, out]``, AWQ ``[in, out/8]``."""
    qweight = tensors.get("qweight")
    bits = quant.get("bits", 4) if fmt == "gptq" else 4
    if not isinstance(bits, int) or bits not in gptq.BITS or qweight is None:
        return  # the decoder names what is wrong
    out, into = linear.out_features, linear.in_features
    want = [into * bits // 32, out] if fmt == "gptq" else [into, out // 8]
    if list(qweight.shape) != want:
        raise InputError(
            f"{prefix}.qweight: shape {list(qweight.shape)}, expected {want} for the model's {into} → {out} layer "
            f"({bits}-bit {'GPTQ' if fmt == 'gptq' else 'AWQ'})"
        )


def _nbits(
    fmt: str, tensors: Mapping[str, torch.Tensor], linear: nn.Linear, prefix: str, quant: Mapping[str, Any], bias
) -> NBitsLinear:
    """The packed GPTQ / AWQ layer (its tensors already checked by the decoder)."""
    shape = (linear.out_features, linear.in_features)
    dense = formats.dequantize(fmt, tensors, quant, prefix)
    if tuple(dense.shape) != shape:
        raise InputError(f"{prefix}.qweight: holds a {list(dense.shape)} weight, the model's layer is {list(shape)}")
    size = intpack.group_size(quant, prefix, shape[1])
    g_idx = tensors.get("g_idx")
    g_idx = torch.arange(shape[1]) // size if g_idx is None else g_idx.to(torch.int64)
    gptq_file = fmt == "gptq"
    bits, version = (int(quant["bits"]), gptq.checkpoint_version(quant, prefix)) if gptq_file else (4, 2)
    kept = {"qweight": tensors["qweight"], "qzeros": tensors["qzeros"], "scales": tensors["scales"], "g_idx": g_idx}
    return NBitsLinear("gptq" if gptq_file else "awq", bits, version, size, kept, shape, bias)


def _has(module: nn.Module, prefix: str) -> bool:
    try:
        module.get_submodule(prefix)
    except AttributeError:
        return False
    return True


def _tied(module: nn.Module, key: str) -> bool:
    keys = getattr(module, "_tied_weights_keys", None) or {}
    return key in keys
