"""FourierFT (PEFT ``FOURIERFT``): its weight transform and peftc's parser.

FourierFT trains ``n`` spectral coefficients ``c_k`` per layer at fixed frequencies ``(u_k, v_k)``
of the ``M×N`` weight (``M = d_out``, ``N = d_in``); the update is the real part of the inverse 2-D
DFT of that sparse spectrum, times ``scaling``::

    ΔW[p, q] = scaling/(M·N) · Σ_k c_k · cos(2π (p·u_k/M + q·v_k/N))
             = scaling/(M·N) · (C_p diag(c) C_qᵀ − S_p diag(c) S_qᵀ),   C_p[p, k] = cos(2π·(p·u_k mod M)/M) …

which is what PEFT's ``torch.fft.ifft2(dense).real * scaling`` computes. PEFT's forward adds
``x ΔWᵀ`` to the base output and its merge adds ``ΔW`` (transposed for GPT-2's ``Conv1D``, whose
weight is ``[d_in, d_out]``) to ``W``: the same function. peftc writes the inverse DFT as the cosine
and sine sums above, with the phases reduced modulo ``M`` and ``N`` in integers, because FFTs do not
lower to every target (ONNX's DFT needs complex-free rewrites, TensorRT has none); it costs
``O(M·N·n)`` rather than an FFT's ``O(M·N·log(M·N))``. The sum is formed in fp32 (as PEFT's) and
cast back to ``W``'s dtype.

**Frequencies.** PEFT does not save them: it redraws them from ``random_loc_seed`` whenever it builds
the model, one fresh CPU ``torch.Generator`` per layer seeded with it, ``randperm(M·N)[:n]``, row
``u = i // N`` and column ``v = i mod N``. peftc redraws them the same way (so an adapter matches its
training run only under a torch that draws the same numbers, which PEFT assumes too).

**Adapter files.** Keys: ``<m>.fourierft_spectrum`` ``[n]`` per target (``nn.Linear`` or GPT-2
``Conv1D``), ``n`` from ``n_frequency`` or ``n_frequency_pattern`` (PEFT's rule: the first key
``k`` with ``re.match(rf".*\\.{k}$", path)``, else the key equal to the path). Trained biases
(``bias``) and ``modules_to_save`` tensors are full replacements. Each target becomes one
``fourierft_weight`` site on its weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from peftc.errors import InputError
from peftc.ir.modules import ModuleTable
from peftc.methods import common, per_module
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, as_out_in, composite_op, from_out_in

FOURIERFT_WEIGHT = SiteOp(
    name="fourierft_weight",
    form="weight",
    tensor_roles=("fourierft_indices", "fourierft_spectrum"),
    scalars=("scaling", "layout"),
)


def delta_weight(indices: torch.Tensor, spectrum: torch.Tensor, scaling: float, d_out: int, d_in: int) -> torch.Tensor:
    """``scaling · Re(ifft2(S))`` ``[d_out, d_in]`` in fp32 for the sparse spectrum ``S[indices] = spectrum``."""
    rows, columns = indices[0].to(torch.int64), indices[1].to(torch.int64)
    # Integer phases, reduced before scaling to radians, keep the angles exact for any frequency.
    out_phase = (torch.arange(d_out).unsqueeze(1) * rows.unsqueeze(0)) % d_out
    in_phase = (torch.arange(d_in).unsqueeze(1) * columns.unsqueeze(0)) % d_in
    out_angle = out_phase.to(torch.float32) * (2 * math.pi / d_out)  # [d_out, n]
    in_angle = in_phase.to(torch.float32) * (2 * math.pi / d_in)  # [d_in, n]
    coefficients = spectrum.to(torch.float32) * (scaling / (d_out * d_in))
    cosine = (torch.cos(out_angle) * coefficients) @ torch.cos(in_angle).T
    return cosine - (torch.sin(out_angle) * coefficients) @ torch.sin(in_angle).T


@composite_op(
    "fourierft_weight(Tensor weight, Tensor fourierft_indices, Tensor fourierft_spectrum, float scaling, "
    "str layout) -> Tensor"
)
def fourierft_weight(
    weight: torch.Tensor, fourierft_indices: torch.Tensor, fourierft_spectrum: torch.Tensor, scaling: float, layout: str
) -> torch.Tensor:
    """``W + ΔW`` for a ``linear`` or ``linear_t`` weight (fp32, cast back to ``W``'s dtype).

    Args:
        fourierft_indices: ``[2, n]`` integer frequencies (rows ``u``, columns ``v``).
        fourierft_spectrum: ``[n]`` coefficients.
    """
    matrix = as_out_in(weight.to(torch.float32), layout)
    delta = delta_weight(fourierft_indices, fourierft_spectrum, scaling, matrix.shape[0], matrix.shape[1])
    return from_out_in(matrix + delta, weight, layout).to(weight.dtype)


def frequencies(seed: int, n: int, d_out: int, d_in: int) -> torch.Tensor:
    """PEFT's frequencies for a ``[d_out, d_in]`` layer: ``[2, n]`` int64 (rows, columns)."""
    drawn = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([drawn // d_in, drawn % d_in])


FIELDS = common.Fields(
    honoured=(
        "n_frequency",
        "n_frequency_pattern",
        "scaling",
        "random_loc_seed",
        "fan_in_fan_out",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "bias",
        "modules_to_save",
    ),
    ignored={"init_weights": "initialisation only (the trained spectrum is in the file)"},
    defaults={"n_frequency": 1000, "scaling": 150.0, "random_loc_seed": 777, "bias": "none"},
)
TYPES = (*per_module.LINEAR_TYPES, "Conv1D")


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a FourierFT adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its spectrum, a spectrum
            whose length is not the module's ``n_frequency`` (naming the key and both shapes), more
            frequencies than the weight has entries, or a missing ``random_loc_seed``.
        UnsupportedError: a config field peftc does not know, or a target that is not ``nn.Linear`` or
            GPT-2 ``Conv1D``.
    """
    read = per_module.read_targets(
        source,
        modules,
        peft_type="FOURIERFT",
        title="FourierFT",
        fields=FIELDS,
        roles={"fourierft_spectrum": "spectrum"},
        types=TYPES,
        required=("spectrum",),
    )
    common.check_number(source, "scaling")
    cfg = source.config
    if "random_loc_seed" in cfg and cfg["random_loc_seed"] is None:
        raise InputError(
            f"{source.config_path}: random_loc_seed is null: PEFT draws the frequencies from it and cannot "
            "load this adapter either"
        )
    seed = per_module.positive_int(source, "random_loc_seed", cfg.get("random_loc_seed", 777), minimum=0)
    scaling = float(per_module.setting(read, FIELDS, "scaling"))
    sites, warnings = [], []
    for target in read.targets:
        d_out, d_in = target.d_out, target.d_in
        n = per_module.positive_int(source, f"n_frequency for {target.path!r}", n_frequency(cfg, target.path))
        if n > d_out * d_in:
            raise InputError(
                f"{source.config_path}: n_frequency={n} for {target.describe()} is more than its {d_out * d_in} "
                "weights (PEFT refuses it too)"
            )
        spectrum = target.tensors["spectrum"]
        common.expect_shape(source, spectrum, (n,), f"[n_frequency={n}] for {target.describe()}")
        per_module.note_fan_in_fan_out(cfg.get("fan_in_fan_out", False), target, warnings)
        drawn = frequencies(seed, n, d_out, d_in)
        indices = AdapterTensor(f"frequencies of {target.path} redrawn from random_loc_seed={seed}", drawn)
        info = {"module_type": target.info.class_name, "n_frequency": n, "scaling": scaling}
        tensors = {"fourierft_indices": indices, "fourierft_spectrum": spectrum}
        scalars = {"scaling": scaling, "layout": target.layout}
        sites.append(Site(target.path, FOURIERFT_WEIGHT.name, tensors, scalars, info, "weight"))
    return common.adapter(source, "fourierft", sites, read.grouped, read.honoured, read.ignored, warnings)


def n_frequency(cfg: Mapping[str, Any], path: str) -> Any:
    """``n_frequency`` for the module at ``path`` (``n_frequency_pattern`` by PEFT's rule)."""
    default = cfg.get("n_frequency")
    return per_module.suffix_pattern(
        cfg.get("n_frequency_pattern"), path, FIELDS.defaults["n_frequency"] if default is None else default
    )


METHOD = Method("fourierft", ("FOURIERFT",), parse, ops=(FOURIERFT_WEIGHT,), fields=FIELDS)
