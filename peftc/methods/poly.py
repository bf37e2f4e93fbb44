"""Poly / MHR (PEFT ``POLY``): LoRA skills mixed per task by a router that stays in the program.

Each adapted ``nn.Linear`` (``W`` ``[d_out, d_in]``) holds ``n_skills`` LoRA pairs cut into
``n_splits`` heads: ``poly_lora_A`` ``[q, s, d_in/q, r]``, ``poly_lora_B`` ``[q, s, r, d_out/q]``, and a
router ``poly_router.module_logits`` ``[n_tasks, q·s]``. PEFT's eval forward
(``peft/tuners/poly/{layer,router}.py``) for a batch whose rows have tasks ``t_b``::

    g_b   = sigmoid(module_logits[t_b]).view(q, s);   w_b = g_b / (Σ_s g_b + 1e-12)
    A_b   = Σ_s w_b[q, s] · A[q, s]   → [d_in, r]     (heads stacked along d_in)
    B_b   = Σ_s w_b[q, s] · B[q, s]   → [r, d_out]    (heads stacked along d_out)
    y_b   = W x_b + b + (x_b A_b B_b) / r

The mix depends only on the task id, so it is a fixed function of each input: peftc keeps the router
in the program and takes the task as an input, ``task_ids`` ``[batch]`` in ``[0, n_tasks)`` — the same
input multitask prompt tuning takes (``peftc/methods/prompt/wrapper.py``). Like prompt learning the
adapter is *inserted*: the base is traced inside :class:`Routed`, which adds each module's update to
its output, so there are no sites to merge (the update differs per row of the batch).

Given a fixed task (``--task-id K``, :attr:`ParseOptions.task_id`) the mix is a constant: each module
becomes a ``poly_task_weight`` weight site ``W' = W + (A_K B_K)ᵀ / r``, merged like any weight form,
and the program has neither router nor ``task_ids`` input (PEFT's oracle is given ``task_ids = K``).

PEFT passes ``task_ids`` on only for ``task_type`` ``SEQ_CLS`` and ``CAUSAL_LM`` (``PeftModelFor…``);
its plain ``PeftModel`` drops them and the router fails. Other task types are refused, as are
``poly_type`` values other than ``"poly"`` (PEFT has no other router) and targets that are not
``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.loaders.inputs import InputSignature, TensorInput
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Replacement, Site
from peftc.methods.prompt.wrapper import INPUTS, TASK_IDS
from peftc.methods.record import Inserted, Method
from peftc.ops import SiteOp, composite_op

PREFIX = "base_model.model."
ROLES = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")
TASKS = ("SEQ_CLS", "CAUSAL_LM")
"""Task types whose PEFT model passes ``task_ids`` to the Poly layers."""
EPS = 1e-12
"""PEFT's guard in the router's normalisation."""
FIELDS = common.Fields(
    honoured=("r", "n_tasks", "n_skills", "n_splits", "poly_type", "task_type", "target_modules", "modules_to_save"),
    ignored={
        "init_weights": "initialisation only (the trained tensors are in the file)",
        "exclude_modules": "the saved tensors name the adapted modules",
    },
)


POLY_TASK_WEIGHT = SiteOp(
    name="poly_task_weight",
    form="weight",
    tensor_roles=("poly_lora_A", "poly_lora_B", "module_logits"),
    scalars=("task",),
)


def mix_weights(logits: torch.Tensor, splits: int, skills: int) -> torch.Tensor:
    """The router's skill weights ``[…, q, s]`` for logits rows ``[…, q·s]``: sigmoid, normalised over skills."""
    gates = torch.sigmoid(logits).view(*logits.shape[:-1], splits, skills)
    return gates / (gates.sum(dim=-1, keepdim=True) + EPS)


@composite_op(
    "poly_task_weight(Tensor weight, Tensor poly_lora_a, Tensor poly_lora_b, Tensor module_logits, int task) -> Tensor"
)
def poly_task_weight(
    weight: torch.Tensor, poly_lora_a: torch.Tensor, poly_lora_b: torch.Tensor, module_logits: torch.Tensor, task: int
) -> torch.Tensor:
    """``W + (A_K B_K)ᵀ / r`` for task ``K`` and an ``nn.Linear`` weight ``[d_out, d_in]`` (fp32 math, cast
    back to ``W``'s dtype)."""
    splits, skills, d_in, r = poly_lora_a.shape
    w = mix_weights(module_logits[task].to(torch.float32), splits, skills)
    a = torch.einsum("qs,qsdr->qdr", w, poly_lora_a.to(torch.float32)).reshape(splits * d_in, r)
    b = torch.einsum("qs,qsrd->qrd", w, poly_lora_b.to(torch.float32)).transpose(0, 1).reshape(r, -1)
    return (weight.to(torch.float32) + (a @ b).T / r).to(weight.dtype)


@dataclasses.dataclass(frozen=True)
class Module:
    """One adapted module's tensors."""

    path: str
    tensors: tuple[AdapterTensor, AdapterTensor, AdapterTensor]
    """``(poly_lora_A, poly_lora_B, module_logits)``."""


class Skills(torch.nn.Module):
    """One module's skills and router; :meth:`delta` is PEFT's update (see the module docstring)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.poly_lora_A = torch.nn.Parameter(a.detach().clone(), requires_grad=False)
        self.poly_lora_B = torch.nn.Parameter(b.detach().clone(), requires_grad=False)
        self.module_logits = torch.nn.Parameter(logits.detach().clone(), requires_grad=False)

    def delta(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """``x A_b B_b / r`` for ``x`` ``[batch, …, d_in]`` (rows picked as embedding lookups, so the
        artifact records ``task_ids``' range and refuses ids outside it)."""
        splits, skills, d_in, r = self.poly_lora_A.shape
        batch = task_ids.shape[0]
        weights = mix_weights(torch.nn.functional.embedding(task_ids, self.module_logits), splits, skills)
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.poly_lora_A).reshape(batch, splits * d_in, r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, self.poly_lora_B).transpose(1, 2).reshape(batch, r, -1)
        flat = x.to(a.dtype).reshape(batch, -1, x.shape[-1])
        return (flat @ a @ b).div(r).reshape(*x.shape[:-1], b.shape[-1])


class Routed(torch.nn.Module):
    """``base`` with each named ``nn.Linear``'s output plus its Poly update for the row's task."""

    def __init__(self, base: torch.nn.Module, modules: tuple[Module, ...]) -> None:
        super().__init__()
        self.base_model = base
        self.paths = [m.path for m in modules]
        self.poly = torch.nn.ModuleList(Skills(*(t.tensor for t in m.tensors)) for m in modules)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        task_ids: torch.Tensor | None = None,
    ) -> Any:
        def hook(skills: Skills) -> Any:
            return lambda _module, args, output: (output + skills.delta(args[0], task_ids)).to(output.dtype)

        handles = [
            self.base_model.get_submodule(path).register_forward_hook(hook(skills))
            for path, skills in zip(self.paths, self.poly, strict=True)
        ]
        extra = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}
        try:
            return self.base_model(input_ids, **{k: v for k, v in extra.items() if v is not None})
        finally:
            for handle in handles:
                handle.remove()


def read(source: AdapterSource) -> tuple[tuple[Module, ...], tuple[str, ...]]:
    """The adapted modules and the ``modules_to_save`` keys of ``source``, checked against its config.

    Raises:
        UnsupportedError: a task type whose PEFT model gives the layers no ``task_ids``, or a
            ``poly_type`` other than ``"poly"``.
        InputError: a missing or misshapen tensor, a bad size field, or a key of no Poly module.
    """
    cfg, where = source.config, source.config_path
    task = cfg.get("task_type")
    if task not in TASKS:
        raise UnsupportedError(
            f"{where}: POLY with task_type={task!r}: PEFT's model for it passes no task_ids to the router (it "
            f"fails); use one of {list(TASKS)}"
        )
    if cfg.get("poly_type", "poly") != "poly":
        raise UnsupportedError(f"{where}: poly_type={cfg.get('poly_type')!r}: PEFT implements only 'poly'")
    sizes = {name: _positive(source, name, default) for name, default in (("r", 8), ("n_tasks", 1))}
    sizes |= {name: _positive(source, name, default) for name, default in (("n_skills", 4), ("n_splits", 1))}
    r, tasks, skills, splits = sizes["r"], sizes["n_tasks"], sizes["n_skills"], sizes["n_splits"]
    paths = sorted({k.removeprefix(PREFIX).rsplit(".poly_", 1)[0] for k in source.tensors if ".poly_" in k})
    modules = []
    for path in paths:
        keys = [f"{PREFIX}{path}.{role}" for role in ROLES]
        missing = [k for k in keys if k not in source.tensors]
        if missing:
            raise InputError(f"{source.weights_path}: no {missing[0]!r} tensor")
        a, b, logits = (AdapterTensor(k, source.tensors[k]) for k in keys)
        q, s = splits, skills
        common.expect_shape(
            source, a, (q, s, a.tensor.shape[2], r), f"[n_splits={q}, n_skills={s}, d_in/n_splits, r={r}]"
        )
        common.expect_shape(
            source, b, (q, s, r, b.tensor.shape[3]), f"[n_splits={q}, n_skills={s}, r={r}, d_out/n_splits]"
        )
        common.expect_shape(source, logits, (tasks, q * s), f"[n_tasks={tasks}, n_splits·n_skills={q * s}]")
        modules.append(Module(path, (a, b, logits)))
    known = {t.key for m in modules for t in m.tensors}
    other = sorted(k for k in source.tensors if k not in known and ".poly_" in k)
    if other:
        raise InputError(f"{source.describe(other[0])}: not a Poly tensor ({', '.join(ROLES)})")
    if not modules:
        raise InputError(f"{source.weights_path}: no Poly tensors ({', '.join(ROLES)}) of any module")
    saved = tuple(sorted(k for k in source.tensors if k not in known))
    return tuple(modules), saved


def _positive(source: AdapterSource, name: str, default: int) -> int:
    value = source.config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{source.config_path}: {name}={value!r}; give a positive integer")
    return value


def insert(source: AdapterSource, module: torch.nn.Module, base: InputSignature) -> Inserted:
    """:class:`Routed` around ``module`` and its inputs: the base's text inputs plus ``task_ids``.

    Raises:
        UnsupportedError: a target that is not an ``nn.Linear`` of the model's widths, an input the
            wrapper does not wire, or no ``batch`` dim.
        InputError: see :func:`read`.
    """
    modules, _ = read(source)
    where = str(source.config_path)
    for m in modules:
        try:
            target = module.get_submodule(m.path)
        except AttributeError:
            raise InputError(f"{source.describe(m.tensors[0].key)}: the model has no module {m.path!r}") from None
        a, b = m.tensors[0].tensor, m.tensors[1].tensor
        if not isinstance(target, torch.nn.Linear):
            raise UnsupportedError(f"{where}: {m.path} is a {type(target).__name__}; PEFT's Poly adapts nn.Linear only")
        if a.shape[0] * a.shape[2] != target.in_features or b.shape[0] * b.shape[3] != target.out_features:
            raise InputError(
                f"{source.describe(m.tensors[0].key)}: shapes {list(a.shape)}, {list(b.shape)} do not fit {m.path} "
                f"[{target.out_features}, {target.in_features}]"
            )
    names = [i.name for i in base.inputs]
    other = [n for n in names if n not in INPUTS]
    if "input_ids" not in names or other:
        raise UnsupportedError(f"{where}: POLY wires {', '.join(INPUTS)}; the model takes {names}")
    if "batch" not in base.dims:
        raise UnsupportedError(f"{where}: task_ids needs a 'batch' dim in the model's inputs")
    tasks = int(modules[0].tensors[2].tensor.shape[0])
    signature = InputSignature((*base.inputs, TensorInput(TASK_IDS, ("batch",), "int64", "index", 0, tasks)), base.dims)
    return Inserted(lambda traced: Routed(traced, modules), signature)


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """The adapter, found in the program :class:`Routed` was traced in: no sites; ``modules_to_save``
    copies as replacements. With ``options.task_id``, the base's own program: a ``poly_task_weight``
    site per module instead.

    Raises:
        UnsupportedError: the program was not traced with the adapter's wrapper, or a refused field.
        InputError: see :func:`read`; a copy of a parameter the base lacks or of another shape; a task id
            outside the router's ``[0, n_tasks)``.
    """
    honoured, ignored = common.classify_fields(source, "POLY", FIELDS)
    adapted, saved = read(source)
    if options.task_id is not None:
        sites = tuple(_task_site(source, m, modules, options.task_id) for m in adapted)
        replacements = tuple(_copy(source, key, modules, "") for key in saved)
        honoured["task_id"] = options.task_id
        return Adapter(source.name, "poly", source, sites, replacements, (), honoured, ignored,
                       oracle_inputs={TASK_IDS: options.task_id})  # fmt: skip
    first = adapted[0].tensors[0].tensor
    traced = modules.tensors.get("poly.0.poly_lora_A")
    if traced is None or traced.shape != first.shape or not torch.equal(traced.float(), first.float()):
        raise UnsupportedError(
            f"{source.config_path}: a POLY adapter is inserted when peftc traces the model (compile with it alone); "
            "it cannot be added to a program traced without it"
        )
    replacements = tuple(_copy(source, key, modules, "base_model.") for key in saved)
    honoured["inserted"] = f"{len(adapted)} routed modules, task_ids input"
    return Adapter(source.name, "poly", source, (), replacements, (), honoured, ignored)


def _task_site(source: AdapterSource, module: Module, modules: ModuleTable, task: int) -> Site:
    """The ``poly_task_weight`` site of ``module`` for task ``task`` (the router's row ``task``)."""
    a, b, logits = module.tensors
    if not 0 <= task < logits.tensor.shape[0]:
        raise InputError(f"--task-id {task}: the router of {source.describe(logits.key)} has tasks [0, "
                         f"{logits.tensor.shape[0]})")  # fmt: skip
    info = modules.get(module.path)
    if info is None:
        raise InputError(f"{source.describe(a.key)}: the model has no module {module.path!r}")
    shape = modules.state_shapes.get(info.params.get("weight", ""))
    if info.class_name != "Linear" or shape is None or len(shape) != 2:
        raise UnsupportedError(f"{source.config_path}: {module.path} is a {info.class_name}; PEFT's Poly adapts "
                               "nn.Linear only")  # fmt: skip
    q, s, d_in, _ = a.tensor.shape
    if q * d_in != shape[1] or q * b.tensor.shape[3] != shape[0]:
        raise InputError(
            f"{source.describe(a.key)}: shapes {list(a.tensor.shape)}, {list(b.tensor.shape)} do not fit "
            f"{module.path} {list(shape)}"
        )
    roles = dict(zip(POLY_TASK_WEIGHT.tensor_roles, module.tensors, strict=True))
    info_ = {"module_type": info.class_name, "n_skills": s, "n_splits": q, "task": task}
    return Site(module.path, POLY_TASK_WEIGHT.name, roles, {"task": task}, info_, "weight")


def _copy(source: AdapterSource, key: str, modules: ModuleTable, prefix: str) -> Replacement:
    name = prefix + key.removeprefix(PREFIX)
    expected = modules.state_shapes
    if not key.startswith(PREFIX) or name not in expected:
        raise InputError(f"{source.describe(key)}: not a Poly tensor or a modules_to_save copy of a model parameter")
    tensor = AdapterTensor(key, source.tensors[key])
    common.expect_shape(source, tensor, tuple(expected[name]), f"{list(expected[name])} ({name})")
    return Replacement(name, tensor, "modules_to_save copy", untie=True)


METHOD = Method("poly", ("POLY",), parse, ops=(POLY_TASK_WEIGHT,), fields=FIELDS, insert=insert, fixed_task=True)
