"""LoRA on ``nn.MultiheadAttention`` (PEFT's ``lora.MultiheadAttention``).

``nn.MultiheadAttention`` has no linear layers to hook: it reads ``in_proj_weight`` (``[3E, E]``, the
query, key and value projections stacked) and ``out_proj.weight`` (``[E, E]``; ``out_proj`` itself is
never called) inside its own call. PEFT's layer therefore adapts both weights, with the same rank and
scale (the attention module's ``r``/``lora_alpha``, ``rank_pattern``/``alpha_pattern`` entry)::

    in_proj_weight'  = in_proj_weight  + s · B_in A_in            (A_in [r, E], B_in [3E, r])
    out_proj.weight' = out_proj.weight + 2 · s · B_out A_out      (A_out [r, E], B_out [E, r])

Its ``forward`` merges both, calls the attention and unmerges, so forward and merge are the same
function by construction. The factor 2 is PEFT's: its ``merge`` adds the out-projection update itself
and then again through the wrapped ``out_proj``'s own ``merge`` (measured with PEFT 0.21.2: the merged
``out_proj.weight`` equals ``W + 2·s·B A`` to 3e-8; a fix is proposed upstream, huggingface/peft
pull request 3774). Training ran through that forward, so ``2·s`` is what the trained factors mean;
peftc reproduces it and says so in a warning. peftc puts a ``lora_weight`` weight site on each
parameter.

**Adapter files.** ``<m>.lora_A.weight``, ``<m>.lora_B.weight`` (in-projection) and
``<m>.base_layer.out_proj.lora_A.weight``, ``…lora_B.weight`` (out-projection).

Refused, each with the reason: DoRA (PEFT refuses it on this layer), ``lora_bias`` (PEFT's merge
ignores the in-projection's ``lora_B.bias``, so it would not be what training used), attention with
separate query/key/value weights (``kdim``/``vdim`` ≠ ``embed_dim``; PEFT refuses it), and LoRA on the
``out_proj`` of a ``nn.MultiheadAttention`` targeted by itself (PEFT's unmerged forward never calls
``out_proj``, so it ignores that LoRA while its merge applies it).
"""

from __future__ import annotations

from peftc.errors import UnsupportedError
from peftc.ir.modules import ModuleInfo, ModuleTable
from peftc.methods import common
from peftc.methods.base import AdapterSource, AdapterTensor, Site
from peftc.methods.lora.ops import LORA_WEIGHT

TYPE = "MultiheadAttention"
OUT = ".base_layer.out_proj"
OUT_PROJ_APPLICATIONS = 2
"""How many times PEFT's layer adds the out-projection update (module docstring)."""


def fold_out_proj(source: AdapterSource, grouped: common.Grouped, modules: ModuleTable) -> None:
    """Move each attention module's out-projection factors (``<m>.base_layer.out_proj``) to ``<m>`` as
    roles ``out_lora_A``/``out_lora_B``; refuse LoRA on an attention's ``out_proj`` targeted alone."""
    for path in sorted(grouped.modules):
        owner = path.removesuffix(OUT)
        if owner != path and _is_attention(modules, owner):
            for role, tensor in grouped.modules.pop(path).items():
                grouped.modules.setdefault(owner, {})[f"out_{role}"] = tensor
            continue
        parent, _, local = path.rpartition(".")
        if local == "out_proj" and _is_attention(modules, parent):
            key = next(iter(grouped.modules[path].values())).key
            raise UnsupportedError(
                f"{source.describe(key)}: LoRA on the out_proj of nn.MultiheadAttention {parent!r}: PEFT's unmerged "
                "forward never calls out_proj, so it ignores this LoRA while its merge applies it; target "
                f"{parent!r} itself (PEFT then adapts both of its projections)"
            )


def _is_attention(modules: ModuleTable, path: str) -> bool:
    return path in modules and modules[path].class_name == TYPE


def is_attention(module: ModuleInfo) -> bool:
    """Whether LoRA on ``module`` takes this file's form."""
    return module.class_name == TYPE


def sites(
    source: AdapterSource,
    module: ModuleInfo,
    tensors: dict[str, AdapterTensor],
    modules: ModuleTable,
    rank_alpha,
    warnings: list[str],
) -> list[Site]:
    """One ``lora_weight`` site on ``in_proj_weight`` and one on ``out_proj.weight``.

    ``rank_alpha`` is the LoRA parser's ``(source, key) → (r, alpha, scale)``.
    """
    path = module.path
    where = f"{source.config_path.name}: LoRA on nn.MultiheadAttention {path!r}"
    if source.config.get("use_dora"):
        raise UnsupportedError(f"{where} with use_dora: PEFT refuses DoRA on this layer")
    if "in_proj_weight" not in module.params:
        raise UnsupportedError(
            f"{where}, which has separate query/key/value weights (kdim or vdim differ from embed_dim): PEFT refuses it"
        )
    bias = next((t for role, t in tensors.items() if role.endswith("lora_B_bias")), None)
    if bias is not None:
        raise UnsupportedError(
            f"{source.describe(bias.key)}: lora_bias on nn.MultiheadAttention {path!r}: PEFT's merge, which is its "
            "forward on this layer, ignores the in-projection's lora_B.bias"
        )
    common.require_roles(source, path, tensors, ["lora_A", "lora_B", "out_lora_A", "out_lora_B"])
    unknown = sorted(set(tensors) - {"lora_A", "lora_B", "out_lora_A", "out_lora_B"})
    if unknown:
        raise UnsupportedError(f"{source.describe(tensors[unknown[0]].key)}: not a LoRA tensor of {where}")
    r, alpha, scale = rank_alpha(source, path)
    info = {"module_type": TYPE, "r": r, "alpha": alpha}
    found = []
    warnings.append(
        f"LoRA on nn.MultiheadAttention {path!r}: the out-projection update is applied {OUT_PROJ_APPLICATIONS}× "
        f"(scale {OUT_PROJ_APPLICATIONS}·{scale:g}), as PEFT {source.config.get('peft_version') or ''} trains and "
        "runs it (huggingface/peft pull request 3774 proposes applying it once)"
    )
    for param, prefix, times in (("in_proj_weight", "", 1), ("out_proj.weight", "out_", OUT_PROJ_APPLICATIONS)):
        # A table built without tracing lists out_proj as a module of its own.
        d_out, d_in = modules.state_shapes[module.params.get(param, f"{path}.{param}")]
        a, b = tensors[f"{prefix}lora_A"], tensors[f"{prefix}lora_B"]
        base = f"(base {param} [{d_out}, {d_in}])"
        common.expect_shape(source, a, (r, d_in), f"[r={r}, d_in={d_in}] {base}")
        common.expect_shape(source, b, (d_out, r), f"[d_out={d_out}, r={r}] {base}")
        scalars = {"scale": times * scale, "layout": "linear"}
        found.append(Site(path, LORA_WEIGHT.name, {"lora_A": a, "lora_B": b}, scalars, info, param))
    return found
