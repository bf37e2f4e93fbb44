"""WaveFT, wavelet fine-tuning (PEFT ``WAVEFT``): its weight transform and peftc's parser.

WaveFT trains ``n`` coefficients ``c_k`` per layer at fixed positions ``(r_k, s_k)`` of the
``M×N`` weight (``M = d_out``, ``N = d_in``). With ``use_idwt`` (the default) they are wavelet
coefficients and the update is their one-level inverse 2-D discrete wavelet transform::

    D      = zeros(H, W);  D[r_k + ⌊(H−M)/2⌋, s_k + ⌊(W−N)/2⌋] = c_k
             H = M + L − 2 (+1 if odd), W = N + L − 2 (+1 if odd), L the filter length
    [[A, Hd], [V, Dg]] = the four quadrants of D
    R      = conv_transpose2d(stack(A, Hd, V, Dg), [lo⊗lo, hi⊗lo, lo⊗hi, hi⊗hi], stride 2),
             cropped by ⌊(2L−3)/2⌋ on every side
    ΔW     = scaling · R cropped (centred) to M×N

with ``lo``/``hi`` the wavelet's reconstruction filters; without ``use_idwt``, ``ΔW = scaling · D``
at the unpadded positions. PEFT's forward adds ``x ΔWᵀ`` and its merge adds ``ΔW`` (transposed for
GPT-2's ``Conv1D``): the same function. peftc computes the same steps with ``index_add`` and
``conv_transpose2d`` (both lower to ONNX), in fp32, cast back to ``W``'s dtype.

**Filters.** PEFT takes the filters from PyWavelets' tables. peftc derives the Daubechies filters
``db1``…``db10`` itself, by spectral factorisation (the minimum-phase root of each pair of
``P(y) = Σ_k C(N−1+k, k) yᵏ``, ``y = (2 − z − z⁻¹)/4``; ``sym2``/``sym3`` are ``db2``/``db3``), and
the tests check them against PEFT's. Other symlets and the coiflets are refused (peftc has no
derivation of them); families beyond those PEFT 0.21 carries (``db11``+, ``sym11``+, ``coif6``+) are
refused because PEFT's own forward fails on them.

**Positions.** PEFT does not save them: it draws ``randperm(M·N)[:n]`` from a fresh CPU
``torch.Generator`` seeded with ``random_loc_seed`` per layer (row ``i // N``, column ``i mod N``),
and so does peftc. ``n`` is ``n_frequency`` (or ``n_frequency_pattern``, by PEFT's pattern rule);
with ``proportional_parameters`` PEFT shares ``n_frequency × targets`` among the targets by weight
size, ``max(1, round(M·N / Σ M·N × budget))``, and so does peftc.

**Adapter files.** Keys: ``<m>.waveft_spectrum`` ``[n]`` per target (``nn.Linear`` or GPT-2
``Conv1D``). Trained biases (``bias``) and ``modules_to_save`` tensors are full replacements. Each
target becomes one ``waveft_weight`` site on its weight.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, peft_config, per_module
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.fourierft import frequencies
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

WAVEFT_WEIGHT = SiteOp(
    name="waveft_weight",
    form="weight",
    tensor_roles=("waveft_indices", "waveft_spectrum", "waveft_filters"),
    scalars=("scaling", "layout"),
)


def delta_weight(
    indices: torch.Tensor, spectrum: torch.Tensor, filters: torch.Tensor | None, d_out: int, d_in: int
) -> torch.Tensor:
    """The unscaled ``[d_out, d_in]`` update in fp32 (module docstring); ``filters`` ``[2, L]`` (lo, hi),
    or None without the inverse transform."""
    rows, columns = indices[0].to(torch.int64), indices[1].to(torch.int64)
    values = spectrum.to(torch.float32)
    if filters is None:
        return torch.zeros(d_out * d_in).index_add(0, rows * d_in + columns, values).reshape(d_out, d_in)
    size = filters.shape[1]
    height = d_out + size - 2 + (d_out + size - 2) % 2
    width = d_in + size - 2 + (d_in + size - 2) % 2
    flat = (rows + (height - d_out) // 2) * width + columns + (width - d_in) // 2
    dense = torch.zeros(height * width).index_add(0, flat, values).reshape(height, width)
    half_h, half_w = height // 2, width // 2
    quadrants = [dense[:half_h, :half_w], dense[:half_h, half_w:], dense[half_h:, :half_w], dense[half_h:, half_w:]]
    lo, hi = filters.to(torch.float32)
    kernels = torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)])
    image = torch.nn.functional.conv_transpose2d(torch.stack(quadrants).unsqueeze(0), kernels.unsqueeze(1), stride=2)
    trim = (2 * size - 3) // 2
    image = image[0, 0, trim : image.shape[2] - trim, trim : image.shape[3] - trim]
    top, left = (image.shape[0] - d_out) // 2, (image.shape[1] - d_in) // 2
    return image[top : top + d_out, left : left + d_in]


@composite_op(
    "waveft_weight(Tensor weight, Tensor waveft_indices, Tensor waveft_spectrum, Tensor? waveft_filters, "
    "float scaling, str layout) -> Tensor"
)
def waveft_weight(
    weight: torch.Tensor,
    waveft_indices: torch.Tensor,
    waveft_spectrum: torch.Tensor,
    waveft_filters: torch.Tensor | None,
    scaling: float,
    layout: str,
) -> torch.Tensor:
    """``W + scaling·ΔW`` for a ``linear`` or ``linear_t`` weight (fp32, cast back to ``W``'s dtype)."""
    matrix = as_out_in(weight.to(torch.float32), layout)
    delta = delta_weight(waveft_indices, waveft_spectrum, waveft_filters, matrix.shape[0], matrix.shape[1])
    return from_out_in(matrix + delta * scaling, weight, layout).to(weight.dtype)


def daubechies(order: int) -> list[float]:
    """The reconstruction low-pass filter of Daubechies' wavelet ``db<order>`` (length ``2·order``)."""
    zeros = []
    if order > 1:
        for y in np.roots([math.comb(order - 1 + k, k) for k in range(order)][::-1]):
            pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])  # y = (2 − z − 1/z)/4
            zeros.append(pair[np.argmin(np.abs(pair))])  # minimum phase: the root inside the unit circle
    taps = np.real(np.poly([-1.0] * order + zeros))
    return list(taps * (math.sqrt(2.0) / taps.sum()))


PEFT_FAMILIES = {
    **{f"db{i}": i for i in range(1, 11)},
    **{f"sym{i}": i if i <= 3 else 0 for i in range(2, 11)},  # sym2, sym3 are db2, db3
    **{f"coif{i}": 0 for i in range(1, 6)},
}
"""The wavelet families PEFT 0.21 has filters for, with the Daubechies order peftc derives them from (0: none)."""


def filter_bank(family: str, where: object = "adapter_config.json") -> torch.Tensor:
    """``[2, L]``: the reconstruction low- and high-pass filters of ``family`` (PyWavelets' convention);
    ``where`` (the config file) starts the error messages.

    Raises:
        UnsupportedError: a family PEFT has no filters for, or one peftc does not derive.
    """
    if family not in PEFT_FAMILIES:
        raise UnsupportedError(
            f"{where}: wavelet_family={family!r}: PEFT 0.21 has no filters for it (its forward fails); "
            "it has db1-db10, sym2-sym10 and coif1-coif5"
        )
    order = PEFT_FAMILIES[family]
    if not order:
        raise UnsupportedError(
            f"{where}: wavelet_family={family!r}: peftc derives the Daubechies filters db1-db10 (and "
            "sym2/sym3, which equal db2/db3), not the other symlets or the coiflets"
        )
    lo = daubechies(order)
    hi = [(-1) ** i * lo[len(lo) - 1 - i] for i in range(len(lo))]
    return torch.tensor([lo, hi], dtype=torch.float64).to(torch.float32)


FIELDS = common.Fields(
    honoured=(
        "n_frequency",
        "n_frequency_pattern",
        "proportional_parameters",
        "scaling",
        "wavelet_family",
        "use_idwt",
        "random_loc_seed",
        "fan_in_fan_out",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={"init_weights": "initialisation only (the trained coefficients are in the file)"},
    defaults={
        "n_frequency": 2592,
        "scaling": 25.0,
        "wavelet_family": "db1",
        "use_idwt": True,
        "random_loc_seed": 777,
        "bias": "none",
    },
)
TYPES = (*per_module.LINEAR_TYPES, "Conv1D")


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a WaveFT adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without coefficients, a spectrum
            whose length is not the module's ``n`` (naming the key and both shapes), more coefficients
            than the weight has entries, or a bad ``random_loc_seed``.
        UnsupportedError: a config field peftc does not know, a target that is not ``nn.Linear`` or GPT-2
            ``Conv1D``, or a wavelet family peftc has no filters for (``filter_bank``).
    """
    read = per_module.read_targets(
        source,
        modules,
        peft_type="WAVEFT",
        title="WaveFT",
        fields=FIELDS,
        roles={"waveft_spectrum": "spectrum"},
        types=TYPES,
        required=("spectrum",),
    )
    common.check_number(source, "scaling", "n_frequency")
    setting = {name: per_module.setting(read, FIELDS, name) for name in FIELDS.defaults}
    seed = per_module.positive_int(source, "random_loc_seed", setting["random_loc_seed"], minimum=0)
    use_idwt = bool(setting["use_idwt"])
    filters = None
    if use_idwt:
        bank = filter_bank(str(setting["wavelet_family"]), source.config_path)
        filters = AdapterTensor(f"{setting['wavelet_family']} reconstruction filters", bank, shared=True)
    sizes = {t.path: (t.d_out, t.d_in) for t in read.targets}
    counts = _frequencies(source, read, sizes, int(setting["n_frequency"]))
    sites, warnings = [], []
    for target in read.targets:
        d_out, d_in = sizes[target.path]
        per_module.note_fan_in_fan_out(source.config.get("fan_in_fan_out", False), target, warnings)
        n = per_module.positive_int(source, f"n_frequency for {target.path!r}", counts[target.path])
        if n > d_out * d_in:
            raise InputError(
                f"{source.config_path}: n_frequency={n} for {target.describe()} is more than its {d_out * d_in} "
                "weights (PEFT refuses it too)"
            )
        spectrum = target.tensors["spectrum"]
        common.expect_shape(source, spectrum, (n,), f"[n_frequency={n}] for {target.describe()}")
        drawn = frequencies(seed, n, d_out, d_in)
        indices = AdapterTensor(f"positions of {target.path} redrawn from random_loc_seed={seed}", drawn)
        info = {"module_type": target.info.class_name, "n_frequency": n, "wavelet": setting["wavelet_family"]}
        tensors = {"waveft_indices": indices, "waveft_spectrum": spectrum, "waveft_filters": filters}
        scalars = {"scaling": float(setting["scaling"]), "layout": target.layout}
        sites.append(Site(target.path, WAVEFT_WEIGHT.name, tensors, scalars, info, "weight"))
    return common.adapter(source, "waveft", sites, read.grouped, read.honoured, read.ignored, warnings)


def _frequencies(
    source: AdapterSource, read: per_module.Read, sizes: dict[str, tuple[int, int]], default: int
) -> dict[str, object]:
    """Each target's ``n``: proportional shares of the budget, or ``n_frequency_pattern`` / ``n_frequency``."""
    if read.honoured.get("proportional_parameters"):
        total = sum(d_out * d_in for d_out, d_in in sizes.values())
        budget = default * len(sizes)
        # The same float expression as PEFT's, so Python's round() sees the same value.
        return {path: max(1, round((d_in * d_out) / total * budget)) for path, (d_out, d_in) in sizes.items()}
    pattern = source.config.get("n_frequency_pattern")
    return {path: peft_config.pattern_value(pattern, path, default) for path in sizes}


METHOD = Method("waveft", ("WAVEFT",), parse, ops=(WAVEFT_WEIGHT,), fields=FIELDS)
