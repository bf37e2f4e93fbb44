"""Which quantized-weight formats peftc reads, and how a checkpoint's layers are grouped by format.

Every decoder has the same signature (:data:`Decoder`): the tensors of one layer keyed by their
suffix after the layer's prefix (``"weight"``, ``"weight.absmax"``, ``"SCB"``…), the checkpoint's
``quantization_config`` and the prefix (for error messages); it returns the fp32 weight
``[out_features, in_features]`` and raises :class:`~peftc.errors.InputError` naming the key on any
inconsistency. A format is one line of :data:`DECODERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from peftc.errors import UnsupportedError, one_of
from peftc.quant import awq, bnb, gptq

Decoder = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], str], torch.Tensor]

DECODERS: dict[str, Decoder] = {
    "bnb-nf4": bnb.dequantize_4bit,
    "bnb-fp4": bnb.dequantize_4bit,
    "bnb-int8": bnb.dequantize_int8,
    "gptq": gptq.dequantize,
    "awq-gemm": awq.dequantize,
}

MARKERS: dict[str, tuple[str, ...]] = {
    "bnb-nf4": ("weight.quant_state.bitsandbytes__nf4",),
    "bnb-fp4": ("weight.quant_state.bitsandbytes__fp4",),
    "bnb-int8": ("SCB",),
    "gptq": ("qweight",),
    "awq-gemm": ("qweight",),
}
"""The suffix whose presence marks a layer as stored in each format."""

METHODS: dict[str, str] = {
    "bnb-nf4": "bitsandbytes", "bnb-fp4": "bitsandbytes", "bnb-int8": "bitsandbytes", "gptq": "gptq", "awq-gemm": "awq",
}  # fmt: skip
"""The ``quant_method`` each format belongs to (formats that share a marker, such as GPTQ's and AWQ's
``qweight``, are told apart by it)."""

BNB_IGNORED = (
    "_load_in_4bit", "_load_in_8bit", "load_in_4bit", "load_in_8bit", "quant_method", "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype", "llm_int8_threshold", "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_quant_storage",
)  # fmt: skip
"""bitsandbytes options that either pick run-time kernels or are checked by the decoders."""


def check_config(config: Mapping[str, Any]) -> str:
    """The ``quant_method`` of a ``quantization_config``, refusing what peftc does not read.

    Raises:
        UnsupportedError: another ``quant_method``, or a bitsandbytes option that changes the stored numbers
            in a way peftc does not decode (naming it).
    """
    method = config.get("quant_method")
    if method not in CHECKS:
        raise UnsupportedError(f"quantization_config.quant_method = {method!r}: peftc reads {one_of(sorted(CHECKS))}")
    CHECKS[method](config)
    return method


def _check_bitsandbytes(config: Mapping[str, Any]) -> None:
    storage = config.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise UnsupportedError(f"quantization_config.bnb_4bit_quant_storage = {storage!r} (peftc reads uint8)")
    if config.get("llm_int8_has_fp16_weight"):
        raise UnsupportedError("quantization_config.llm_int8_has_fp16_weight = true (the weights are not int8)")
    unknown = sorted(set(config) - set(BNB_IGNORED))
    if unknown:
        raise UnsupportedError(f"quantization_config.{unknown[0]}: an option peftc does not read")


GPTQ_IGNORED = (
    "quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format", "format", *gptq.RUNTIME_ONLY,
    "tokenizer", "dataset", "damp_percent", "act_group_aware", "true_sequential", "meta", "model_seqlen",
    "block_name_to_quantize", "module_name_preceding_first_block", "batch_size", "pad_token_id",
    "cache_block_outputs", "modules_in_block_to_quantize", "static_groups", "damp_auto_increment", "quantizer",
    "lm_head", "pack_dtype",
)  # fmt: skip
"""GPTQ options the decoder checks, or that only steered calibration or pick run-time kernels (the layers
are found by their ``qweight``, whichever modules were quantized)."""
AWQ_IGNORED = (
    "quant_method", "bits", "group_size", "zero_point", "version", "format", "backend", "modules_to_not_convert",
    *(k for k in GPTQ_IGNORED if k not in ("checkpoint_format", "quantizer", "lm_head", "pack_dtype")),
)  # fmt: skip
"""AWQ options the decoder checks (``version`` / ``format`` GEMM only), that pick kernels (``backend``), or
that transformers' ``AwqConfig`` (a ``GPTQConfig`` subclass) writes from its parent without AWQ reading them
(``desc_act``, ``sym``, ``dataset``…: an AWQ GEMM layer's numbers are its ``qweight``/``qzeros``/``scales``)."""


def _check_known(method: str, known: tuple[str, ...]) -> Callable[[Mapping[str, Any]], None]:
    def check(config: Mapping[str, Any]) -> None:
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise UnsupportedError(f"quantization_config.{unknown[0]}: a {method} option peftc does not read")
        if method == "gptq" and config.get("pack_dtype", "int32") != "int32":
            raise UnsupportedError(f"quantization_config.pack_dtype = {config['pack_dtype']!r} (peftc reads int32)")
        for field in ("version", "format") if method == "awq" else ():
            if str(config.get(field, "gemm")).lower() != "gemm":
                raise UnsupportedError(
                    f"quantization_config.{field} = {config.get(field)!r}: peftc reads AWQ GEMM checkpoints only"
                )

    return check


CHECKS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "bitsandbytes": _check_bitsandbytes, "gptq": _check_known("gptq", GPTQ_IGNORED),
    "awq": _check_known("awq", AWQ_IGNORED),
}  # fmt: skip
"""``quant_method`` → the check of its ``quantization_config`` (raises on what peftc does not read)."""


def quantized_layers(
    state: Mapping[str, torch.Tensor], method: str | None = None
) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """``{prefix: (format, {suffix: tensor})}`` for every quantized layer of a checkpoint's tensors
    (only formats of ``quant_method`` ``method`` when given)."""
    layers: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    candidates = {f: m for f, m in MARKERS.items() if method is None or METHODS.get(f) == method}
    for name in state:
        for fmt, markers in candidates.items():
            for marker in markers:
                if name.endswith("." + marker):
                    layers[name[: -len(marker) - 1]] = (fmt, {})
    for name, tensor in state.items():
        prefix = _owner(name, layers)
        if prefix is not None:
            layers[prefix][1][name[len(prefix) + 1 :]] = tensor
    return layers


def _owner(name: str, layers: Mapping[str, Any]) -> str | None:
    prefix = name
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in layers:
            return prefix
    return None


def dequantize(fmt: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], key: str) -> torch.Tensor:
    """The fp32 weight of layer ``key`` stored in format ``fmt`` (see :data:`DECODERS`)."""
    if fmt not in DECODERS:
        raise UnsupportedError(f"{key}: quantized format {fmt!r}; peftc reads {one_of(sorted(DECODERS))}")
    return DECODERS[fmt](tensors, config, key)
