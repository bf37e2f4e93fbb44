"""The oracles artifacts are checked against.

* ``program_oracle``: eager PyTorch of a peftc program. For the reference program (after
  ``insert-sites``) each site op's eager body is the method's reference math.
* ``peft_oracle``: Hugging Face PEFT's own eager model, ``PeftModel.from_pretrained(base, adapter)``,
  built from the adapter files peftc read (stacked adapters: PEFT merges each into the base before
  loading the next). It shares no code with peftc: it is the independent check
  that peftc parsed the adapter as PEFT does.
* ``module_oracle``: the untraced base module (what an inserted adapter, a prompt, changes).
* ``weights_oracle``: the untraced module with the adapters applied to its parameters by peftc's ops.

:class:`OraclePlan` decides which of them a verification runs, and records why any did not: every
mode and ``peftc add-adapter`` assemble their oracles through it.

An oracle maps example tensors to ``{output name: numpy array}`` named as the artifact names outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from peftc import ir
from peftc.errors import UnsupportedError
from peftc.logs import quiet_imports
from peftc.methods import registry
from peftc.methods.base import Adapter
from peftc.verification.compare import Tolerance

Oracle = Callable[[Mapping[str, torch.Tensor]], dict[str, np.ndarray]]
NotRun = list[tuple[str, str]]
"""``(what, why)`` for checks that did not run."""


@dataclasses.dataclass(frozen=True)
class OraclePlan:
    """Which oracles a verification compares with, in one precision: the eager reference, and PEFT
    where it can run; and how close the artifact must come to them."""

    module: torch.nn.Module | None
    """The base model as an ``nn.Module`` in this precision (None when it was given as an exported program)."""
    peft: bool = True
    """Whether PEFT was asked for (``--no-oracle`` turns it off)."""
    tolerance: Tolerance | None = None
    """The artifact's budget against these oracles (None: each output dtype's bound, ``compare.py``)."""
    label: str = ""
    """Appended to the oracles' names: ``""`` for the fp32 oracles, ``@bf16``… for the artifact's precision."""

    def not_run(self) -> NotRun:
        """Why PEFT cannot run for any adapter (asked not to, or no module to give it)."""
        if not self.peft:
            return [(f"peft oracle{self.label}", "disabled (--no-oracle)")]
        if self.module is None:
            return [(f"peft oracle{self.label}", "the base is an exported program; PEFT needs the nn.Module")]
        return []

    def oracles(self, reference: Oracle, adapters: Sequence[Adapter]) -> tuple[dict[str, Oracle], NotRun]:
        """``{"reference": reference, "peft": …}`` (names with :attr:`label`) for ``adapters``, and why
        PEFT could not load them. The reasons of :meth:`not_run` are not repeated here.
        """
        found = {f"reference{self.label}": reference}
        if self.not_run():
            return found, []
        fn, why = peft_oracle(self.module, adapters)
        if fn is None:
            return found, [(f"peft oracle{self.label}", why)]
        return {**found, f"peft{self.label}": fn}, []

    def tolerances(self, oracles: Mapping[str, Oracle]) -> dict[str, Tolerance]:
        """Oracle name → :attr:`tolerance`, for ``verify`` (empty without one)."""
        return dict.fromkeys(oracles, self.tolerance) if self.tolerance is not None else {}


def to_numpy(outputs: object) -> dict[str, np.ndarray]:
    """Flatten a model's output pytree to named numpy arrays (bf16 widened to fp32)."""
    named = {}
    for name, leaf in ir.flatten_named(outputs).items():
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach()
            named[name] = (leaf.float() if leaf.dtype == torch.bfloat16 else leaf).cpu().numpy()
    return named


def program_oracle(program: ir.Program) -> Oracle:
    """Eager execution of ``program`` (float inputs cast to the dtypes it was traced with).

    Verification feeds sizes within the recorded dims; torch's input guards are not re-checked, since
    they also keep its tracing heuristics (a dim that is a sum, ``total`` = ``past`` + ``seq``, gets a
    lower bound from the tracing sizes, while a prefill step has ``past`` = 0)."""
    module = program.module(check_guards=False)
    dtypes = {
        n.name: n.meta["val"].dtype
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in ir.user_input_names(program)
    }

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return to_numpy(module(**_cast_floats(inputs, dtypes)))

    return run


def module_oracle(module: torch.nn.Module) -> Oracle:
    """Eager execution of the untraced ``module`` (float inputs cast to its parameters' dtype)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return to_numpy(module(**_cast_floats(inputs, dict.fromkeys(inputs, dtype))))

    return run


def _cast_floats(inputs: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Float inputs in the given dtypes (an input missing from ``dtypes``, or not float, as it is)."""
    return {k: v.to(dtypes[k]) if v.is_floating_point() and k in dtypes else v for k, v in inputs.items()}


def peft_oracle(module: torch.nn.Module, adapters: Sequence[Adapter]) -> tuple[Oracle | None, str]:
    """PEFT's eager model of ``module`` with ``adapters`` active, or ``(None, why not)``."""
    try:
        with quiet_imports():
            import peft
    except ImportError:
        return None, "peft is not installed (pip install 'peftc[oracle]')"
    if not adapters:
        return None, "no adapter"
    foreign = sorted({str(a.source.config.get("peft_type")) for a in adapters} - {str(t.value) for t in peft.PeftType})
    if foreign:
        return None, f"PEFT does not implement {', '.join(foreign)} (the eager reference program is the oracle)"
    from safetensors.torch import save_file

    quantized = getattr(module, QUANTIZED_FROM, None)
    # One adapter is loaded unmerged: PEFT wraps the base layers and reads their weights, so they are
    # shared. PEFT writes in place into the base tensors an adapter ships whole (trained biases,
    # modules_to_save: ``replacements``) and merges a stack into them: those get their own copy.
    shared = not quantized and len(adapters) == 1 and not adapters[0].replacements
    model, why = _bitsandbytes_base(module, quantized) if quantized else (_copy(module, share=shared), "")
    if model is None:
        return None, why
    before = _checksums(module) if shared else None
    with tempfile.TemporaryDirectory(prefix="peftc-oracle-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for index, adapter in enumerate(adapters):
                folder = Path(tmp) / adapter.name
                folder.mkdir()
                config = adapter.oracle_config or adapter.source.config
                (folder / "adapter_config.json").write_text(json.dumps(dict(config)))
                tensors = {k: v.contiguous() for k, v in adapter.source.tensors.items()}
                save_file(tensors, str(folder / "adapter_model.safetensors"))
                # Stacked adapters apply in order, each to the model the previous ones produced:
                # PEFT's own merge of each but the last (several active adapters would instead add
                # their updates, each computed from the base, which is not composition for DoRA/(IA)³).
                # PEFT matches some names by substring, so every adapter loads as "default".
                if index:
                    model = model.merge_and_unload()
                model = peft.PeftModel.from_pretrained(model, str(folder))
        except Exception as e:
            return None, f"PEFT could not load the adapter ({type(e).__name__}: {str(e).splitlines()[0]})"
        finally:
            if before is not None and _checksums(module) != before:
                raise AssertionError("PEFT changed the base weights its oracle shares with the model")
    model.eval()
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    fixed = {name: value for adapter in adapters for name, value in adapter.oracle_inputs.items()}

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        batch = next(iter(inputs.values())).shape[0] if fixed else 0
        given = _cast_floats(inputs, dict.fromkeys(inputs, dtype))
        given.update({name: torch.full((batch,), value, dtype=torch.int64) for name, value in fixed.items()})
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return to_numpy(model(**given))

    return run, ""


def _copy(module: torch.nn.Module, *, share: bool) -> torch.nn.Module:
    """A deep copy of ``module``; with ``share``, its parameters and buffers are new tensor objects over
    the same storage (PEFT may rebind a layer's ``weight.data``, which must not reach ``module``)."""
    if not share:
        return copy.deepcopy(module)
    memo: dict[int, object] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        detached = tensor.detach()
        memo[id(tensor)] = (
            torch.nn.Parameter(detached, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else detached
        )
    return copy.deepcopy(module, memo)


def _checksums(module: torch.nn.Module) -> list[tuple[int, int, str]]:
    """Storage address, version and a strided-sample sum of each parameter and buffer: what an in-place
    write to a shared weight changes (a write through ``.data`` changes the sum, not the version)."""
    out = []
    for tensor in (*module.parameters(), *module.buffers()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)]
        out.append((tensor.data_ptr(), tensor._version, repr(float(sample.double().sum())) if sample.numel() else ""))
    return out


QUANTIZED_FROM = "peftc_quantized_from"
"""Attribute of a base module peftc loaded from a quantized directory: that directory (``loaders/models.py``)."""


def _bitsandbytes_base(module: torch.nn.Module, path: str) -> tuple[torch.nn.Module | None, str]:
    """The quantized base as PEFT's QLoRA runs it: transformers + bitsandbytes' CPU kernels."""
    import importlib.util

    from peftc.quant.loading import quantization_config

    method = (quantization_config(Path(path)) or {}).get("quant_method")
    if method != "bitsandbytes":
        return None, f"PEFT runs a {method} base only on optimum/gptqmodel kernels, not installed here"
    if importlib.util.find_spec("bitsandbytes") is None:
        return None, "bitsandbytes is not installed (PEFT's QLoRA runs on its kernels)"
    from peftc.loaders.causal import TEXT_GENERATION, attach

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = type(module).from_pretrained(path, device_map="cpu", use_cache=False)
    if "forward" in vars(module):  # peftc's base runs one generation step (loaders/causal.py): so does PEFT's
        attach(model, TEXT_GENERATION)
    return model, ""


def weights_oracle(module: torch.nn.Module, adapters: Sequence[Adapter]) -> Oracle:
    """Eager ``module`` with ``adapters`` applied to its parameters by peftc's own ops, untraced.

    Each adapter, in order, replaces its full tensors and transforms each adapted parameter with its
    sites' weight form (``W' = op(W, factors)``, the method's reference math). The module then runs
    with those parameters through ``torch.func.functional_call`` (every tied name given separately,
    so a site changes only its own module's use of a shared tensor). Used where the base is not
    traced again (``peftc add-adapter``); the traced ``program_oracle`` is used everywhere else.
    """
    ops = registry.site_ops()
    state = dict(module.named_parameters(remove_duplicate=False))
    state.update(module.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for adapter in adapters:
            for replacement in adapter.replacements:
                state[replacement.param] = replacement.tensor.tensor.to(state[replacement.param].dtype)
            for site in adapter.sites:
                forms = site.weight_form if ops[site.op].form == "call" else (site,)
                if not forms:
                    raise UnsupportedError(f"adapter {adapter.name!r}: {site.op} on {site.module!r} has no weight form")
                for form in forms:
                    op = ops[form.op]
                    fqn = f"{form.module}.{form.param}"
                    tensors = [form.tensors[r].tensor if form.tensors.get(r) else None for r in op.tensor_roles]
                    base = [state.get(f"{form.module}.{p}") for p in op.base_params]
                    state[fqn] = op.overload(state[fqn], *base, *tensors, *(form.scalars[k] for k in op.scalars))

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return to_numpy(torch.func.functional_call(module, state, (), dict(inputs), tie_weights=False))

    return run
