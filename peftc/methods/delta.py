"""peftc's full-ΔW adapter (``peft_type`` ``PEFTC_DELTA``): what ``peftc combine`` writes when the result
is not low-rank (a trimmed, sign-elected or rescaled sum of task vectors).

**Format.** A directory like a PEFT adapter's:

* ``adapter_config.json``: ``{"peft_type": "PEFTC_DELTA", "format_version": 1, "dtype": "float32",
  "base_model_name_or_path": …}`` (``peftc combine`` writes how it was made — method, parameters, seed,
  each input adapter's sha256 — beside it in ``combine.json``);
* ``adapter_model.safetensors``: one fp32 tensor per changed base tensor, named by the base's
  state-dict key (``encoder.layer.0.attention.self.query.weight``), shaped like it: ``ΔW``.

Each key becomes a ``delta_weight`` weight site ``W' = W + ΔW`` (fp32, cast back to ``W``'s dtype)
on that parameter, so the normal ``--adapter`` path reads it: merged, stacked, verified against the
eager reference (PEFT has no such format, so it is no oracle for it).
"""

from __future__ import annotations

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

PEFT_TYPE = "PEFTC_DELTA"
FORMAT_VERSION = 1
DELTA_WEIGHT = SiteOp(name="delta_weight", form="weight", tensor_roles=("delta",), scalars=())


@composite_op("delta_weight(Tensor weight, Tensor delta) -> Tensor")
def delta_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` (fp32, cast back to ``W``'s dtype)."""
    return (weight.to(torch.float32) + delta.to(torch.float32)).to(weight.dtype)


FIELDS = common.Fields(
    honoured=("format_version",),
    ignored={
        "dtype": "the tensors' dtype, read from the file",
        "combine": "records how the deltas were made (method, parameters, seed, inputs)",
    },
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a full-ΔW adapter against the base model's tensors.

    Raises:
        InputError: a key that names no base tensor, or a shape other than that tensor's.
        UnsupportedError: a format version peftc does not know.
    """
    honoured, ignored = common.classify_fields(source, PEFT_TYPE, FIELDS)
    version = source.config.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedError(f"{source.config_path}: {PEFT_TYPE} format_version {version!r}; peftc reads 1")
    owners = {fqn: (path, local) for path, module in modules.items() for local, fqn in module.params.items()}
    sites = []
    for key, tensor in sorted(source.tensors.items()):
        if key not in owners or key not in modules.tensors:
            near = common.nearest(key, owners)
            raise InputError(f"{source.describe(key)}: the base has no tensor {key!r}{near}")
        base = modules.tensors[key]
        if tuple(tensor.shape) != tuple(base.shape):
            raise InputError(
                f"{source.describe(key)}: shape {list(tensor.shape)}, but the base tensor is {list(base.shape)}"
            )
        if not base.is_floating_point():
            raise UnsupportedError(f"{source.describe(key)}: the base tensor is not floating point")
        path, local = owners[key]
        info = {"module_type": modules[path].class_name}
        sites.append(Site(path, DELTA_WEIGHT.name, {"delta": AdapterTensor(key, tensor)}, {}, info, local))
    return Adapter(
        name=source.name,
        method="delta",
        source=source,
        sites=tuple(sites),
        honoured=honoured,
        ignored=ignored,
    )


METHOD = Method("delta", (PEFT_TYPE,), parse, ops=(DELTA_WEIGHT,), fields=FIELDS)
