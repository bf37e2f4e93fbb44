"""peftc's generic sparse-ΔW adapter (``peft_type`` ``PEFTC_SPARSE``): indices and values of the
entries a selective method changed (SPT, PaCA, SaRA, LT-SFT, HFT, … — any update that is a sparse
difference of the base's tensors).

**Format.** A directory like a PEFT adapter's:

* ``adapter_config.json``: ``{"peft_type": "PEFTC_SPARSE", "format_version": 1,
  "keep_base_sparsity": false, "base_model_name_or_path": …}``;
* ``adapter_model.safetensors``, per changed base tensor (named by its state-dict key ``<p>``, no
  prefix): ``<p>.sparse_indices`` (integer ``[K]``, strictly increasing row-major positions into the
  tensor) and ``<p>.sparse_values`` (``[K]``, the entries of ``ΔW`` there).

Each tensor becomes one ``sparse_delta`` weight site, ``W' = W + ΔW`` (fp32 scatter-add, cast back to
``W``'s dtype). Adapters compose by addition: stacked, each site adds its entries to what the
previous adapters made, and ``peftc combine`` reads them as task vectors like any weight site.

**Pruned bases (PERP).** With ``keep_base_sparsity: true`` the update is masked by the base's own
non-zeros, ``W' = W + M ⊙ ΔW`` with ``M = (W ≠ 0)``: an entry the base pruned to zero stays exactly
zero after the merge, so a 2:4 or unstructured-sparse base keeps the sparsity its kernels need.
"""

from __future__ import annotations

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.methods.s2ft import check_indices
from peftc.ops import SiteOp, composite_op

PEFT_TYPE = "PEFTC_SPARSE"
FORMAT_VERSION = 1
SPARSE_DELTA = SiteOp(
    name="sparse_delta",
    form="weight",
    tensor_roles=("sparse_indices", "sparse_values"),
    scalars=("keep_base_sparsity",),
)


@composite_op(
    "sparse_delta(Tensor weight, Tensor sparse_indices, Tensor sparse_values, bool keep_base_sparsity) -> Tensor"
)
def sparse_delta(
    weight: torch.Tensor, sparse_indices: torch.Tensor, sparse_values: torch.Tensor, keep_base_sparsity: bool
) -> torch.Tensor:
    """``W`` plus ``sparse_values`` at the row-major positions ``sparse_indices``, in fp32; with
    ``keep_base_sparsity`` only where ``W`` is non-zero (PERP's masked merge)."""
    flat = weight.to(torch.float32).flatten()
    values = sparse_values.to(torch.float32)
    if keep_base_sparsity:
        values = values * flat.index_select(0, sparse_indices).ne(0).to(torch.float32)
    return scatter_add(flat, sparse_indices, values).reshape(weight.shape).to(weight.dtype)


def scatter_add(flat: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``flat`` with ``values`` added at ``indices``."""
    return flat.index_add(0, indices, values)


FIELDS = common.Fields(
    honoured=("format_version", "keep_base_sparsity"),
    ignored={"method": "names the selective method that trained the update (SPT, PaCA, …)"},
    defaults={"keep_base_sparsity": False},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a sparse-ΔW adapter against the base model's tensors.

    Raises:
        InputError: a key that is not ``<tensor>.sparse_indices``/``.sparse_values`` of a base tensor,
            one without the other, values not shaped like the indices, or indices out of range,
            repeated or unsorted (each naming the key).
        UnsupportedError: a format version peftc does not know, or a non-float base tensor.
    """
    honoured, ignored = common.classify_fields(source, PEFT_TYPE, FIELDS)
    if honoured["format_version"] != FORMAT_VERSION:
        raise UnsupportedError(
            f"{source.config_path}: {PEFT_TYPE} format_version {honoured['format_version']!r}; peftc reads 1"
        )
    keep = honoured["keep_base_sparsity"]
    if not isinstance(keep, bool):
        raise InputError(f"{source.config_path}: keep_base_sparsity {keep!r}: give true or false")
    owners = {fqn: (path, local) for path, module in modules.items() for local, fqn in module.params.items()}
    grouped: dict[str, dict[str, AdapterTensor]] = {}
    for key, tensor in source.tensors.items():
        param, _, role = key.rpartition(".")
        if role not in SPARSE_DELTA.tensor_roles:
            raise InputError(f"{source.describe(key)}: not <tensor>.sparse_indices or <tensor>.sparse_values")
        if param not in owners or param not in modules.tensors:
            raise InputError(f"{source.describe(key)}: the base has no tensor {param!r}{common.nearest(param, owners)}")
        grouped.setdefault(param, {})[role] = AdapterTensor(key, tensor)
    sites = []
    for param, tensors in sorted(grouped.items()):
        missing = [r for r in SPARSE_DELTA.tensor_roles if r not in tensors]
        if missing:
            raise InputError(f"{source.weights_path.name}: {param} has no {param}.{missing[0]}")
        sites.append(_site(source, modules, param, owners[param], tensors, keep))
    return Adapter(
        name=source.name, method="sparse", source=source, sites=tuple(sites), honoured=honoured, ignored=ignored
    )


def _site(source, modules, param, owner, tensors, keep: bool) -> Site:
    base = modules.tensors[param]
    if not base.is_floating_point():
        raise UnsupportedError(
            f"{source.describe(tensors['sparse_indices'].key)}: the base tensor is not floating point"
        )
    indices, values = tensors["sparse_indices"], tensors["sparse_values"]
    check_indices(source.describe(indices.key), indices.tensor, base.numel())
    if tuple(values.tensor.shape) != tuple(indices.tensor.shape):
        raise InputError(
            f"{source.describe(values.key)}: shape {list(values.tensor.shape)}, but the indices are "
            f"{list(indices.tensor.shape)}"
        )
    path, local = owner
    roles = {"sparse_indices": AdapterTensor(indices.key, indices.tensor, index=True), "sparse_values": values}
    info = {
        "module_type": modules[path].class_name,
        "entries": int(indices.tensor.numel()),
        "of": base.numel(),
        "weight": list(base.shape),
    }
    return Site(path, SPARSE_DELTA.name, roles, {"keep_base_sparsity": keep}, info, local)


def to_sparse(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, values)`` of the non-zero entries of a dense ``ΔW`` (row-major, increasing)."""
    flat = delta.flatten()
    indices = flat.nonzero()[:, 0]
    return indices, flat[indices]


METHOD = Method("sparse", (PEFT_TYPE,), parse, ops=(SPARSE_DELTA,), fields=FIELDS)
