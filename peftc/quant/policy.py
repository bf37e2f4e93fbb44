"""The merge policy of a LoRA adapter on a quantized base (QLoRA), chosen per adapted site.

For a site with dequantized base ``W`` (fp32) and LoRA update ``ΔW = s·B·A``, the unmerged QLoRA model
computes ``x (W + ΔW)ᵀ`` exactly (up to fp32 rounding). The policies:

* ``float`` — merge in fp32 and keep ``W + ΔW`` as a float weight: exact, 4 bytes a weight (fp32 artifact);
* ``requant`` — merge, then quantize ``W + ΔW`` back to the base's format (same blocksize and code
  table for NF4/FP4, fresh row scales for int8): the base's size, one GEMM, and an error;
* ``two-path`` — keep the quantized base GEMM and the LoRA branch unmerged: exact, the base's bytes plus
  the factors', and a thin extra GEMM per call;
* ``two-path-fp16`` — ``two-path`` with the factors stored in fp16 (half their bytes; computed in fp32 as
  before): the error is the fp16 rounding of ``A`` and ``B``, ``‖s·(B̂Â − BA)‖_F / ‖W + ΔW‖_F``;
* ``requant-int8`` (NF4/FP4 bases) — merge, then quantize ``W + ΔW`` to 8-bit blocks of :data:`INT8_BLOCK`
  along K with a scale and zero point each, ONNX ``MatMulNBits`` at accuracy level 4 (the activations
  rounded to int8 per block, integer products): onnxruntime's fast CPU kernel, where ``MatMulBnb4`` decodes
  NF4 on every call; about 1.16 bytes a weight against NF4's 0.56. Its error is measured on the site's
  output for isotropic inputs with both roundings (``matmulnbits.output_error``).

GPTQ and AWQ bases (:class:`~peftc.quant.modules.NBitsLinear`) have no ``requant``: their grids come from
calibration (GPTQ's error feedback, AWQ's activation scales) that peftc cannot redo without data, so
``--merge-policy requant`` is refused on them and ``auto`` keeps the LoRA branch unmerged (two-path).

The error a policy adds is measured per site as ``‖W' − (W + ΔW)‖_F / ‖W + ΔW‖_F``: the relative RMS
error of the site's output for isotropic inputs, against the unmerged QLoRA site. ``auto`` takes, per
site, the first of requant, two-path-fp16, two-path (smallest artifact first) whose error is within
``max_error``; ``auto-speed`` takes the first of requant-int8, requant, two-path-fp16, two-path (fastest
first).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc import reading
from peftc.errors import InputError, UnsupportedError
from peftc.methods.lora.ops import delta_weight, lora_scale
from peftc.quant import bnb, matmulnbits
from peftc.quant.modules import BlocksLinear, Bnb4Linear, Int8Linear, NBitsLinear, TwoPathLinear

POLICIES = ("auto", "auto-speed", "float", "requant", "requant-int8", "two-path", "two-path-fp16")
AUTO_ORDER = {
    "auto": ("requant", "two-path-fp16", "two-path"),
    "auto-speed": ("requant-int8", "requant", "two-path-fp16", "two-path"),
}
"""Each automatic policy's candidates, in order: the first within the budget is taken (smallest artifact
first; ``auto-speed``: fastest first)."""
INT8_BLOCK = 32
"""``requant-int8``'s block along K (``benchmarks/qlora_kernels.py``: the least error of 32/64/128)."""
_EXCEEDS = {"requant": "requant exceeds it", "requant-int8": "requant-int8 exceeds it",
            "two-path-fp16": "fp16 factors exceed it"}  # fmt: skip
_ABSENT = {"requant": "no requant for GPTQ/AWQ bases", "requant-int8": "requant-int8 requantizes NF4/FP4 bases only"}
DEFAULT_MAX_ERROR = 1e-2
HONOURED = ("r", "lora_alpha", "target_modules", "use_rslora", "peft_type", "rank_pattern", "alpha_pattern")


@dataclasses.dataclass(frozen=True)
class SiteChoice:
    """What one adapted site became."""

    module: str
    policy: str
    error: float
    """Relative error the policy adds at this site (see the module docstring)."""
    bytes: int
    """Bytes the site's weights take in the artifact (bias excluded)."""
    reason: str

    def row(self) -> dict[str, Any]:
        """JSON-ready record (the manifest's per-site table)."""
        return dataclasses.asdict(self)


def read_lora(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter directory: its config and ``{module: (A, B)}`` tensors by module path."""
    config = json.loads(reading.read_bytes(path / "adapter_config.json"))
    if config.get("peft_type") != "LORA":
        raise UnsupportedError(f"{path}: peft_type {config.get('peft_type')!r}; the QLoRA policies read LORA")
    for option in ("use_dora", "lora_bias", "fan_in_fan_out"):
        if config.get(option):
            raise UnsupportedError(f"{path}/adapter_config.json: {option} = true with a quantized base")
    tensors = reading.read_safetensors(path / "adapter_model.safetensors")[0]
    return config, tensors


def _factors(config: dict[str, Any], tensors: dict[str, torch.Tensor], module: str):
    a = tensors.get(f"base_model.model.{module}.lora_A.weight")
    b = tensors.get(f"base_model.model.{module}.lora_B.weight")
    if a is None or b is None:
        return None
    short = module.rpartition(".")[2]
    rank = (config.get("rank_pattern") or {}).get(short, config["r"])
    alpha = (config.get("alpha_pattern") or {}).get(short, config["lora_alpha"])
    return a.to(torch.float32), b.to(torch.float32), lora_scale(rank, alpha, bool(config.get("use_rslora")))


def candidates(
    base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, int8: bool = True
) -> dict[str, tuple[nn.Module, float]]:
    """``{policy: (module, error added)}`` for one quantized site (``requant-int8`` only with ``int8``: its
    blocks and output error cost about a second on a 100M model, wasted where the policy cannot take it)."""
    dense = base.dequantized()
    merged = dense + delta_weight(a, b, scale, "linear")
    requant: nn.Module | None = None
    if isinstance(base, Bnb4Linear):
        packed, absmax = bnb.quantize_4bit(merged, base.quant_type, base.blocksize)
        requant = Bnb4Linear(packed, absmax, base.code, base.blocksize, base.quant_type, tuple(merged.shape), base.bias)
    elif isinstance(base, Int8Linear):
        scb = merged.abs().amax(dim=1).clamp(min=1e-12)
        codes = torch.round(merged * (127.0 / scb).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        requant = Int8Linear(codes, scb, base.bias)
    float_linear = nn.Linear(merged.shape[1], merged.shape[0], bias=base.bias is not None)
    float_linear.weight = nn.Parameter(merged, requires_grad=False)
    if base.bias is not None:
        float_linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    norm = float(torch.linalg.norm(merged)) or 1.0
    found = {"two-path": (TwoPathLinear(base, a, b, scale), 0.0), "float": (float_linear, 0.0)}
    a16, b16 = a.to(torch.float16), b.to(torch.float16)
    rounded = delta_weight(a16.float(), b16.float(), scale, "linear") - (merged - dense)
    found["two-path-fp16"] = (TwoPathLinear(base, a16, b16, scale), float(torch.linalg.norm(rounded)) / norm)
    if requant is not None:
        found["requant"] = (requant, float(torch.linalg.norm(requant.dequantized() - merged)) / norm)
    if int8 and isinstance(base, Bnb4Linear):
        blocks = matmulnbits.quantize(merged, 8, INT8_BLOCK)
        level = matmulnbits.INT8_ACTIVATIONS
        found["requant-int8"] = (
            BlocksLinear(blocks, level, base.bias),
            matmulnbits.output_error(blocks, merged, level),
        )
    return found


def apply(model: nn.Module, adapter: Path, policy: str = "auto", max_error: float | None = None) -> list[SiteChoice]:
    """Put the LoRA adapter at ``adapter`` into the quantized ``model`` (in place), site by site.

    Raises:
        InputError: an unknown policy, adapter tensors for a module the model lacks.
        UnsupportedError: an adapted module that is not a quantized or float linear layer.
    """
    if policy not in POLICIES:
        raise InputError(f"--merge-policy {policy!r}: use one of {', '.join(POLICIES)}")
    config, tensors = read_lora(Path(adapter))
    modules = sorted({k.removeprefix("base_model.model.").rpartition(".lora_")[0] for k in tensors if ".lora_" in k})
    choices = []
    for name in modules:
        try:
            base = model.get_submodule(name)
        except AttributeError as e:
            raise InputError(f"{adapter}: adapter tensors for {name!r}, which the model does not have") from e
        factors = _factors(config, tensors, name)
        if factors is None:
            raise UnsupportedError(f"{adapter}: {name!r} has LoRA tensors other than lora_A/lora_B")
        choice, module = choose(name, base, *factors, policy, max_error)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
        choices.append(choice)
    return choices


def choose(
    name: str, base: nn.Module, a, b, scale, policy: str, max_error: float | None
) -> tuple[SiteChoice, nn.Module]:
    """What the site ``name`` (quantized layer ``base``, LoRA factors ``a``, ``b``, ``scale``) becomes under
    ``policy`` (``auto``, ``auto-speed``: the first of its :data:`AUTO_ORDER` whose added error is within
    ``max_error``, default :data:`DEFAULT_MAX_ERROR`).

    Raises:
        UnsupportedError: ``requant`` on a GPTQ/AWQ base, ``requant-int8`` on a base that is not NF4/FP4, a
            policy adding more than a given ``max_error``, or a layer that is not a (quantized) linear.
    """
    budget = DEFAULT_MAX_ERROR if max_error is None else max_error
    if isinstance(base, nn.Linear):  # a float layer of a partly quantized model: an ordinary merge
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        merged.load_state_dict(base.state_dict())
        merged.weight.data += delta_weight(a, b, scale, "linear")
        return SiteChoice(name, "float", 0.0, merged.weight.numel() * 4, "the base layer is not quantized"), merged
    if not isinstance(base, (Bnb4Linear, Int8Linear, NBitsLinear)):
        raise UnsupportedError(f"{name}: LoRA on a {type(base).__name__}; the QLoRA policies read quantized linears")
    options = candidates(base, a, b, scale, int8=policy in ("requant-int8", "auto-speed"))
    if policy == "requant" and "requant" not in options:
        raise UnsupportedError(
            f"{name}: --merge-policy requant on a {base.fmt.upper()} base; its grid came from calibration peftc "
            "cannot redo, use two-path (exact, the base stays packed) or float"
        )
    if policy == "requant-int8" and policy not in options:
        raise UnsupportedError(
            f"{name}: --merge-policy requant-int8 on a base in {_format(base)}; it requantizes NF4/FP4 layers "
            "(whose MatMulBnb4 decodes every call), use requant, two-path or float"
        )
    if policy not in AUTO_ORDER:
        module, error = options[policy]
        if max_error is not None and error > max_error:
            raise UnsupportedError(
                f"{name}: --merge-policy {policy} adds error {error:.3g} > --max-error {max_error:g}; use auto "
                "(two-path where requantizing exceeds the budget), two-path or float"
            )
        return SiteChoice(name, policy, error, _bytes(module), "--merge-policy"), module
    order = AUTO_ORDER[policy]
    for candidate in (c for c in order if c in options):
        module, error = options[candidate]
        if error <= budget:
            earlier = order[: order.index(candidate)]
            skipped = [_EXCEEDS[c] if c in options else _ABSENT[c] for c in earlier]
            why = "; ".join([f"error {error:.2g} <= {budget:g}", *skipped])
            return SiteChoice(name, candidate, error, _bytes(module), why), module
    raise AssertionError("two-path adds no error")  # pragma: no cover


def _format(base: nn.Module) -> str:
    return "int8" if isinstance(base, Int8Linear) else getattr(base, "fmt", type(base).__name__).upper()


def _bytes(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    return module.stored_bytes()
