"""MiSS, formerly Bone (PEFT ``MISS``): its weight transform and peftc's parser.

MiSS trains one small block per ``nn.Linear`` (``W`` ``[d_out, d_in]``). PEFT has three forms,
chosen by ``init_weights``; peftc follows PEFT's forward, which for each form is the transform its
``merge`` writes (checked against both in ``tests/methods/test_miss.py``):

* **balance** (``init_weights`` true or false; block ``B`` ``[r, d_out]``): the input is cut into
  chunks of ``r`` features (zero-padded to a multiple of ``r``), the chunks are summed, and the sum is
  multiplied by ``B``: ``y = x Wᵀ + b + (Σ_chunks x_chunk) B``. As a weight::

      W'[o, i] = W[o, i] + B[i mod r, o]

* **mini** (``init_weights="mini"``; block ``[r, mini_r]``): the same with ``B`` tiled ``d_out/mini_r``
  times along its columns, ``B_full[j, o] = B[j, o mod mini_r]``.
* **bat** (``init_weights="bat"``; blocks ``B_p`` ``[d_out/r, r, r]``): ``W`` is cut into ``r×r``
  tiles ``W_{p,q}`` (``p`` over outputs, ``q`` over inputs) and each becomes::

      W'_{p,q} = W_{p,q} + W_{p,q} B_p + B_p

  (PEFT's forward builds this weight and calls ``F.linear``; its merge adds the same update.)

The transform is computed in fp32 and cast back to ``W``'s dtype. PEFT 0.21 no longer defines the
``BONE`` type (its checkpoints predate the rename and the PEFT oracle cannot load them), so peftc reads
``MISS`` only.

**Adapter files.** Keys: ``<m>.miss_block`` on each ``nn.Linear`` target, shaped as above. Trained
biases (``bias``) and ``modules_to_save`` tensors are full replacements. Each target becomes one
``miss_weight`` site on its weight.
"""

from __future__ import annotations

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

MISS_WEIGHT = SiteOp(name="miss_weight", form="weight", tensor_roles=("miss_block",), scalars=("bat",))


def delta_weight(weight: torch.Tensor, block: torch.Tensor, bat: bool) -> torch.Tensor:
    """``W' − W`` in fp32 for a ``[d_out, d_in]`` weight (see the module docstring)."""
    w = weight.to(torch.float32)
    block = block.to(torch.float32)
    d_out, d_in = w.shape
    if bat:
        r = block.shape[-1]
        tiles = w.reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)  # [q, p, r, r]
        return (tiles @ block + block).permute(1, 2, 0, 3).reshape(d_out, d_in)
    r, columns = block.shape
    full = block.repeat(1, d_out // columns)  # [r, d_out]
    return full.repeat(-(-d_in // r), 1)[:d_in].T  # column i is B_full[i mod r]


@composite_op("miss_weight(Tensor weight, Tensor miss_block, bool bat) -> Tensor")
def miss_weight(weight: torch.Tensor, miss_block: torch.Tensor, bat: bool) -> torch.Tensor:
    """``W'`` for a ``[d_out, d_in]`` weight (fp32 math, cast back to ``W``'s dtype).

    Args:
        miss_block: ``[r, c]`` with ``c`` dividing ``d_out`` (balance: ``c = d_out``; mini:
            ``c = mini_r``), or ``[d_out/r, r, r]`` with ``bat``.
        bat: the tile-wise form ``W_{p,q} + W_{p,q} B_p + B_p``.
    """
    return (weight.to(torch.float32) + delta_weight(weight, miss_block, bat)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "init_weights",
        "mini_r",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={"miss_dropout": "dropout is the identity at inference"},
    defaults={"r": 64, "init_weights": True, "mini_r": 1, "bias": "none"},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a MiSS adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its block, a block whose
            shape is not the one PEFT creates for the module and ``init_weights`` (naming the key and
            both shapes), ``r`` larger than a module's inputs, or dimensions the form cannot tile.
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    read = per_module.read_targets(
        source,
        modules,
        peft_type="MISS",
        title="MiSS",
        fields=FIELDS,
        roles={"miss_block": "miss_block"},
        types=per_module.LINEAR_TYPES,
        required=("miss_block",),
    )
    form = per_module.setting(read, FIELDS, "init_weights")
    if form not in (True, False, "bat", "mini"):
        raise InputError(f"{source.config_path}: init_weights={form!r}; expected true, false, 'bat' or 'mini'")
    r = per_module.positive_int(source, "r", per_module.setting(read, FIELDS, "r"))
    mini_r = per_module.positive_int(source, "mini_r", per_module.setting(read, FIELDS, "mini_r"))
    sites = []
    for target in read.targets:
        d_out, d_in = target.shape
        where = f"{source.config_path}: MiSS on {target.describe()}"
        if r > d_in:
            raise InputError(f"{where}: r={r} is larger than its {d_in} inputs (PEFT refuses it too)")
        if form == "bat" and (d_in % r or d_out % r):
            raise InputError(f"{where}: init_weights='bat' needs r={r} to divide both dimensions (PEFT refuses it too)")
        if form == "mini" and d_out % mini_r:
            raise InputError(f"{where}: init_weights='mini' needs mini_r={mini_r} to divide d_out={d_out}")
        expected = {"bat": (d_out // r, r, r), "mini": (r, mini_r)}.get(form, (r, d_out))
        block = target.tensors["miss_block"]
        what = f"{list(expected)} for {target.describe()}, r={r}, init_weights={form!r}"
        common.expect_shape(source, block, expected, what)
        info = {"module_type": target.info.class_name, "r": r, "form": _form_name(form)}
        sites.append(Site(target.path, MISS_WEIGHT.name, {"miss_block": block}, {"bat": form == "bat"}, info, "weight"))
    return common.adapter(source, "miss", sites, read.grouped, read.honoured, read.ignored)


def _form_name(form: object) -> str:
    return form if isinstance(form, str) else "balance"


METHOD = Method("miss", ("MISS",), parse, ops=(MISS_WEIGHT,), fields=FIELDS)
