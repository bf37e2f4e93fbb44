"""peftc's ComPEFT adapter (``peft_type`` ``PEFTC_COMPEFT``, ``shared/methods.md`` §8.5): a task vector
kept as ternary signs and one scale per tensor.

ComPEFT compresses ``τ = θ_fine-tuned − θ_base``: keep the ``density`` fraction of entries largest in
``|τ|``, replace each kept entry by ``α·σ(τ)·sign(τ)`` (σ: the standard deviation of ``τ``, as
``torch.std``), drop the rest. :func:`encode` does that; the file holds the result exactly.

**Format** (a directory like a PEFT adapter's):

* ``adapter_config.json``: ``{"peft_type": "PEFTC_COMPEFT", "format_version": 1, "density": k,
  "alpha": α, "base_model_name_or_path": …}`` (``density`` and ``alpha`` record how it was made; the
  scale read from the file is what counts);
* ``adapter_model.safetensors``, per changed base tensor ``K`` (a state-dict key,
  ``encoder.layer.0.attention.self.query.weight``):

  - ``K.signs``: either uint8 ``[ceil(numel/4)]``, 2-bit codes of the row-major flattened tensor, element
    ``j`` at bits ``2·(j % 4)`` of byte ``j // 4`` (0 → 0, 1 → +1, 2 → −1; 3 is invalid; padding codes
    0), or int8 shaped like the base tensor with values in {−1, 0, +1};
  - ``K.scale``: float32 ``[]`` (or ``[1]``), the ``c`` of ``{−c, 0, +c}``.

Each pair becomes a ``ternary_delta`` weight site ``W' = W + c·signs`` (fp32, cast back to ``W``'s
dtype): merged by the merge pass, or computed in the graph from the decoded signs with ``--no-merge``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

PEFT_TYPE = "PEFTC_COMPEFT"
FORMAT_VERSION = 1
TERNARY_DELTA = SiteOp(name="ternary_delta", form="weight", tensor_roles=("signs",), scalars=("scale",))
CODES = {0: 0, 1: 1, 2: -1}
"""2-bit code → sign."""


def unpack_ternary(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The signs (int64 in {−1, 0, 1}) of the first ``count`` 2-bit codes of uint8 ``packed``; a code 3 is -2."""
    codes = (packed.to(torch.int64).unsqueeze(-1) >> torch.tensor([0, 2, 4, 6])) & 3
    codes = codes.flatten()[:count]
    return torch.where(codes == 2, -1, torch.where(codes == 3, -2, codes))


def pack_ternary(signs: torch.Tensor) -> torch.Tensor:
    """uint8 ``[ceil(numel/4)]`` 2-bit codes of ``signs`` in {−1, 0, 1} (row-major), low bits first."""
    codes = torch.where(signs.flatten() < 0, 2, signs.flatten().clamp(min=0)).to(torch.int64)
    codes = torch.nn.functional.pad(codes, (0, (-codes.numel()) % 4)).reshape(-1, 4)
    return (codes << torch.tensor([0, 2, 4, 6])).sum(-1).to(torch.uint8)


@composite_op("ternary_delta(Tensor weight, Tensor signs, float scale) -> Tensor")
def ternary_delta(weight: torch.Tensor, signs: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + c·signs`` (fp32, cast back to ``W``'s dtype)."""
    return (weight.to(torch.float32) + signs.to(torch.float32) * scale).to(weight.dtype)


def encode(delta: torch.Tensor, density: float, alpha: float) -> tuple[torch.Tensor, float]:
    """ComPEFT of one task vector: ``(signs, c)`` with the top ``ceil(density·numel)`` entries of ``|ΔW|``
    kept as ``sign(ΔW)`` and ``c = α·std(ΔW)``."""
    flat = delta.flatten().to(torch.float32)
    keep = max(1, math.ceil(density * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    signs = torch.where(mask, torch.sign(flat), 0).to(torch.int8).reshape(delta.shape)
    return signs, float(alpha * flat.std())


def save(path: Path, deltas: dict[str, torch.Tensor], density: float, alpha: float, packed: bool = True) -> Path:
    """Write the ComPEFT adapter of ``deltas`` (state-dict key → ΔW) at ``path``; ``packed``: 2-bit signs,
    else int8."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, delta in deltas.items():
        signs, scale = encode(delta, density, alpha)
        tensors[f"{key}.signs"] = pack_ternary(signs) if packed else signs
        tensors[f"{key}.scale"] = torch.tensor(scale, dtype=torch.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, "density": density, "alpha": alpha}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


FIELDS = common.Fields(
    honoured=("format_version",),
    ignored={
        "density": "records the fraction of entries kept; the signs are read from the file",
        "alpha": "records how the scale was chosen; the scale is read from the file",
    },
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Decode a ComPEFT adapter against the base model's tensors.

    Raises:
        InputError: a key that names no base tensor, a ``.signs`` without ``.scale`` (or the reverse),
            signs of the wrong length, dtype or value, a scale that is not one finite number.
        UnsupportedError: a format version peftc does not know.
    """
    honoured, ignored = common.classify_fields(source, PEFT_TYPE, FIELDS)
    if source.config.get("format_version") != FORMAT_VERSION:
        raise UnsupportedError(
            f"{source.config_path}: {PEFT_TYPE} format_version {source.config.get('format_version')!r}; peftc reads 1"
        )
    owners = {fqn: (path, local) for path, module in modules.items() for local, fqn in module.params.items()}
    sites = []
    for key in sorted(source.tensors):
        if not key.endswith((".signs", ".scale")):
            raise InputError(f"{source.describe(key)}: a {PEFT_TYPE} key ends in .signs or .scale")
        name, _, role = key.rpartition(".")
        other = f"{name}.{'scale' if role == 'signs' else 'signs'}"
        if other not in source.tensors:
            raise InputError(f"{source.describe(key)}: no {other!r} beside it")
        if name not in owners or name not in modules.tensors:
            raise InputError(f"{source.describe(key)}: the base has no tensor {name!r}{common.nearest(name, owners)}")
        if role == "scale":
            continue
        base = modules.tensors[name]
        if not base.is_floating_point():
            raise UnsupportedError(f"{source.describe(key)}: the base tensor {name!r} is not floating point")
        signs = _signs(source, key, tuple(base.shape))
        scale = _scale(source, other)
        path, local = owners[name]
        info = {
            "module_type": modules[path].class_name,
            "nonzero": int(signs.count_nonzero()),
            "weight": list(base.shape),
        }
        tensor = AdapterTensor(key, signs.to(torch.float32))
        sites.append(Site(path, TERNARY_DELTA.name, {"signs": tensor}, {"scale": scale}, info, local))
    return Adapter(source.name, "compeft", source, tuple(sites), honoured=honoured, ignored=ignored)


def _signs(source: AdapterSource, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    value = source.tensors[key]
    numel = math.prod(shape)
    if value.dtype == torch.uint8:
        if tuple(value.shape) != (math.ceil(numel / 4),):
            raise InputError(
                f"{source.describe(key)}: shape {list(value.shape)}; 2-bit signs of the base tensor {list(shape)} "
                f"take [{math.ceil(numel / 4)}] bytes"
            )
        signs = unpack_ternary(value, numel).reshape(shape)
    elif value.dtype == torch.int8:
        if tuple(value.shape) != shape:
            raise InputError(f"{source.describe(key)}: shape {list(value.shape)}, but the base tensor is {list(shape)}")
        signs = value.to(torch.int64)
    else:
        raise InputError(
            f"{source.describe(key)}: dtype {str(value.dtype).removeprefix('torch.')}; signs are uint8 or int8"
        )
    if bool((signs.abs() > 1).any()):
        raise InputError(f"{source.describe(key)}: a sign other than -1, 0, +1 (2-bit code 3, or an int8 value)")
    return signs


def _scale(source: AdapterSource, key: str) -> float:
    value = source.tensors[key]
    if not value.is_floating_point() or value.numel() != 1 or value.dim() > 1:
        raise InputError(f"{source.describe(key)}: shape {list(value.shape)}; the scale is one floating-point number")
    return float(value.reshape(()))


METHOD = Method("compeft", (PEFT_TYPE,), parse, ops=(TERNARY_DELTA,), fields=FIELDS)
