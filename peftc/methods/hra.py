"""HRA, Householder reflection adaptation (PEFT ``HRA``): its weight transform and peftc's parser.

HRA multiplies what a layer reads by an orthogonal matrix built from ``r`` Householder reflections.
With ``U`` ``[n, r]`` the trained vectors (``n`` the layer's inputs; ``c_in·k·k`` for a convolution,
flattened in the kernel's own order) and ``u_i = U[:, i] / ‖U[:, i]‖``::

    R = H_0 H_1 … H_{r−1},   H_i = I − 2 u_i u_iᵀ          (apply_GS=False)
    R = I − 2 Q Qᵀ                                        (apply_GS=True)

where ``Q``'s columns are ``U``'s orthonormalised by Gram–Schmidt in column order (each column minus
its projections on the previous, already normalised ones, then normalised). The weight, viewed as a
matrix ``M`` ``[d_out, n]``, becomes ``M' = M R``. PEFT's forward builds exactly this weight and calls
``F.linear``/``F.conv2d``; its merge writes the same. peftc applies the reflections to ``M`` one by
one (``M ← M − 2 (M u_i) u_iᵀ``) rather than forming the ``n×n`` ``R``; the two agree up to fp32
rounding. The transform is computed in fp32 and cast back to the weight's dtype.

Refused (PEFT's unmerged forward and its merge disagree, or PEFT fails): ``nn.Conv2d`` with
``groups > 1`` (PEFT refuses it), a non-square kernel (PEFT sizes ``U`` for ``k₀×k₀`` and fails), a
dilation other than 1, a stride or padding that differ between the two axes, or a ``padding_mode``
other than zeros (PEFT's forward convolves with ``stride[0]``, ``padding[0]``, zero padding and no
dilation, while its merged weight runs with the layer's own settings); other layer types (PEFT
adapts ``nn.Linear`` and ``nn.Conv2d`` only).

**Adapter files.** Keys: ``<m>.hra_u`` ``[n, r]`` on each target. Trained biases (``bias``) and
``modules_to_save`` tensors are full replacements. Each target becomes one ``hra_weight`` site on
its weight.
"""

from __future__ import annotations

import torch

from peftc.errors import UnsupportedError
from peftc.ir.modules import ModuleTable, conv_attributes
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

HRA_WEIGHT = SiteOp(name="hra_weight", form="weight", tensor_roles=("hra_u",), scalars=("apply_gs", "layout"))


def reflect(matrix: torch.Tensor, hra_u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """``M R`` for ``M`` ``[d_out, n]`` and the vectors ``hra_u`` ``[n, r]``, in fp32."""
    u = hra_u.to(torch.float32)
    if apply_gs:
        columns: list[torch.Tensor] = []
        for i in range(u.shape[1]):
            v = u[:, i : i + 1]
            for q in columns:
                v = v - (q.T @ v) * q
            columns.append(v / torch.linalg.vector_norm(v))
        q = torch.cat(columns, dim=1)
        return matrix - 2 * (matrix @ q) @ q.T
    u = u / torch.linalg.vector_norm(u, dim=0)
    for i in range(u.shape[1]):
        column = u[:, i : i + 1]
        matrix = matrix - 2 * (matrix @ column) @ column.T
    return matrix


@composite_op("hra_weight(Tensor weight, Tensor hra_u, bool apply_gs, str layout) -> Tensor")
def hra_weight(weight: torch.Tensor, hra_u: torch.Tensor, apply_gs: bool, layout: str) -> torch.Tensor:
    """The ``linear`` or ``conv`` weight with its inputs reflected by HRA's ``R`` (fp32, cast back)."""
    matrix = as_out_in(weight.to(torch.float32), layout)
    return from_out_in(reflect(matrix, hra_u, apply_gs), weight, layout).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "r",
        "apply_GS",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={"init_weights": "initialisation only (the trained vectors are in the file)"},
    defaults={"r": 8, "apply_GS": False, "bias": "none"},
)
TYPES = (*per_module.LINEAR_TYPES, "Conv2d")


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an HRA adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without ``hra_u``, or an
            ``hra_u`` whose shape is not ``[inputs, r]`` (naming the key and both shapes).
        UnsupportedError: a config field peftc does not know, a target that is not ``nn.Linear`` or
            ``nn.Conv2d``, or a convolution PEFT cannot adapt consistently (module docstring).
    """
    read = per_module.read_targets(
        source,
        modules,
        peft_type="HRA",
        title="HRA",
        fields=FIELDS,
        roles={"hra_u": "hra_u"},
        types=TYPES,
        required=("hra_u",),
    )
    r = per_module.positive_int(source, "r", per_module.setting(read, FIELDS, "r"))
    apply_gs = bool(read.honoured["apply_GS"])
    sites = []
    for target in read.targets:
        if target.layout == "conv":
            _check_conv(source, target)
        inputs = 1
        for size in target.shape[1:]:
            inputs *= size
        u = target.tensors["hra_u"]
        common.expect_shape(source, u, (inputs, r), f"[{inputs}, r={r}] for {target.describe()}")
        info = {"module_type": target.info.class_name, "r": r, "apply_GS": apply_gs}
        scalars = {"apply_gs": apply_gs, "layout": target.layout}
        sites.append(Site(target.path, HRA_WEIGHT.name, {"hra_u": u}, scalars, info, "weight"))
    return common.adapter(source, "hra", sites, read.grouped, read.honoured, read.ignored)


def _check_conv(source: AdapterSource, target: per_module.Module) -> None:
    attrs = conv_attributes(target.info) or {}
    where = f"{source.config_path.name}: HRA on Conv2d {target.path!r}"
    disagree = "PEFT's unmerged forward and its merged weight compute different things"
    kernel = target.shape[2:]
    if attrs.get("groups", 1) != 1:
        raise UnsupportedError(f"{where} (groups={attrs['groups']}): PEFT refuses grouped convolutions")
    if kernel[0] != kernel[1]:
        raise UnsupportedError(
            f"{where} with a {kernel[0]}×{kernel[1]} kernel: PEFT sizes hra_u for a square kernel and fails on it"
        )
    if any(d != 1 for d in attrs.get("dilation", ())):
        raise UnsupportedError(
            f"{where} (dilation={list(attrs['dilation'])}): PEFT's forward drops the dilation, so {disagree}"
        )
    for name in ("stride", "padding"):
        value = attrs.get(name, (0, 0))
        if isinstance(value, str) or len(set(value)) > 1:
            raise UnsupportedError(
                f"{where} ({name}={value!r}): PEFT's forward uses {name}[0] on both axes, so {disagree}"
            )
    if attrs.get("extra_ops"):
        raise UnsupportedError(
            f"{where}, whose padding_mode is not 'zeros': PEFT's forward pads with zeros, so {disagree}"
        )


METHOD = Method("hra", ("HRA",), parse, ops=(HRA_WEIGHT,), fields=FIELDS)
