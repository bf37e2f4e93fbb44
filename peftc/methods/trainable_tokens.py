"""Trainable tokens (PEFT ``TRAINABLE_TOKENS``; LoRA's ``trainable_token_indices``) and peftc's parser.

Rows of an embedding matrix are replaced by trained values::

    W' = W with rows ``indices`` replaced by ``values``   (replacement, not addition)

The indices come from the adapter config (``trainable_token_indices``); a tied output layer reads the
same rows.

**Adapter files.** Keys: ``<embedding>.trainable_tokens_delta`` (``peft_type: "TRAINABLE_TOKENS"``,
indices in ``token_indices``) or ``<embedding>.token_adapter.trainable_tokens_delta`` (LoRA, indices
in ``trainable_token_indices``), ``[n tokens, dim]``. Each becomes a ``tokens_weight`` site on the
embedding, and on an output layer tied to it where the model declares the tie (PEFT follows ties)."""

from __future__ import annotations

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

TOKENS_WEIGHT = SiteOp(name="tokens_weight", form="weight", tensor_roles=("indices", "values"), scalars=())


@composite_op("tokens_weight(Tensor weight, Tensor indices, Tensor values) -> Tensor")
def tokens_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``W.index_copy(0, indices, values)``."""
    return weight.index_copy(0, indices.to(torch.int64), values.to(weight.dtype))


FIELDS = common.Fields(
    honoured=("token_indices", "target_modules"),
    ignored={"init_weights": "initialisation only (the trained rows are in the file)"},
)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret a ``TRAINABLE_TOKENS`` adapter against the base model's modules.

    Raises:
        InputError: rows for a module that is not a targeted embedding, or whose count or width
            disagrees with ``token_indices`` and the embedding (naming key and shapes).
        UnsupportedError: a tie peftc cannot resolve (see :func:`sites`).
    """
    honoured, ignored = common.classify_fields(source, "TRAINABLE_TOKENS", FIELDS)
    spec = source.config.get("token_indices")
    if not spec:
        raise InputError(f"{source.config_path}: TRAINABLE_TOKENS config has no token_indices")
    grouped = common.group_keys(
        source, modules, common.suffix_roles({"trainable_tokens_delta": "tokens"}), bias_field=None
    )
    common.check_modules(source, grouped, modules, common.targeted_modules(source.config, modules))
    found: list[Site] = []
    for path, tensors in sorted(grouped.modules.items()):
        found += sites(source, path, tensors["tokens"], spec, modules, options.tied_embeddings)
    return common.adapter(source, "trainable_tokens", found, grouped, honoured, ignored)


def sites(
    source: AdapterSource,
    path: str,
    values: AdapterTensor,
    spec: list[int] | dict[str, list[int]],
    modules: ModuleTable,
    tied_embeddings: bool | None,
) -> list[Site]:
    """``tokens_weight`` sites replacing rows ``spec`` of embedding ``path`` (and of its tied output layer).

    Args:
        spec: the token indices, or a mapping from embedding name (suffix) to indices.
        tied_embeddings: whether the model declares its output layer tied to the input embedding
            (PEFT replaces the rows there too only then); None when unknown.
    """
    indices = (
        spec
        if isinstance(spec, list)
        else next((v for k, v in spec.items() if path == k or path.endswith("." + k)), None)
    )
    if indices is None:
        raise InputError(f"{source.describe(values.key)}: module {path!r} is not named in the token indices {spec!r}")
    module = modules.get(path)
    if module is None or "weight" not in module.params:
        raise InputError(f"{source.describe(values.key)}: maps to module {path!r}, which the base model lacks")
    weight = modules.state_shapes[module.params["weight"]]
    common.expect_shape(source, values, (len(indices), weight[1]), f"[{len(indices)} tokens, dim={weight[1]}]")
    if max(indices, default=0) >= weight[0] or min(indices, default=0) < 0:
        raise InputError(f"{source.config_path.name}: token indices {indices} outside the vocabulary of {weight[0]}")
    index = AdapterTensor(
        f"{source.config_path.name}:token indices of {path}", torch.tensor(indices, dtype=torch.int64)
    )
    tensor = modules.tensors.get(module.params["weight"])
    tied = [
        m
        for m in modules.values()
        if m.calls and m.path != path and "weight" in m.params and modules.tensors.get(m.params["weight"]) is tensor
    ]
    if tied and tied_embeddings is None:
        raise UnsupportedError(
            f"trainable tokens on {path!r}, whose weight {', '.join(repr(m.path) for m in tied)} shares: peftc cannot tell "
            "whether the model declares the tie (PEFT replaces the rows there too only if it does); compile from the "
            "model itself rather than an exported program"
        )
    tied = [module, *(tied if tied_embeddings else [])]
    sites = []
    for target in tied:
        if target.path != path and "bias" in target.params:
            raise UnsupportedError(
                f"trainable tokens on {path!r} tied to {target.path!r}, which has a bias PEFT would drop"
            )
        info = {
            "module_type": target.class_name,
            "tokens": len(indices),
            **({"tied_to": path} if target.path != path else {}),
        }
        sites.append(Site(target.path, TOKENS_WEIGHT.name, {"indices": index, "values": values}, {}, info, "weight"))
    return sites


METHOD = Method("trainable_tokens", ("TRAINABLE_TOKENS",), parse, ops=(TOKENS_WEIGHT,), fields=FIELDS)
