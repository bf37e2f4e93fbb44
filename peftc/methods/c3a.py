"""C3A, circular convolution adaptation (PEFT ``C3A``): its weight transform and peftc's parser.

C3A cuts an ``nn.Linear``'s input and output into blocks of ``b`` features and trains one length-``b``
kernel ``w[m, n]`` per (output block ``m``, input block ``n``). PEFT's forward computes, with FFTs,
``fft(ifft(x_n) ⊙ fft(w[m, n])).real`` summed over ``n`` and divided by ``d_in``: a circular
cross-correlation, ``y_m[t] = Σ_n Σ_l w[m, n, l] · x_n[(t + l) mod b] / d_in``. As a weight::

    ΔW[m·b + t, n·b + j] = w[m, n, (j − t) mod b] / d_in          W' = W + ΔW

which is the block-circulant matrix PEFT's merge adds (``get_circulant_fast(w) / d_in``). peftc
builds it by gathering the kernel entries (no FFT, so it lowers to every target), in fp32 as PEFT
does, and casts back to ``W``'s dtype.

**Adapter files.** Keys: ``<m>.c3a_kernel`` ``[d_out/b, d_in/b, b]`` per ``nn.Linear`` target, ``b``
from ``block_size`` or ``block_size_pattern`` (PEFT's rule: the first key ``k`` with
``re.match(rf".*\\.{k}$", path)``, else the key equal to the path); ``b`` must divide both
dimensions, as PEFT requires. Trained biases (``bias``) and ``modules_to_save`` tensors are full
replacements. Each target becomes one ``c3a_weight`` site on its weight.
"""

from __future__ import annotations

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

C3A_WEIGHT = SiteOp(name="c3a_weight", form="weight", tensor_roles=("c3a_kernel",), scalars=())


def delta_weight(kernel: torch.Tensor, d_in: int) -> torch.Tensor:
    """The block-circulant ``ΔW`` ``[d_out, d_in]`` of ``kernel`` ``[d_out/b, d_in/b, b]``, in fp32."""
    rows, columns, size = kernel.shape
    t = torch.arange(size).unsqueeze(1)
    j = torch.arange(size).unsqueeze(0)
    index = ((j - t) % size).reshape(-1)  # entry (t, j) of each block reads kernel element (j − t) mod b
    blocks = kernel.to(torch.float32).index_select(2, index).reshape(rows, columns, size, size)
    return blocks.permute(0, 2, 1, 3).reshape(rows * size, columns * size) / d_in


@composite_op("c3a_weight(Tensor weight, Tensor c3a_kernel) -> Tensor")
def c3a_weight(weight: torch.Tensor, c3a_kernel: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` for a ``[d_out, d_in]`` weight (fp32, cast back to ``W``'s dtype)."""
    return (weight.to(torch.float32) + delta_weight(c3a_kernel, weight.shape[1])).to(weight.dtype)


FIELDS = common.Fields(
    honoured=(
        "block_size",
        "block_size_pattern",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={"init_weights": "initialisation only (the trained kernels are in the file)"},
    defaults={"block_size": 256, "bias": "none"},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a C3A adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its kernel, a block size
            that does not divide both of a module's dimensions, or a kernel shaped unlike
            ``[d_out/b, d_in/b, b]`` (naming the key and both shapes).
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear``.
    """
    read = per_module.read_targets(
        source,
        modules,
        peft_type="C3A",
        title="C3A",
        fields=FIELDS,
        roles={"c3a_kernel": "c3a_kernel"},
        types=per_module.LINEAR_TYPES,
        required=("c3a_kernel",),
    )
    default = per_module.setting(read, FIELDS, "block_size")
    sites = []
    for target in read.targets:
        d_out, d_in = target.shape
        value = per_module.suffix_pattern(source.config.get("block_size_pattern"), target.path, default)
        size = per_module.positive_int(source, f"block_size for {target.path!r}", value)
        if d_in % size or d_out % size:
            raise InputError(
                f"{source.config_path}: block_size={size} does not divide both dimensions of {target.describe()} "
                "(PEFT refuses it too)"
            )
        expected = (d_out // size, d_in // size, size)
        kernel = target.tensors["c3a_kernel"]
        common.expect_shape(source, kernel, expected, f"{list(expected)} for {target.describe()}, block_size={size}")
        info = {"module_type": target.info.class_name, "block_size": size}
        sites.append(Site(target.path, C3A_WEIGHT.name, {"c3a_kernel": kernel}, {}, info, "weight"))
    return common.adapter(source, "c3a", sites, read.grouped, read.honoured, read.ignored)


METHOD = Method("c3a", ("C3A",), parse, ops=(C3A_WEIGHT,), fields=FIELDS)
