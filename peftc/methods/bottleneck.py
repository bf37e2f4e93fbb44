"""Bottleneck adapters (Houlsby, Pfeiffer, parallel / scaled parallel): peftc's own format, ``PEFTC_BOTTLENECK``.

The AdapterHub ``adapters`` library, whose saved format would be the natural input, does not install
beside transformers 5 (it pins transformers 4.57), so peftc reads a documented format of its own that
mirrors that library's config names:

* ``adapter_config.json``: ``{"peft_type": "PEFTC_BOTTLENECK", "format_version": 1, ...}`` with the
  AdapterHub ``BnConfig`` fields below;
* ``adapter_model.safetensors``: per adapted block ``<block>.adapter_down.weight`` ``[r, d]``,
  ``<block>.adapter_down.bias`` ``[r]``, ``<block>.adapter_up.weight`` ``[d, r]``,
  ``<block>.adapter_up.bias`` ``[d]``, where ``<block>`` is the module path of a BERT-family sublayer
  output block (``BertSelfOutput`` ``….attention.output`` for ``mh_adapter``, ``BertOutput`` ``….output``
  for ``output_adapter``): a module with ``dense``, ``dropout`` and ``LayerNorm`` children whose forward
  ``(hidden_states, input_tensor)`` is ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``;
* optional ``"sites": {"<block>": {...}}`` in the config: per block values of ``non_linearity``,
  ``scaling``, ``original_ln_before``, ``original_ln_after``, ``residual_before_ln``, ``is_parallel``
  (e.g. sequential adapters after attention and scaled parallel ones beside the FFN, as in He et al.'s
  mix-and-match adapter).

With ``h = dropout(dense(x))``, ``t = input_tensor``, ``LN`` the block's own LayerNorm and
``A(z) = up(act(down(z))) · scaling``, the block computes (AdapterHub's ``pre_forward`` / ``forward``
/ ``post_forward``)::

    sequential: res = h                      (residual_before_ln = true)
                h   = LN(h + t)              (original_ln_before; res = h + t first if "post_add")
                res = h                      (residual_before_ln = false)
                o   = A(h) + res
    parallel:   o   = h + A(t)               (is_parallel: the adapter reads the block's input)
    both:       out = LN(o + t)              (original_ln_after; else out = o)

Houlsby is ``mh_adapter`` + ``output_adapter``, ``original_ln_before`` false; Pfeiffer is
``output_adapter`` only with ``original_ln_before`` true; the parallel adapter (He et al.,
AdaptFormer-style when scaled) sets ``is_parallel`` and usually ``scaling`` 4.

The adapter is *inserted*: the base is traced inside :class:`Bottlenecked`, which runs each adapted
block with the formula above, so there are no sites to merge (a non-linearity sits between the
adapter's two projections).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.loaders.inputs import InputSignature
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, ParseOptions
from peftc.methods.prompt.wrapper import INPUTS
from peftc.methods.record import Inserted, Method

PEFT_TYPE = "PEFTC_BOTTLENECK"
FORMAT_VERSION = 1
ROLES = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
ACTIVATIONS = {
    "relu": torch.nn.functional.relu,
    "swish": torch.nn.functional.silu,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leakyrelu": torch.nn.functional.leaky_relu,
}
"""AdapterHub's ``non_linearity`` names (lower-cased, as it reads them) and their functions."""
FIELDS = common.Fields(
    honoured=(
        "format_version",
        "reduction_factor",
        "non_linearity",
        "original_ln_before",
        "original_ln_after",
        "residual_before_ln",
        "scaling",
        "mh_adapter",
        "output_adapter",
        "is_parallel",
        "sites",
    ),
    ignored={
        "adapter_residual_before_ln": "places the residual around ln_after, which is refused; without it the sum is the same",
        "init_weights": "initialisation only (the trained tensors are in the file)",
        "init_weights_seed": "initialisation only",
        "dropout": "dropout is the identity at inference",
        "stochastic_depth": "drop-path is the identity at inference",
        "inv_adapter_reduction_factor": "sizes the invertible adapter, which is refused",
        "architecture": "names the adapter family",
    },
    unsupported={
        "ln_before": "a LayerNorm inside the adapter is not read by peftc",
        "ln_after": "a LayerNorm inside the adapter is not read by peftc",
        "use_gating": "gated adapters are not read by peftc",
        "inv_adapter": "invertible embedding adapters are not read by peftc",
        "cross_adapter": "cross-attention adapters are not read by peftc",
        "phm_layer": "PHM (Compacter) projections are not read by peftc",
        "leave_out": "give tensors for exactly the adapted layers instead",
    },
    defaults={
        "original_ln_before": False,
        "original_ln_after": True,
        "residual_before_ln": True,
        "scaling": 1.0,
        "is_parallel": False,
    },
)


@dataclasses.dataclass(frozen=True)
class Options:
    """What the config says about every block's formula (see the module docstring)."""

    parallel: bool
    scaling: float
    non_linearity: str
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool | str


class Bottleneck(torch.nn.Module):
    """One block's adapter: ``A(z) = up(act(down(z))) · scaling``."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], options: Options) -> None:
        super().__init__()
        down_w, down_b, up_w, up_b = (torch.nn.Parameter(t.detach().clone(), requires_grad=False) for t in tensors)
        self.down_weight, self.down_bias, self.up_weight, self.up_bias = down_w, down_b, up_w, up_b
        self.options = options

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The adapter's update of ``z`` ``[…, d]``."""
        act = ACTIVATIONS[self.options.non_linearity]
        down = act(torch.nn.functional.linear(z, self.down_weight.to(z.dtype), self.down_bias.to(z.dtype)))
        return (
            torch.nn.functional.linear(down, self.up_weight.to(z.dtype), self.up_bias.to(z.dtype))
            * self.options.scaling
        )

    def block(self, block: torch.nn.Module, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """The output of the sublayer output ``block`` with this adapter (the module docstring's formula)."""
        o, norm = self.options, block.LayerNorm
        h = block.dropout(block.dense(hidden_states))
        if o.parallel:
            out = h + self(input_tensor)
        else:
            residual = h
            if o.original_ln_before:
                h = h + input_tensor
                residual = h if o.residual_before_ln == "post_add" else residual
                h = norm(h)
            residual = h if o.residual_before_ln is False else residual
            out = self(h) + residual
        return norm(out + input_tensor) if o.original_ln_after else out


class Bottlenecked(torch.nn.Module):
    """``base`` with each named sublayer output block run with its bottleneck adapter."""

    def __init__(self, base: torch.nn.Module, blocks: dict[str, tuple[tuple[torch.Tensor, ...], Options]]) -> None:
        super().__init__()
        self.base_model = base
        self.paths = list(blocks)
        self.bottleneck = torch.nn.ModuleList(Bottleneck(*block) for block in blocks.values())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        blocks = [self.base_model.get_submodule(path) for path in self.paths]
        for block, adapter in zip(blocks, self.bottleneck, strict=True):
            block.forward = functools.partial(adapter.block, block)
        extra = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        try:
            return self.base_model(input_ids, **{k: v for k, v in extra.items() if v is not None})
        finally:
            for block in blocks:
                del block.forward


PER_SITE = ("non_linearity", "scaling", "original_ln_before", "original_ln_after", "residual_before_ln", "is_parallel")
"""The fields ``sites`` may set for one block (the rest hold for every block)."""


def options(source: AdapterSource, path: str) -> Options:
    """The :class:`Options` of block ``path``: the config's fields, with ``sites[path]``'s over them.

    Raises:
        UnsupportedError: a wrong ``peft_type``, a refused field that is set, a ``sites`` field that is
            not per block, an unknown ``non_linearity`` or a ``scaling`` that is not a number
            (``learned``, ``channel``).
        InputError: a format version other than 1, or a field of the wrong type.
    """
    common.classify_fields(source, PEFT_TYPE, FIELDS)
    cfg, where = source.config, source.config_path
    if cfg.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{where}: format_version={cfg.get('format_version')!r}; peftc reads {FORMAT_VERSION}")
    sites = cfg.get("sites") or {}
    own = sites.get(path, {}) if isinstance(sites, dict) else None
    if not isinstance(own, dict) or any(k not in PER_SITE for k in own):
        key = next((k for k in own if k not in PER_SITE), None) if isinstance(own, dict) else None
        raise UnsupportedError(f"{where}: sites[{path!r}] sets {key!r}; a block may set only {', '.join(PER_SITE)}")
    get = {k: cfg.get(k, FIELDS.defaults.get(k)) for k in FIELDS.honoured} | own
    where = f"{where}: " + (f"sites[{path!r}]: " if own else "")
    act = str(get["non_linearity"]).lower()
    if act not in ACTIVATIONS:
        raise UnsupportedError(f"{where}non_linearity={get['non_linearity']!r}; peftc reads {sorted(ACTIVATIONS)}")
    scaling = get["scaling"]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise UnsupportedError(f"{where}scaling={scaling!r}: only a fixed number is read (not a trained scale)")
    for name in ("original_ln_before", "original_ln_after", "mh_adapter", "output_adapter", "is_parallel"):
        if get[name] is not None and not isinstance(get[name], bool):
            raise InputError(f"{where}{name}={get[name]!r}; give true or false")
    rbl = get["residual_before_ln"]
    if rbl not in (True, False, "post_add") or (rbl == "post_add" and not get["original_ln_before"]):
        raise InputError(f"{where}residual_before_ln={rbl!r}; give true, false, or 'post_add' with original_ln_before")
    return Options(bool(get["is_parallel"]), float(scaling), act, bool(get["original_ln_before"]),
                   bool(get["original_ln_after"]), rbl)  # fmt: skip


def read(source: AdapterSource) -> dict[str, tuple[torch.Tensor, ...]]:
    """The adapted blocks' ``(down weight, down bias, up weight, up bias)``, by block path.

    Raises:
        InputError: a key that is not one of a block's four tensors, a block missing one, a block of a
            kind (``mh_adapter``/``output_adapter``) the config does not adapt, or misshapen tensors.
    """
    cfg = source.config
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in source.tensors.items():
        role = next((r for r in ROLES if key.endswith("." + r)), None)
        if role is None:
            raise InputError(f"{source.describe(key)}: not a bottleneck tensor (<block>.{', <block>.'.join(ROLES)})")
        blocks.setdefault(key.removesuffix("." + role), {})[role] = tensor
    if not blocks:
        raise InputError(f"{source.weights_path}: no bottleneck tensors")
    found = {}
    for path, tensors in sorted(blocks.items()):
        missing = [r for r in ROLES if r not in tensors]
        if missing:
            raise InputError(f"{source.weights_path}: no {path + '.' + missing[0]!r} tensor")
        kind = "mh_adapter" if path.endswith("attention.output") else "output_adapter"
        if not cfg.get(kind):
            raise InputError(f"{source.describe(path + '.' + ROLES[0])}: an adapter of {path}, but {kind} is not true")
        down, down_b, up, up_b = (tensors[r] for r in ROLES)
        r, d = down.shape if down.ndim == 2 else (0, 0)
        if not r or tuple(down_b.shape) != (r,) or tuple(up.shape) != (d, r) or tuple(up_b.shape) != (d,):
            shapes = ", ".join(f"{role} {list(tensors[role].shape)}" for role in ROLES)
            raise InputError(
                f"{source.describe(path + '.' + ROLES[0])}: shapes {shapes}; give [r, d], [r], [d, r], [d]"
            )
        factor = cfg.get("reduction_factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or max(1, int(d // factor)) != r:
            raise InputError(
                f"{source.describe(path + '.' + ROLES[0])}: r={r} is not d={d} // reduction_factor={factor!r}"
            )
        found[path] = tuple(tensors[role] for role in ROLES)
    return found


def insert(source: AdapterSource, module: torch.nn.Module, base: InputSignature) -> Inserted:
    """:class:`Bottlenecked` around ``module``; the inputs are the base's.

    Raises:
        UnsupportedError: see :func:`options`; an adapted module that is not a sublayer output block,
            or a model input the wrapper does not wire.
        InputError: see :func:`read`; a block of an adapted kind without its adapter.
    """
    blocks = read(source)
    where = source.config_path
    sites = source.config.get("sites") or {}
    if not isinstance(sites, dict):
        raise InputError(f"{where}: sites={sites!r}; give an object of block path → fields")
    unknown = sorted(set(sites) - set(blocks))
    if unknown:
        raise InputError(f"{where}: sites names {unknown[0]!r}, which has no adapter tensors")
    for path, tensors in blocks.items():
        try:
            block = module.get_submodule(path)
        except AttributeError:
            raise InputError(f"{source.describe(path + '.' + ROLES[0])}: the model has no module {path!r}") from None
        if not _is_output_block(block):
            raise UnsupportedError(
                f"{where}: {path} is a {type(block).__name__}, not a sublayer output block (dense, dropout, LayerNorm; "
                "forward(hidden_states, input_tensor))"
            )
        if block.dense.out_features != tensors[0].shape[1]:
            raise InputError(f"{source.describe(path + '.' + ROLES[0])}: d={tensors[0].shape[1]}, but {path} has "
                             f"{block.dense.out_features}")  # fmt: skip
    kinds = {k for k in ("mh_adapter", "output_adapter") if source.config.get(k)}
    for path, block in module.named_modules():
        kind = "mh_adapter" if path.endswith("attention.output") else "output_adapter"
        if kind in kinds and _is_output_block(block) and path not in blocks:
            raise InputError(f"{source.weights_path}: {kind} is true, but {path} has no adapter ({path}.{ROLES[0]})")
    names = [i.name for i in base.inputs]
    if "input_ids" not in names or any(n not in INPUTS for n in names):
        raise UnsupportedError(f"{where}: {PEFT_TYPE} wires {', '.join(INPUTS)}; the model takes {names}")
    adapted = {path: (tensors, options(source, path)) for path, tensors in blocks.items()}
    return Inserted(lambda traced: Bottlenecked(traced, adapted), base)


def _is_output_block(block: torch.nn.Module) -> bool:
    children = dict(block.named_children())
    if set(children) != {"dense", "dropout", "LayerNorm"}:
        return False
    dense, norm = children["dense"], children["LayerNorm"]
    params = list(inspect.signature(type(block).forward).parameters)
    return (
        isinstance(dense, torch.nn.Linear)
        and isinstance(norm, torch.nn.LayerNorm)
        and tuple(norm.normalized_shape) == (dense.out_features,)
        and params[1:] == ["hidden_states", "input_tensor"]
    )


def parse(source: AdapterSource, modules: ModuleTable, options_: ParseOptions) -> Adapter:
    """The adapter, found in the program :class:`Bottlenecked` was traced in: no sites.

    Raises:
        UnsupportedError: the program was not traced with the adapter's wrapper, or a refused field.
        InputError: see :func:`read`.
    """
    honoured, ignored = common.classify_fields(source, PEFT_TYPE, FIELDS)
    blocks = read(source)
    first = next(iter(blocks.values()))[0]
    traced = modules.tensors.get("bottleneck.0.down_weight")
    if traced is None or traced.shape != first.shape or not torch.equal(traced.float(), first.float()):
        raise UnsupportedError(
            f"{source.config_path}: a {PEFT_TYPE} adapter is inserted when peftc traces the model (compile it "
            "alone); it cannot be added to a program traced without it"
        )
    honoured["inserted"] = f"{len(blocks)} bottleneck adapters"
    return Adapter(source.name, "bottleneck", source, (), (), (), honoured, ignored)


METHOD = Method("bottleneck", (PEFT_TYPE,), parse, fields=FIELDS, insert=insert)
