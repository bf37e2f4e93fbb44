"""SHiRA, sparse high-rank adapters (PEFT ``SHIRA``): its weight transform and peftc's parser.

SHiRA trains ``K = r·(d_in + d_out)`` entries of each ``nn.Linear`` weight ``W`` ``[d_out, d_in]`` at
fixed positions ``(row_k, col_k)``; the rest of the update is zero::

    W'[row_k, col_k] = W[row_k, col_k] + v_k          (k = 1…K; PEFT's scale is 1)

PEFT's forward adds this sparse update to a copy of ``W`` and calls ``F.linear``; its merge adds the
same update in place. peftc adds it to the flattened weight with ``index_add`` (positions
``row·d_in + col``; a position given twice adds twice, as PEFT's sparse tensor does), in fp32, and
casts back to ``W``'s dtype.

**Adapter files.** Keys: ``<m>.shira_weight`` ``[K]`` (the values) and ``<m>.shira_indices``
``[2, K]`` (rows, then columns; integers, or floats holding integers as PEFT writes them on Windows)
per ``nn.Linear`` target. PEFT redraws a mask when it builds the model and then overwrites it with
the saved indices, so a file without ``shira_indices`` gets the redrawn mask: ``mask_type="random"``
draws ``randperm(d_out·d_in)[:K]`` with a fresh CPU ``torch.Generator`` per module, seeded with
``random_seed`` when set (else the generator's fixed default seed), and takes the positions in
row-major order. peftc redraws it the same way, with a warning; other mask types cannot be redrawn
and need the indices. ``modules_to_save`` tensors are full replacements. Each target becomes one
``shira_weight`` site on its weight.
"""

from __future__ import annotations

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

SHIRA_WEIGHT = SiteOp(name="shira_weight", form="weight", tensor_roles=("shira_indices", "shira_weight"), scalars=())


@composite_op("shira_weight(Tensor weight, Tensor shira_indices, Tensor shira_weight) -> Tensor")
def shira_weight(weight: torch.Tensor, shira_indices: torch.Tensor, shira_weight: torch.Tensor) -> torch.Tensor:
    """``W`` plus ``shira_weight`` at the flat positions ``shira_indices`` (int64 ``[K]``), in fp32."""
    return add_sparse(weight.to(torch.float32), shira_indices, shira_weight).to(weight.dtype)


def add_sparse(weight: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``weight`` with ``values`` added at the row-major ``flat`` positions."""
    return weight.flatten().index_add(0, flat, values.to(weight.dtype)).reshape(weight.shape)


FIELDS = common.Fields(
    honoured=("r", "mask_type", "random_seed", "target_modules", "modules_to_save"),
    ignored={
        "init_weights": "initialisation only (the trained values are in the file)",
        "fan_in_fan_out": "PEFT's SHiRA adapts only nn.Linear, whose layout is fixed (it resets the flag to False)",
    },
    defaults={"r": 32, "mask_type": "random"},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a SHiRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without values, values or indices
            shaped unlike PEFT's for the module and ``r`` (naming the key and both shapes), indices that
            are not whole numbers or fall outside the weight, or missing indices with a mask type peftc
            cannot redraw.
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    read = per_module.read_targets(
        source,
        modules,
        peft_type="SHIRA",
        title="SHiRA",
        fields=FIELDS,
        roles={"shira_weight": "values", "shira_indices": "indices"},
        types=per_module.LINEAR_TYPES,
        bias_field=None,
        required=("values",),
    )
    r = per_module.positive_int(source, "r", per_module.setting(read, FIELDS, "r"))
    seed = read.honoured["random_seed"]
    if seed is not None:
        seed = per_module.positive_int(source, "random_seed", seed, minimum=0)
    sites, warnings = [], []
    for target in read.targets:
        d_out, d_in = target.shape
        count = r * (d_in + d_out)
        if count > d_out * d_in:
            raise InputError(
                f"{source.config_path}: r={r} gives {target.path!r} {count} SHiRA entries, more than its "
                f"{d_out * d_in} weights (PEFT refuses it too)"
            )
        values = target.tensors["values"]
        common.expect_shape(source, values, (count,), f"[r·(d_in + d_out)={count}] for {target.describe()}, r={r}")
        key = values.key.removesuffix("shira_weight") + "shira_indices"
        if "indices" in target.tensors:
            flat = _saved_indices(source, target.tensors["indices"], count, d_out, d_in)
        else:
            flat = _redrawn(source, read.honoured["mask_type"], seed, count, d_out, d_in, key)
            warnings.append(
                f"{source.weights_path.name} has no {key}: mask redrawn from random_seed={seed} with torch "
                f"{torch.__version__}'s CPU generator, as PEFT does when it loads the adapter; this matches the "
                "training run only if its torch drew the same numbers"
            )
        info = {"module_type": target.info.class_name, "r": r, "entries": count, "weight": [d_out, d_in]}
        tensors = {"shira_indices": flat, "shira_weight": values}
        sites.append(Site(target.path, SHIRA_WEIGHT.name, tensors, {}, info, "weight"))
    return common.adapter(source, "shira", sites, read.grouped, read.honoured, read.ignored, warnings)


def _saved_indices(source: AdapterSource, saved: AdapterTensor, count: int, d_out: int, d_in: int) -> AdapterTensor:
    """The file's ``[2, K]`` rows and columns as flat int64 positions, checked whole and inside the weight."""
    key, indices = saved.key, saved.tensor
    common.expect_shape(source, saved, (2, count), f"[2, {count}] (rows, columns)")
    if indices.is_floating_point() and not torch.equal(indices, indices.round()):
        raise InputError(f"{source.describe(key)}: indices are not whole numbers")
    rows, columns = indices.to(torch.int64)
    bad = (rows < 0) | (rows >= d_out) | (columns < 0) | (columns >= d_in)
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        raise InputError(
            f"{source.describe(key)}: position {k} is ({int(rows[k])}, {int(columns[k])}), outside the "
            f"[{d_out}, {d_in}] weight"
        )
    return AdapterTensor(f"{key} (flattened to row·{d_in} + column)", rows * d_in + columns)


def _redrawn(
    source: AdapterSource, mask_type: str, seed: int | None, count: int, d_out: int, d_in: int, key: str
) -> AdapterTensor:
    if mask_type != "random":
        raise InputError(
            f"{source.weights_path.name} has no {key}, and mask_type={mask_type!r} is not a mask peftc (or PEFT) "
            "can redraw"
        )
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(d_out * d_in, generator=generator)[:count].sort().values
    return AdapterTensor(f"{key} redrawn from random_seed={seed}", flat)


METHOD = Method("shira", ("SHIRA",), parse, ops=(SHIRA_WEIGHT,), fields=FIELDS)
