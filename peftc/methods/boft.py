"""BOFT, butterfly OFT (PEFT ``BOFT``; ``shared/methods.md`` §3): its weight transform and peftc's parser.

BOFT (butterfly OFT) rotates a layer's input by a product of ``N`` butterfly factors and scales its
output channels. Each factor ``F_i = P_i B_i P_iᵀ`` is a block-diagonal ``B_i`` of ``D`` orthogonal
``H×H`` blocks, conjugated by a fixed butterfly permutation ``P_i``; every block is the Cayley
transform of the skew-symmetric part of a trained ``H×H`` matrix::

    B_i,j = (I + K)⁻¹(I − K),   K = (A − Aᵀ)/2,   A = boft_R[i, j]
    R = F_{N−1} ⋯ F_1 F_0,      y = s ⊙ ((x R) Mᵀ)   ⇔   M' = diag(s) · M Rᵀ

with ``M`` the weight as ``[d_out, d_in]`` (``nn.Conv2d``: flattened to ``[d_out, c·kh·kw]``) and
``s = boft_s`` one factor per output channel (the bias is not scaled). ``M Rᵀ`` is applied factor by
factor, ``F_0ᵀ`` first, without building any ``d_in × d_in`` matrix: ``M F_iᵀ`` is ``M`` with its
columns gathered by ``P_i⁻¹``, rotated block by block, and gathered back by ``P_i``.

``P_i`` (``i ≥ 1``; ``P_0`` is the identity) splits the ``d_in`` indices into ``D/2^i`` equal groups
and, inside each group, reorders its chunks of ``H/2`` indices: even-numbered chunks first, then the
odd-numbered ones. ``(P_i)[a, perm[a]] = 1``, so ``F_i[a, c] = B_i[perm[a], perm[c]]``; both
gathers are reshapes and transposes (:func:`butterfly_gather`).

The Cayley transform is the exact one of ``peftc/methods/oft.py`` (elimination that exports to ONNX).

**Adapter files.** Keys: ``<m>.boft_R`` ``[N, D, H, H]`` (``N`` butterfly factors of ``D`` blocks of
size ``H``) and ``<m>.boft_s`` (``[d_out, 1]`` for ``nn.Linear``, ``[1, d_out]`` for ``nn.Conv2d``);
trained biases and ``modules_to_save`` tensors are full replacements. Each target becomes a
``boft_weight`` site on its weight.

For a module with ``n`` inputs (``c_in·kh·kw`` for a convolution), ``boft_block_size`` gives
``H`` and ``D = n/H``, or ``boft_block_num`` gives ``D`` and ``H = n/D``; either must divide ``n``.

``N`` is read from the file. PEFT trains with ``boft_n_butterfly_factor`` factors only where its CUDA
extension builds; elsewhere it silently uses one factor and saves ``N = 1`` beside the configured
value. Both are accepted (the second with a warning): the file says which rotation was trained.

Refused: convolutions PEFT's forward computes differently from its merge (it passes only
``stride[0]``/``padding[0]`` and no dilation or padding mode to ``conv2d``), non-square kernels and
grouped convolutions (PEFT fails on them), and other layer types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable, conv_attributes
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.oft import cayley, rotate_columns
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

BOFT_WEIGHT = SiteOp(name="boft_weight", form="weight", tensor_roles=("boft_R", "boft_s"), scalars=("layout",))


@composite_op("boft_weight(Tensor weight, Tensor boft_r, Tensor boft_s, str layout) -> Tensor")
def boft_weight(weight: torch.Tensor, boft_r: torch.Tensor, boft_s: torch.Tensor, layout: str) -> torch.Tensor:
    """``diag(s)·M·Rᵀ`` for BOFT's butterfly rotation ``R`` (fp32, cast back to ``weight``'s dtype).

    Args:
        boft_r: ``[N, D, H, H]``: ``N`` butterfly factors of ``D`` blocks of size ``H``.
        boft_s: one scale per output channel (``[d_out, 1]`` or ``[1, d_out]``).
        layout: ``linear`` or ``conv``.
    """
    factors, count, size = boft_r.shape[0], boft_r.shape[1], boft_r.shape[2]
    a = boft_r.to(torch.float32).reshape(factors * count, size, size)
    blocks = cayley(0.5 * (a - a.transpose(1, 2))).reshape(factors, count, size, size)
    matrix = as_out_in(weight.to(torch.float32), layout)
    for i in range(factors):  # M Rᵀ = M F_0ᵀ F_1ᵀ ⋯; P_0 is the identity, so factor 0 needs no gathers
        groups = count // 2**i
        gathered = butterfly_gather(matrix, groups, size // 2, inverse=True) if i else matrix
        matrix = rotate_columns(gathered, blocks[i], transpose=True)
        matrix = butterfly_gather(matrix, groups, size // 2, inverse=False) if i else matrix
    scaled = matrix * boft_s.to(torch.float32).reshape(-1, 1)
    return from_out_in(scaled, weight, layout).to(weight.dtype)


def butterfly_gather(matrix: torch.Tensor, groups: int, chunk: int, *, inverse: bool) -> torch.Tensor:
    """``matrix[:, perm]`` (or ``matrix[:, perm⁻¹]``) for BOFT's butterfly permutation ``perm``.

    Chunk ``c = 2p + e`` of a group moves to position ``e·(chunks/2) + p`` (even chunks first):
    a transpose of a ``[chunks/2, 2]`` grid, written as reshapes so it exports without index tensors.
    """
    rows, columns = matrix.shape
    half = columns // groups // chunk // 2
    grid = (rows, groups, 2, half, chunk) if inverse else (rows, groups, half, 2, chunk)
    return matrix.reshape(grid).transpose(2, 3).reshape(rows, columns)


FIELDS = common.Fields(
    honoured=(
        "boft_block_size",
        "boft_block_num",
        "boft_n_butterfly_factor",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "boft_dropout": "multiplicative dropout acts only in training",
        "init_weights": "initialisation only (the trained parameters are in the file)",
        "fan_in_fan_out": "PEFT's BOFT adapts only nn.Linear and nn.Conv2d, whose layouts are fixed "
        "(it resets the flag to False)",
    },
    defaults={"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1, "bias": "none"},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv2d")
ROLES = {"boft_R": "boft_R", "boft_s": "boft_s"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a BOFT adapter against the base model's modules.

    Raises:
        InputError: a key that maps to no targeted module, a targeted module without its tensors, a
            tensor whose shape disagrees with the module and config (naming key and both shapes), or an
            invalid block size/number or ``bias``.
        UnsupportedError: a target that is not an ``nn.Linear`` or an ``nn.Conv2d`` whose PEFT forward
            and merge agree.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "BOFT", FIELDS)
    common.check_number(source, "boft_block_size", "boft_block_num", "boft_n_butterfly_factor")
    if cfg.get("bias", "none") not in ("none", "all", "boft_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'boft_only'")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: BOFT config has no target_modules")
    # A field written as null means PEFT's default.
    settings = {k: FIELDS.defaults[k] if honoured[k] is None else honoured[k] for k in FIELDS.defaults}
    size, count = int(settings["boft_block_size"]), int(settings["boft_block_num"])
    if (size == 0) == (count == 0):
        raise InputError(
            f"{source.config_path}: boft_block_size={size}, boft_block_num={count}: exactly one must be non-zero"
        )
    if int(settings["boft_n_butterfly_factor"]) < 1:
        raise InputError(f"{source.config_path}: boft_n_butterfly_factor must be at least 1")

    grouped = common.group_keys(source, modules, common.suffix_roles(ROLES))
    layouts = common.layouts(source, grouped, modules, "BOFT", TYPES)
    warnings: list[str] = []
    sites = [
        _site(source, modules[path], layouts[path], tensors, modules, settings, warnings)
        for path, tensors in sorted(grouped.modules.items())
    ]
    return common.adapter(source, "boft", sites, grouped, honoured, ignored, warnings)


def _site(
    source: AdapterSource,
    module: ModuleInfo,
    layout: str,
    tensors: Mapping[str, AdapterTensor],
    modules: ModuleTable,
    settings: Mapping[str, Any],
    warnings: list[str],
) -> Site:
    path = module.path
    common.require_roles(source, path, tensors, ["boft_R", "boft_s"])
    shape = modules.state_shapes[module.params["weight"]]
    if layout == "conv":
        _check_conv(source, module, shape)
    inputs = shape[1] if layout == "linear" else shape[1] * shape[2] * shape[3]
    where = f"the {inputs} inputs of {path!r} (weight {list(shape)})"
    size, count = int(settings["boft_block_size"]), int(settings["boft_block_num"])
    given = size or count
    if inputs % given:
        name = "boft_block_size" if size else "boft_block_num"
        raise InputError(f"{source.config_path}: {name}={given} does not divide {where} (PEFT refuses it too)")
    size, count = (size, inputs // size) if size else (inputs // count, count)

    rotation = tensors["boft_R"]
    configured = int(settings["boft_n_butterfly_factor"])
    factors = rotation.tensor.shape[0] if rotation.tensor.dim() == 4 else configured
    factors = factors if factors in (1, configured) else configured
    expected = (factors, count, size, size)
    common.expect_shape(
        source,
        rotation,
        expected,
        f"{list(expected)}: {factors} butterfly factor(s) of {count} blocks of size {size} over {where}",
    )
    if factors > 1 and (count % 2 ** (factors - 1) or size % 2):
        raise InputError(
            f"{source.describe(rotation.key)}: {factors} butterfly factors need the block number ({count}) to be a "
            f"multiple of 2^{factors - 1} and the block size ({size}) to be even"
        )
    if factors < configured:
        warnings.append(
            f"{path!r}: boft_n_butterfly_factor={configured} but {rotation.key} holds one factor (PEFT trains with one "
            "where its CUDA extension is unavailable); using the rotation the file holds"
        )
    d_out = shape[0]
    common.expect_shape(
        source,
        tensors["boft_s"],
        (d_out, 1) if layout == "linear" else (1, d_out),
        f"one scale per output channel of {path!r}, {[d_out, 1] if layout == 'linear' else [1, d_out]}",
    )
    info = {"module_type": module.class_name, "block_size": size, "blocks": count, "butterfly_factors": factors}
    roles = {"boft_R": rotation, "boft_s": tensors["boft_s"]}
    return Site(path, BOFT_WEIGHT.name, roles, {"layout": layout}, info, "weight")


def _check_conv(source: AdapterSource, module: ModuleInfo, shape: tuple[int, ...]) -> None:
    where = f"{source.config_path.name}: BOFT on {module.class_name} {module.path!r}"
    attrs = conv_attributes(module) or {}
    if attrs.get("groups", 1) != 1:
        raise UnsupportedError(f"{where} (groups={attrs['groups']}): PEFT refuses grouped convolutions")
    if shape[2] != shape[3]:
        raise UnsupportedError(f"{where} with a {shape[2]}×{shape[3]} kernel: PEFT fails on non-square kernels")
    stride, padding = attrs.get("stride", (1, 1)), attrs.get("padding", (0, 0))
    dilation = attrs.get("dilation", (1, 1))
    if isinstance(padding, str) or len(set(stride)) > 1 or len(set(padding)) > 1 or set(dilation) != {1}:
        raise UnsupportedError(
            f"{where} (stride={stride}, padding={padding}, dilation={dilation}): PEFT's forward convolves with "
            "stride[0] and padding[0] only and no dilation, so it differs from its merge() for this layer"
        )
    if attrs.get("extra_ops"):
        raise UnsupportedError(
            f"{where}, whose padding_mode is not 'zeros': PEFT's forward pads with zeros, so it differs from its merge()"
        )


METHOD = Method("boft", ("BOFT",), parse, ops=(BOFT_WEIGHT,), fields=FIELDS)
