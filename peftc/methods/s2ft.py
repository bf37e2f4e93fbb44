"""peftc's S²FT adapter (``peft_type`` ``PEFTC_S2FT``): the structured-sparse update S²FT trains, as
indices and dense sub-blocks in the base's own channel order.

S²FT trains a few whole output rows of ``v_proj``/``up_proj`` and a few whole input columns of
``o_proj``/``down_proj`` (heads and FFN channels) and leaves every other weight as it was. For a
module ``W`` ``[d_out, d_in]`` the update is one dense block at a set of indices ``I`` (``|I| = k``)::

    rows     ΔW[I, :] = S  (S: [k, d_in])     y' = y + scatter_I(x Sᵀ)       (output rows)
    columns  ΔW[:, I] = S  (S: [d_out, k])    y' = y + x[..., I] Sᵀ          (input columns)

**Format.** A directory like a PEFT adapter's:

* ``adapter_config.json``: ``{"peft_type": "PEFTC_S2FT", "format_version": 1, "target_modules":
  [module paths], "base_model_name_or_path": …}`` (``peftc extract`` also records how the update was
  found in ``extract.json`` beside it);
* ``adapter_model.safetensors``, per module path ``<m>`` (no ``base_model.model.`` prefix): either
  ``<m>.s2ft_rows`` (int64 ``[k]``) or ``<m>.s2ft_columns`` (int64 ``[k]``), strictly increasing
  indices into the base's original order, and ``<m>.s2ft_block`` (``[k, d_in]`` or ``[d_out, k]``).

Merged, a site is ``W[I, :] += S`` / ``W[:, I] += S`` (fp32 ``index_add``, cast back to ``W``'s
dtype). Unmerged (``--no-merge``) it stays one ``s2ft_linear`` node: the base linear plus one small
GEMM on the gathered input columns, or scattered into the selected output rows. Where ``I`` is one
contiguous range ``[s, s + k)`` (after ``--co-permute``, ``peftc/sparse/copermute.py``) the site is
``s2ft_slice_linear``: the same GEMM on a slice of the input, or added to a slice of the output — no
gather, no scatter. The ops are composite ``peftc::`` ops: AOTInductor lowers them from their ATen
bodies; ONNX from translations that copy no full-size output (``s2ft_onnx.py``: the selected input
columns stacked after the input for one GEMM with ``[Wᵀ; Sᵀ]``, one in-place ``ScatterElements`` add
into the selected output rows).
"""

from __future__ import annotations

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

PEFT_TYPE = "PEFTC_S2FT"
FORMAT_VERSION = 1
ROWS, COLUMNS = 0, 1
SIDES = {"s2ft_rows": ROWS, "s2ft_columns": COLUMNS}
ROLES = ("s2ft_indices", "s2ft_block")

S2FT_WEIGHT = SiteOp(name="s2ft_weight", form="weight", tensor_roles=ROLES, scalars=("dim",))


@composite_op("s2ft_weight(Tensor weight, Tensor s2ft_indices, Tensor s2ft_block, int dim) -> Tensor")
def s2ft_weight(weight: torch.Tensor, s2ft_indices: torch.Tensor, s2ft_block: torch.Tensor, dim: int) -> torch.Tensor:
    """``W`` with ``s2ft_block`` added to its rows (``dim`` 0) or columns (``dim`` 1) ``s2ft_indices``, in fp32."""
    return add_block(weight.to(torch.float32), dim, s2ft_indices, s2ft_block.to(torch.float32)).to(weight.dtype)


def add_block(tensor: torch.Tensor, dim: int, indices: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``tensor`` with ``block`` added at ``indices`` along ``dim`` (the one scatter both ops use)."""
    return tensor.index_add(dim, indices, block)


@composite_op(
    "s2ft_linear(Tensor x, Tensor weight, Tensor? bias, Tensor s2ft_indices, Tensor s2ft_block, int dim) -> Tensor"
)
def s2ft_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    s2ft_indices: torch.Tensor,
    s2ft_block: torch.Tensor,
    dim: int,
) -> torch.Tensor:
    """The base linear plus the block's GEMM: on the gathered input columns (``dim`` 1), or scattered
    into the selected output rows (``dim`` 0). The block's product is computed in fp32."""
    y = torch.nn.functional.linear(x, weight, bias)
    block = s2ft_block.to(torch.float32)
    if dim == COLUMNS:
        return (y.to(torch.float32) + x.index_select(-1, s2ft_indices).to(torch.float32) @ block.T).to(y.dtype)
    return add_block(y.to(torch.float32), -1, s2ft_indices, x.to(torch.float32) @ block.T).to(y.dtype)


@composite_op(
    "s2ft_slice_linear(Tensor x, Tensor weight, Tensor? bias, Tensor s2ft_block, int start, int dim) -> Tensor"
)
def s2ft_slice_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, s2ft_block: torch.Tensor, start: int, dim: int
) -> torch.Tensor:
    """:func:`s2ft_linear` for the indices ``start … start + k - 1``: the block's GEMM on the input slice
    (``dim`` 1), or added to that slice of the output rows (``dim`` 0, concatenated back); in fp32."""
    y = torch.nn.functional.linear(x, weight, bias)
    block = s2ft_block.to(torch.float32)
    k = block.shape[dim]
    if dim == COLUMNS:
        return (y.to(torch.float32) + x.narrow(-1, start, k).to(torch.float32) @ block.T).to(y.dtype)
    y32, end = y.to(torch.float32), start + k
    middle = y32.narrow(-1, start, k) + x.to(torch.float32) @ block.T
    before, after = y32.narrow(-1, 0, start), y32.narrow(-1, end, weight.shape[0] - end)
    return torch.cat([p for p in (before, middle, after) if p.shape[-1]], dim=-1).to(y.dtype)


def _weight_form(s2ft_indices, s2ft_block, dim):
    """One ``s2ft_linear`` call as its weight site: ``W' = W`` with the block added at the indices."""
    return {"weight": (S2FT_WEIGHT, (s2ft_indices, s2ft_block, dim))}


S2FT_LINEAR = SiteOp(
    name="s2ft_linear",
    form="call",
    tensor_roles=ROLES,
    scalars=("dim",),
    base_params=("weight", "bias"),
    body=s2ft_linear,
    weight_form=_weight_form,
    onnx="peftc.methods.s2ft_onnx:s2ft_linear",
)

S2FT_SLICE_LINEAR = SiteOp(
    name="s2ft_slice_linear",
    form="call",
    tensor_roles=("s2ft_block",),
    scalars=("start", "dim"),
    base_params=("weight", "bias"),
    body=s2ft_slice_linear,
    onnx="peftc.methods.s2ft_onnx:s2ft_slice_linear",
)
"""Made only by ``co-permute`` (``peftc/sparse/copermute_pass.py``), never by a parser; not merged."""

FIELDS = common.Fields(
    honoured=("format_version", "target_modules"),
    ignored={"extract": "records how the update was found (base, fine-tuned checkpoint, permutation)"},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an S²FT adapter against the base model's modules.

    Raises:
        InputError: a key of no module or role, a module the base lacks or that is not ``nn.Linear``,
            a module in ``target_modules`` without tensors (or the reverse), indices that are not
            one-dimensional integers, out of range, repeated or unsorted, or a block whose shape
            disagrees with the indices and the base weight (each naming the key).
        UnsupportedError: a format version peftc does not know.
    """
    honoured, ignored = common.classify_fields(source, PEFT_TYPE, FIELDS)
    if honoured["format_version"] != FORMAT_VERSION:
        raise UnsupportedError(
            f"{source.config_path}: {PEFT_TYPE} format_version {honoured['format_version']!r}; peftc reads 1"
        )
    grouped = _group(source)
    targets = honoured["target_modules"]
    if not isinstance(targets, list) or sorted(targets) != sorted(grouped):
        raise InputError(
            f"{source.config_path}: target_modules {targets!r} must list exactly the modules of "
            f"{source.weights_path.name} ({sorted(grouped)})"
        )
    sites = [_site(source, modules, path, tensors) for path, tensors in sorted(grouped.items())]
    return Adapter(
        name=source.name, method="s2ft", source=source, sites=tuple(sites), honoured=honoured, ignored=ignored
    )


def _group(source: AdapterSource) -> dict[str, dict[str, AdapterTensor]]:
    grouped: dict[str, dict[str, AdapterTensor]] = {}
    for key, tensor in source.tensors.items():
        path, _, role = key.rpartition(".")
        if role not in (*SIDES, "s2ft_block") or not path:
            raise InputError(f"{source.describe(key)}: not <module>.s2ft_rows, .s2ft_columns or .s2ft_block")
        grouped.setdefault(path, {})[role] = AdapterTensor(key, tensor)
    for path, tensors in grouped.items():
        sides = [s for s in SIDES if s in tensors]
        if len(sides) != 1 or "s2ft_block" not in tensors:
            raise InputError(
                f"{source.weights_path.name}: module {path!r} needs s2ft_block and one of s2ft_rows or "
                f"s2ft_columns; it has {sorted(tensors)}"
            )
    return grouped


def _site(source: AdapterSource, modules: ModuleTable, path: str, tensors: dict[str, AdapterTensor]) -> Site:
    side = next(s for s in SIDES if s in tensors)
    indices, block = tensors[side], tensors["s2ft_block"]
    module = modules.get(path)
    if module is None:
        raise InputError(
            f"{source.describe(indices.key)}: the base has no module {path!r}{common.nearest(path, modules)}"
        )
    if module.class_name != "Linear" or "weight" not in module.params:
        raise InputError(f"{source.describe(indices.key)}: {path!r} is {module.class_name}; S²FT adapts nn.Linear")
    d_out, d_in = modules.state_shapes[module.params["weight"]]
    dim = SIDES[side]
    check_indices(source.describe(indices.key), indices.tensor, d_out if dim == ROWS else d_in)
    k = indices.tensor.shape[0]
    expected = (k, d_in) if dim == ROWS else (d_out, k)
    if tuple(block.tensor.shape) != expected:
        raise InputError(
            f"{source.describe(block.key)}: shape {list(block.tensor.shape)}, but {k} {side.removeprefix('s2ft_')} "
            f"of {path!r} (weight [{d_out}, {d_in}]) need {list(expected)}"
        )
    roles = {"s2ft_indices": AdapterTensor(indices.key, indices.tensor, index=True), "s2ft_block": block}
    info = {"module_type": module.class_name, "side": side.removeprefix("s2ft_"), "k": k, "weight": [d_out, d_in]}
    weight = Site(path, S2FT_WEIGHT.name, roles, {"dim": dim}, info, "weight")
    return Site(path, S2FT_LINEAR.name, roles, {"dim": dim}, info, weight_form=(weight,))


def check_indices(where: str, indices: torch.Tensor, size: int) -> None:
    """Refuse indices that are not a strictly increasing 1-D integer list inside ``[0, size)``.

    Raises:
        InputError: naming ``where`` (file and key) and the first bad index.
    """
    if indices.dim() != 1 or indices.is_floating_point() or indices.dtype == torch.bool or indices.numel() == 0:
        raise InputError(
            f"{where}: indices must be a non-empty 1-D integer tensor (got {indices.dtype} {list(indices.shape)})"
        )
    values = indices.to(torch.int64)
    outside = ((values < 0) | (values >= size)).nonzero()
    if outside.numel():
        i = int(outside[0, 0])
        raise InputError(f"{where}: index {int(values[i])} at position {i} is outside [0, {size})")
    steps = (values[1:] - values[:-1] <= 0).nonzero()
    if steps.numel():
        i = int(steps[0, 0]) + 1
        what = "repeated" if values[i] == values[i - 1] else "not increasing"
        raise InputError(f"{where}: index {int(values[i])} at position {i} is {what} (indices are sorted and unique)")


METHOD = Method("s2ft", (PEFT_TYPE,), parse, ops=(S2FT_WEIGHT, S2FT_LINEAR, S2FT_SLICE_LINEAR), fields=FIELDS)
