"""The residual bases some LoRA initialisations train on (``init_lora_weights``).

PiSSA and OLoRA subtract the adapter's initial update from the base weight before training, so the
adapter only reproduces the fine-tuned model on that *residual* base. peftc rebuilds it exactly from
the original weight, in PEFT's order of operations (PiSSA: ``W − s·B₀A₀`` from the SVD; OLoRA:
``W − s·Q_r R_r`` from the QR decomposition). Initialisations whose base cannot be rebuilt exactly
(``pissa_niter_*``, CorDA, LoRA-GA, LoftQ) are refused with how to convert the adapter, unless the
given base already is the residual one (``--base-residual``).
"""

from __future__ import annotations

import torch

from peftc.errors import UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import AdapterSource, AdapterTensor, Replacement, Site
from peftc.methods.lora.dora import DORA_WEIGHT
from peftc.methods.lora.ops import LORA_BIAS

CONVERT = (
    "convert it to a plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...), "
    "or compile against the residual base it was trained on with --base-residual"
)
REBUILT_INITS = ("pissa", "olora")
REFUSED_INITS = ("pissa_niter", "corda", "lora_ga", "loftq")


def check_init(source: AdapterSource, base_residual: bool) -> str:
    """``init_lora_weights`` lower-cased; refused if it means a base peftc cannot rebuild (unless the
    given base already is the residual base, ``base_residual``)."""
    cfg = source.config
    init = str(cfg.get("init_lora_weights", True)).lower()
    loftq = cfg.get("loftq_config") not in (None, {}, [])
    if base_residual:
        return init
    if init.startswith(REFUSED_INITS) or loftq:
        name = "loftq" if loftq and not init.startswith(REFUSED_INITS) else init
        raise UnsupportedError(
            f"{source.config_path}: init_lora_weights={cfg.get('init_lora_weights')!r}"
            f"{' with loftq_config' if loftq else ''} means the adapter was trained on a modified base ({name}) that "
            f"peftc cannot rebuild exactly, so merging into the original base would be silently wrong; {CONVERT}"
        )
    return init


def residuals(source: AdapterSource, init: str, sites: list[Site], modules: ModuleTable) -> list[Replacement]:
    """The residual base a PiSSA/OLoRA adapter was trained on, rebuilt from the original weights."""
    out = []
    for site in sites:
        module = modules[site.module]
        layout = common.LAYOUT_OF.get(module.class_name)
        if site.op == LORA_BIAS.name:
            continue
        if site.param not in (None, "weight") or layout not in ("linear", "linear_t") or site.op == DORA_WEIGHT.name:
            raise UnsupportedError(
                f"{source.config_path.name}: a {init} residual base for {site.op} on {site.module!r} is not supported; {CONVERT}"
            )
        if init == "olora" and layout != "linear":
            raise UnsupportedError(
                f"{source.config_path.name}: OLoRA residual on {module.class_name} {site.module!r} is not supported"
            )
        fqn = module.params["weight"]
        r, scale = site.info["r"], site.scalars["scale"]
        residual, what = _residual(source, init, modules.tensors[fqn], r, scale, layout, site.module)
        out.append(Replacement(fqn, AdapterTensor(f"{what} of {fqn}", residual), what))
    return out


def _residual(
    source: AdapterSource, init: str, weight: torch.Tensor, r: int, scale: float, layout: str, path: str
) -> tuple[torch.Tensor, str]:
    """One residual weight, computed in PEFT's order of operations (fp32, cast back).

    PiSSA's residual is only defined when the r-th and (r+1)-th singular values differ: with a tie
    the kept subspace is arbitrary, so it is refused rather than guessed.
    """
    w = weight.to(torch.float32)
    if init == "pissa":
        matrix = w.T if layout == "linear_t" else w
        v, s, uh = torch.linalg.svd(matrix, full_matrices=False)
        if r < s.numel() and float(s[r - 1] - s[r]) <= 1e-6 * float(s[0]):
            raise UnsupportedError(
                f"{source.config_path.name}: PiSSA on {path!r}: singular values {r} and {r + 1} of the base weight "
                f"are equal, so the residual base it was trained on cannot be rebuilt; {CONVERT}"
            )
        root = torch.sqrt(s[:r] / scale)
        lora_a = torch.diag(root) @ uh[:r]
        lora_b = v[:, :r] @ torch.diag(root)
        low = (scale * lora_b) @ lora_a
        residual = w - (low.T if layout == "linear_t" else low)
        return residual.to(weight.dtype), f"PiSSA residual base W − s·B₀A₀ (r={r})"
    q, rr = torch.linalg.qr(w)
    residual = w - (scale * q[:, :r]) @ rr[:r]
    return residual.to(weight.dtype), f"OLoRA residual base W − s·Q_r R_r (r={r})"
