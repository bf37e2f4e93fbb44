"""peftc's 1-bit low-rank adapter (``peft_type`` ``PEFTC_ONEBIT``, ``shared/methods.md`` §8.4): both
factors of a LoRA-style update stored as sign bits with one scale per row.

1-bit adapters keep ``α·sign(W)`` for each adapter matrix. Here each row of ``A`` (one per rank
component) and each row of ``B`` (one per output channel) has its own ``α``; :func:`encode` picks
``α = mean|w|`` over the row, the scale that minimises ``‖w − α·sign(w)‖₂``. The file holds the result
exactly.

**Format** (a directory like a PEFT adapter's):

* ``adapter_config.json``: ``{"peft_type": "PEFTC_ONEBIT", "format_version": 1, "scaling": s,
  "base_model_name_or_path": …}`` (``scaling`` defaults to 1);
* ``adapter_model.safetensors``, per adapted ``nn.Linear`` at module path ``M`` (``d_out × d_in``, rank r):

  - ``M.onebit_A.signs`` uint8 ``[r, ceil(d_in/8)]`` and ``M.onebit_B.signs`` uint8 ``[d_out, ceil(r/8)]``:
    bit ``j % 8`` (low bit first) of byte ``j // 8`` of a row is 1 for ``+1`` and 0 for ``−1``
    (padding bits 0);
  - ``M.onebit_A.scales`` float32 ``[r]``, ``M.onebit_B.scales`` float32 ``[d_out]``.

``A = diag(a)·S_A``, ``B = diag(b)·S_B``, ``ΔW = s·B·A``: decoded at load and lowered as LoRA is
(``lora_linear``; merged into ``W`` or kept as the two thin matmuls with ``--no-merge``).
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
from peftc.methods.lora.ops import LORA_LINEAR
from peftc.methods.record import Method

PEFT_TYPE = "PEFTC_ONEBIT"
FORMAT_VERSION = 1
ROLES = ("onebit_A.signs", "onebit_A.scales", "onebit_B.signs", "onebit_B.scales")


def unpack_signs(packed: torch.Tensor, count: int) -> torch.Tensor:
    """±1 (float32) of the first ``count`` bits of each row of uint8 ``packed [rows, bytes]``, low bit first."""
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :count].to(torch.float32) * 2 - 1


def pack_signs(matrix: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, ceil(cols/8)]``: bit set where ``matrix >= 0``, low bit first."""
    bits = (matrix >= 0).to(torch.int64)
    bits = torch.nn.functional.pad(bits, (0, (-bits.shape[1]) % 8)).reshape(bits.shape[0], -1, 8)
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)


def encode(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-bit ``matrix``: packed signs and per-row scales ``mean|row|``."""
    return pack_signs(matrix), matrix.abs().mean(1).to(torch.float32)


def save(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float = 1.0) -> Path:
    """Write the 1-bit adapter of ``factors`` (module path → (A ``[r, d_in]``, B ``[d_out, r]``)) at ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        for name, matrix in (("onebit_A", a), ("onebit_B", b)):
            signs, scales = encode(matrix)
            tensors[f"{module}.{name}.signs"], tensors[f"{module}.{name}.scales"] = signs, scales
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": PEFT_TYPE, "format_version": FORMAT_VERSION, "scaling": scaling}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


FIELDS = common.Fields(honoured=("format_version", "scaling"), ignored={}, defaults={"scaling": 1.0})


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Decode a 1-bit adapter into LoRA call sites on the base model's linear modules.

    Raises:
        InputError: a key of another role, a module the base lacks or that misses one of the four
            tensors, a shape or dtype other than the format's, a scaling that is not a number.
        UnsupportedError: a format version peftc does not know, a module that is not ``nn.Linear``.
    """
    honoured, ignored = common.classify_fields(source, PEFT_TYPE, FIELDS)
    if source.config.get("format_version") != FORMAT_VERSION:
        raise UnsupportedError(
            f"{source.config_path}: {PEFT_TYPE} format_version {source.config.get('format_version')!r}; peftc reads 1"
        )
    common.check_number(source, "scaling")
    scaling = float(source.config.get("scaling", 1.0))
    grouped: dict[str, dict[str, str]] = {}
    for key in source.tensors:
        role = next((r for r in ROLES if key.endswith("." + r)), None)
        if role is None:
            raise InputError(f"{source.describe(key)}: a {PEFT_TYPE} key ends in one of {', '.join(ROLES)}")
        grouped.setdefault(key[: -len(role) - 1], {})[role] = key
    sites = []
    for path, keys in sorted(grouped.items()):
        if path not in modules:
            raise InputError(f"{source.describe(next(iter(keys.values())))}: the base has no module {path!r}")
        module = modules[path]
        common.layout(source, module, PEFT_TYPE, ("Linear",))
        missing = [r for r in ROLES if r not in keys]
        if missing:
            raise InputError(f"{source.weights_path.name}: module {path!r} has no {missing[0]}")
        d_out, d_in = modules.state_shapes[module.params["weight"]]
        a, b = _factors(source, keys, d_in, d_out)
        tensors = {
            "lora_A": AdapterTensor(keys["onebit_A.signs"], a),
            "lora_B": AdapterTensor(keys["onebit_B.signs"], b),
        }
        tensors["lora_B_bias"] = None
        scalars = {"scale": scaling, "fan_in_fan_out": False}
        info = {"module_type": module.class_name, "r": a.shape[0], "bits": 1}
        forms = LORA_LINEAR.weight_sites(tensors, scalars)
        weight_form = tuple(Site(path, op.name, t, s, info, param) for param, op, t, s in forms)
        sites.append(Site(path, LORA_LINEAR.name, tensors, scalars, info, weight_form=weight_form))
    return Adapter(
        source.name, "onebit", source, tuple(sites), honoured={**honoured, "scaling": scaling}, ignored=ignored
    )


def _factors(source: AdapterSource, keys: dict[str, str], d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = diag(a)·S_A`` and ``B = diag(b)·S_B`` (float32), after checking every shape and dtype."""
    tensors = {role: source.tensors[key] for role, key in keys.items()}
    for role in ROLES:
        want = torch.uint8 if role.endswith("signs") else torch.float32
        if tensors[role].dtype != want:
            raise InputError(
                f"{source.describe(keys[role])}: dtype {str(tensors[role].dtype).removeprefix('torch.')}; expected {str(want).removeprefix('torch.')}"
            )
    r = tensors["onebit_A.scales"].shape[0] if tensors["onebit_A.scales"].dim() == 1 else 0
    if r < 1:
        raise InputError(
            f"{source.describe(keys['onebit_A.scales'])}: shape {list(tensors['onebit_A.scales'].shape)}; expected [r]"
        )
    expected = {
        "onebit_A.signs": (r, math.ceil(d_in / 8)),
        "onebit_A.scales": (r,),
        "onebit_B.signs": (d_out, math.ceil(r / 8)),
        "onebit_B.scales": (d_out,),
    }
    for role, shape in expected.items():
        if tuple(tensors[role].shape) != shape:
            raise InputError(
                f"{source.describe(keys[role])}: shape {list(tensors[role].shape)}, expected {list(shape)} "
                f"(rank {r}, base weight [{d_out}, {d_in}])"
            )
    a = tensors["onebit_A.scales"].unsqueeze(1) * unpack_signs(tensors["onebit_A.signs"], d_in)
    b = tensors["onebit_B.scales"].unsqueeze(1) * unpack_signs(tensors["onebit_B.signs"], r)
    return a, b


METHOD = Method("onebit", (PEFT_TYPE,), parse, ops=(), fields=FIELDS)
