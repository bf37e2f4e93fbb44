"""OFT (PEFT ``OFT``; ``shared/methods.md`` §3): its weight transform and peftc's parser.

OFT rotates what a layer reads by a block-diagonal orthogonal matrix ``R = diag(R_1, …, R_k)`` of
``b×b`` blocks (``block_share``: one block, repeated). With the weight viewed as a matrix ``M``
(``[d_out, d_in]``; a convolution kernel flattened to ``[d_out, c·kh·kw]``, the order PEFT's merge
uses) the rotation folds into the weight::

    nn.Linear, nn.Conv2d:  y = (x R) Mᵀ          ⇔  M' = M Rᵀ
    nn.Embedding:          row_i ↦ row_i R       ⇔  M' = M R

Each block is parametrised by the ``b(b-1)/2`` strictly-upper-triangular entries ``q`` of a
skew-symmetric ``S = U(q) − U(q)ᵀ`` (row-major, as ``torch.triu_indices`` orders them), and

    Cayley (use_cayley_neumann=False):  R_j = (I + S)⁻¹ (I − S)
    Cayley–Neumann (n terms):            R_j = I + 2S + 2S² + … + 2S^{m−1} + S^m,   m = max(3, n − 1)
                                         (n = 2: I + 2S;  n ≤ 1: I)

The truncated series is ``(I + S)(I + S + … + S^{m−1})``, an approximation of ``(I + S)(I − S)⁻¹``:
the *transpose* of the exact form above. PEFT's two parametrisations differ so, and peftc
reproduces each as PEFT computes it.

``coft`` (constrained OFT) first shrinks each block: ``S ← S`` if ``‖S‖_F ≤ ε'`` else
``S·ε'/‖S‖_F``, with ``ε' = eps/√(stored blocks)``. PEFT writes the projection back into its
parameter on every forward; projecting is idempotent, so its eval output is that of the projected
``S`` computed here.

The exact inverse is Gauss–Jordan elimination unrolled over the (static) block size, because
``torch.linalg.solve``/``inv`` have no ONNX translation. It needs no pivoting: ``I + S`` has
symmetric part ``I``, so every pivot is positive and element growth is bounded.

**Adapter files.** Keys: ``<m>.oft_R.weight`` on ``nn.Linear`` and 1×1 ``nn.Conv2d`` targets and
``<m>.oft_embedding_R.weight`` on ``nn.Embedding`` targets, each ``[blocks, b(b-1)/2]`` (one row
with ``block_share``); trained biases and ``modules_to_save`` tensors are full replacements. Each
target becomes an ``oft_weight`` site on its weight.

The block size ``b`` of a module with ``n`` inputs (``c_in·kh·kw`` for a convolution) comes from the
config as PEFT derives it: ``oft_block_size``, or ``n / r``; a value that does not divide ``n`` is
moved to the nearest divisor (the lower one on a tie), with a warning, as PEFT does.

Refused: convolutions larger than 1×1, whose PEFT forward (rotate overlapping unfolded patches, fold
them back by summing) is not the transform its ``merge()`` writes and already changes outputs at the
identity rotation, so the two PEFT models disagree; grouped or dilated convolutions; other layer types
(PEFT refuses them too); OFT checkpoints from PEFT < 0.14.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable, conv_attributes
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

OFT_WEIGHT = SiteOp(
    name="oft_weight",
    form="weight",
    tensor_roles=("oft_R",),
    scalars=("block_size", "cayley_neumann", "neumann_terms", "coft", "eps", "layout"),
)


@composite_op(
    "oft_weight(Tensor weight, Tensor oft_r, int block_size, bool cayley_neumann, int neumann_terms, "
    "bool coft, float eps, str layout) -> Tensor"
)
def oft_weight(
    weight: torch.Tensor,
    oft_r: torch.Tensor,
    block_size: int,
    cayley_neumann: bool,
    neumann_terms: int,
    coft: bool,
    eps: float,
    layout: str,
) -> torch.Tensor:
    """``weight`` with its input rotated by OFT's block-diagonal ``R`` (fp32, cast back to its dtype).

    Args:
        oft_r: ``[blocks, b(b-1)/2]`` upper-triangular entries, one row per block (one row with
            ``block_share``, repeated across the input).
        block_size: ``b``.
        cayley_neumann: use the truncated Neumann series of ``neumann_terms`` terms instead of the
            exact Cayley transform.
        coft: project each block to Frobenius norm ``≤ eps/√blocks`` first.
        layout: ``linear`` / ``conv`` (``M' = M Rᵀ``) or ``embedding`` (``M' = M R``).
    """
    s = skew_from_upper(oft_r.to(torch.float32), block_size)
    if coft:
        s = project(s, eps / math.sqrt(s.shape[0]))
    blocks = cayley_neumann_series(s, neumann_terms) if cayley_neumann else cayley(s)
    matrix = as_out_in(weight.to(torch.float32), layout)
    rotated = rotate_columns(matrix, blocks, transpose=layout != "embedding")
    return from_out_in(rotated, weight, layout).to(weight.dtype)


def skew_from_upper(upper: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[n, b(b-1)/2]`` strictly-upper entries (row-major) → ``[n, b, b]`` skew-symmetric ``U − Uᵀ``."""
    # Gather from the vector with a zero prepended: entry (i, j), i < j, is its element
    # i(2b − i − 3)/2 + j (1-based, row-major); position 0 fills the diagonal and lower triangle.
    # The index is computed with tensor ops, not built from a Python list: a tensor constant made
    # inside a composite op's body is not registered when an exporter decomposes the op.
    i = torch.arange(block_size).unsqueeze(1)
    j = torch.arange(block_size).unsqueeze(0)
    index = torch.where(j > i, i * (2 * block_size - i - 3) // 2 + j, 0).reshape(-1)
    padded = torch.cat([upper.new_zeros(upper.shape[0], 1), upper], dim=1)
    u = padded[:, index].reshape(-1, block_size, block_size)
    return u - u.transpose(1, 2)


def project(s: torch.Tensor, limit: float) -> torch.Tensor:
    """Each ``[b, b]`` block scaled down to Frobenius norm ``limit`` if it is larger (COFT)."""
    norm = torch.linalg.vector_norm(s, dim=(1, 2), keepdim=True)
    return torch.where(norm <= limit, s, s / norm * limit)


def cayley(s: torch.Tensor) -> torch.Tensor:
    """``(I + S)⁻¹(I − S)`` for a batch of skew-symmetric ``S`` (equal to ``(I − S)(I + S)⁻¹``)."""
    eye = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    return solve_unpivoted(eye + s, eye - s)


def cayley_neumann_series(s: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's Cayley–Neumann rotation ``I + 2S + … + 2S^{m−1} + S^m`` (module docstring)."""
    rotation = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    if terms <= 1:
        return rotation.clone()
    rotation = rotation + 2 * s
    if terms == 2:
        return rotation
    last = max(3, terms - 1)
    power = s
    for _ in range(2, last):
        power = power @ s
        rotation = rotation + 2 * power
    return rotation + power @ s


def solve_unpivoted(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``a⁻¹·rhs`` for a batch ``[n, b, b]`` by Gauss–Jordan elimination without pivoting.

    Only for matrices whose symmetric part is positive definite (``I + S``, ``S`` skew), where
    elimination without pivoting is stable. Written with plain tensor ops so it exports to ONNX.
    """
    size = a.shape[-1]
    augmented = torch.cat([a, rhs], dim=-1)
    eye = torch.eye(size, dtype=a.dtype)
    for k in range(size):
        pivot_row = augmented[:, k : k + 1, :] / augmented[:, k : k + 1, k : k + 1]
        # Subtracting (column k − e_k) ⊗ pivot row clears column k elsewhere and sets row k to the
        # normalised pivot row, without writing in place.
        augmented = augmented - (augmented[:, :, k : k + 1] - eye[:, k : k + 1]) * pivot_row
    return augmented[:, :, size:]


def rotate_columns(matrix: torch.Tensor, blocks: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """``matrix·diag(blocks)ᵀ`` (``transpose``) or ``matrix·diag(blocks)`` over ``[rows, k·b]`` columns.

    ``blocks`` is ``[k, b, b]``, or ``[1, b, b]`` repeated ``k`` times (``block_share``).
    """
    rows, columns = matrix.shape
    size = blocks.shape[-1]
    count = columns // size
    blocks = blocks.expand(count, size, size)
    if transpose:
        blocks = blocks.transpose(1, 2)
    grouped = matrix.reshape(rows, count, size).transpose(0, 1)  # [k, rows, b]
    return (grouped @ blocks).transpose(0, 1).reshape(rows, columns)


FIELDS = common.Fields(
    honoured=(
        "r",
        "oft_block_size",
        "block_share",
        "use_cayley_neumann",
        "num_cayley_neumann_terms",
        "coft",
        "eps",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={
        "module_dropout": "multiplicative dropout acts only in training",
        "init_weights": "initialisation only (the trained parameters are in the file)",
        "fan_in_fan_out": "PEFT's OFT adapts only nn.Linear, nn.Conv2d and nn.Embedding, whose layouts are fixed "
        "(it resets the flag to False)",
    },
    # PEFT's dataclass defaults, for configs written without a field.
    defaults={
        "r": 0,
        "oft_block_size": 32,
        "block_share": False,
        "use_cayley_neumann": True,
        "num_cayley_neumann_terms": 5,
        "coft": False,
        "eps": 6e-5,
        "bias": "none",
    },
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear", "Conv2d", "Embedding")
ROLES = {"oft_R.weight": "oft_R", "oft_embedding_R.weight": "oft_embedding_R"}


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an OFT adapter against the base model's modules.

    Raises:
        InputError: a key that maps to no targeted module, a targeted module without a rotation, a
            tensor whose shape disagrees with the module and config (naming key and both shapes), or an
            invalid ``r``/``oft_block_size``/``bias``.
        UnsupportedError: a target that is not an ``nn.Linear``, 1×1 ``nn.Conv2d`` or ``nn.Embedding``;
            an OFT checkpoint from PEFT < 0.14.
    """
    cfg = source.config
    honoured, ignored = common.classify_fields(source, "OFT", FIELDS)
    common.check_number(source, "r", "oft_block_size", "num_cayley_neumann_terms", "eps")
    if "oft_block_size" not in cfg:
        raise UnsupportedError(
            f"{source.config_path}: no oft_block_size: this OFT adapter was saved by PEFT < 0.14, whose OFT format "
            "current PEFT no longer loads; retrain it with PEFT >= 0.14"
        )
    if cfg.get("bias", "none") not in ("none", "all", "oft_only"):
        raise InputError(f"{source.config_path}: bias={cfg['bias']!r}; expected 'none', 'all' or 'oft_only'")
    if cfg.get("target_modules") is None:
        raise InputError(f"{source.config_path}: OFT config has no target_modules")
    # A field written as null means PEFT's default.
    settings = {k: FIELDS.defaults[k] if honoured[k] is None else honoured[k] for k in FIELDS.defaults}
    warnings: list[str] = []
    if settings["use_cayley_neumann"] and _older_than(cfg.get("peft_version"), (0, 18)):
        warnings.append(
            f"use_cayley_neumann with peft_version={cfg.get('peft_version')!r}: PEFT 0.18 changed the Cayley-Neumann "
            "series and adapters saved before it were trained with the old one; like current PEFT, peftc uses the "
            "new one, so outputs may differ from the trained model's"
        )

    grouped = common.group_keys(source, modules, common.suffix_roles(ROLES), refuse=_old_format)
    layouts = common.layouts(source, grouped, modules, "OFT", TYPES)
    sites = [
        _site(source, modules[path], layouts[path], tensors, modules, settings, warnings)
        for path, tensors in sorted(grouped.modules.items())
    ]
    return common.adapter(source, "oft", sites, grouped, honoured, ignored, warnings)


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
    role = "oft_embedding_R" if layout == "embedding" else "oft_R"
    wrong = next((t for r, t in tensors.items() if r != role), None)
    if wrong is not None:
        raise InputError(
            f"{source.describe(wrong.key)}: {module.class_name} {path!r} keeps its OFT rotation in {role}, "
            "so PEFT would not load this key"
        )
    common.require_roles(source, path, tensors, [role])
    shape = modules.state_shapes[module.params["weight"]]
    if layout == "conv":
        _check_conv(source, module, shape)
    if layout == "embedding" and _renormalises(module):
        raise UnsupportedError(
            f"{source.config_path.name}: OFT on embedding {path!r} with max_norm (PEFT renormalises the base rows "
            "in place before rotating them, which no weight transform reproduces)"
        )
    inputs = shape[1] if layout != "conv" else shape[1] * shape[2] * shape[3]
    blocks, size = fit_blocks(source, path, inputs, int(settings["r"]), int(settings["oft_block_size"]), warnings)
    share = bool(settings["block_share"])
    expected = (1 if share else blocks, size * (size - 1) // 2)
    common.expect_shape(
        source,
        tensors[role],
        expected,
        f"{list(expected)}: {'one shared block' if share else f'{blocks} blocks'} of size {size} "
        f"({size}·{size - 1}/2 entries) over the {inputs} inputs of {path!r} (weight {list(shape)})",
    )
    neumann = bool(settings["use_cayley_neumann"])
    terms = int(settings["num_cayley_neumann_terms"])
    scalars = {
        "block_size": size,
        "cayley_neumann": neumann,
        "neumann_terms": terms,
        "coft": bool(settings["coft"]),
        "eps": float(settings["eps"]),
        "layout": layout,
    }
    info = {
        "module_type": module.class_name,
        "block_size": size,
        "blocks": blocks,
        "block_share": share,
        "parametrisation": f"cayley-neumann ({terms} terms)" if neumann else "cayley",
    }
    return Site(path, OFT_WEIGHT.name, {"oft_R": tensors[role]}, scalars, info, "weight")


def fit_blocks(
    source: AdapterSource, path: str, inputs: int, r: int, block_size: int, warnings: list[str]
) -> tuple[int, int]:
    """``(blocks, block size)`` over ``inputs`` from ``r`` or ``oft_block_size``, as PEFT derives them."""
    if (r == 0) == (block_size == 0):
        raise InputError(
            f"{source.config_path}: r={r}, oft_block_size={block_size}: exactly one of them must be non-zero"
        )
    given, name = (block_size, "oft_block_size") if block_size else (r, "r")
    fitted = given if inputs % given == 0 and given <= inputs else _nearest_divisor(inputs, given)
    if fitted != given:
        warnings.append(f"{name}={given} does not divide the {inputs} inputs of {path!r}; using {fitted}, as PEFT does")
    return (inputs // fitted, fitted) if block_size else (fitted, inputs // fitted)


def _nearest_divisor(n: int, value: int) -> int:
    """The divisor of ``n`` nearest ``value`` (the lower one on a tie; ``n`` if ``value ≥ n``): PEFT's rule."""
    if value >= n:
        return n
    lower = next(d for d in range(value, 0, -1) if n % d == 0)
    higher = next(d for d in range(value, n + 1) if n % d == 0)
    return lower if value - lower <= higher - value else higher


def _check_conv(source: AdapterSource, module: ModuleInfo, shape: tuple[int, ...]) -> None:
    where = f"{source.config_path.name}: OFT on {module.class_name} {module.path!r}"
    attrs = conv_attributes(module) or {}
    if attrs.get("groups", 1) != 1:
        raise UnsupportedError(
            f"{where} (groups={attrs['groups']}): the rotation mixes all input channels, which no grouped kernel "
            "holds (PEFT's merge fails on it too)"
        )
    if any(d != 1 for d in attrs.get("dilation", ())):
        raise UnsupportedError(f"{where} (dilation={list(attrs['dilation'])}): PEFT refuses dilated convolutions")
    if tuple(shape[2:]) != (1, 1):
        raise UnsupportedError(
            f"{where} with a {shape[2]}×{shape[3]} kernel: PEFT's forward rotates overlapping input patches and sums "
            "them back, which changes outputs even at the identity rotation and is not the transform its merge() "
            "writes, so there is no single PEFT result to reproduce; peftc supports OFT on 1×1 convolutions"
        )


def _renormalises(module: ModuleInfo) -> bool:
    """Whether the embedding's call renormalises rows (``max_norm``)."""
    return any("renorm" in str(n.target) for call in module.calls for n in call.nodes)


def _old_format(path: str) -> str | None:
    if ".oft_r." in path or path.endswith(".oft_r"):
        return "an OFT key of PEFT < 0.14 (oft_r), whose format current PEFT no longer loads; retrain the adapter"
    return None


def _older_than(version: object, minimum: tuple[int, int]) -> bool:
    """Whether a ``peft_version`` string is below ``minimum``; an absent one is (it appeared in 0.18)."""
    if not isinstance(version, str):
        return True
    try:
        major, minor = (int(part) for part in version.partition("@")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < minimum


METHOD = Method("oft", ("OFT",), parse, ops=(OFT_WEIGHT,), fields=FIELDS)
