"""What a compile is asked to do: one frozen, validated record, built by the CLI and by ``peftc.compile``.

:class:`CompileOptions` holds every flag of ``peftc compile``. It is checked once, when it is made
(an error names the flag), and it renders itself back as the command line that rebuilds the
artifact (:meth:`CompileOptions.command`), so the CLI and the manifest agree on what each flag means.
Target-specific options (``--device``, ``--precision``, ``--profile``…) are checked by the target
they belong to (``peftc.backends.get_backend``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peftc import arguments, reading
from peftc.errors import InputError, UnsupportedError
from peftc.precision import PRECISIONS, QUANTIZED
from peftc.seeds import check_seed
from peftc.swap.storage import SLOT_DTYPES

PathLike = str | os.PathLike[str]
CALIBRATION_SAMPLES = 64
"""Generated calibration batches of an integer precision (``peftc/driver/quantize.py`` says why 64)."""
MERGE_POLICIES = ("auto", "auto-speed", "float", "requant", "requant-int8", "two-path", "two-path-fp16")
"""``--merge-policy`` (``peftc.quant.policy.POLICIES``, spelled out so that options import no torch)."""
EMBEDDINGS = ("none", "int8", "int4", "int8-head")
"""``--quantize-embeddings`` (``peftc.quant.embeddings.SCHEMES``)."""
MAX_MULTI_ADAPTER = 1024
"""Most adapters one call of a ``--swappable`` artifact can mix (``--multi-adapter``)."""
DENSITY_PASSES = ("prune-dead-neurons", "skip-blocks")
"""The DEFT passes a compile runs (``peftc.density.exploit.PASSES`` less the eager-only ``sparse-mlp``)."""
_DUMP_FILE = re.compile(r"\d\d_[\w.-]+\.txt")
"""The files ``--dump-ir`` writes (``peftc.passes.base``)."""


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Every option of a compile (``peftc.compile`` documents each one)."""

    model: Any
    adapters: tuple[PathLike, ...]
    out: Path
    target: str = "onnx"
    target_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    merge: bool = True
    inputs: tuple[str, ...] = ()
    configs: tuple[PathLike, ...] = ()
    force: bool = False
    keep_failed: bool = False
    dump_ir: Path | None = None
    allow_pickle: bool = False
    base_residual: bool = False
    task_id: int | None = None
    swappable: bool = False
    max_rank: int | None = None
    multi_adapter: int = 0
    slot_capacity: int | None = None
    """``--slot-capacity``: rows/columns per S²FT slot of a ``--swappable`` artifact."""
    slot_dtype: str = "fp32"
    """``--slot-dtype``: how a ``--swappable`` artifact's adapter files store slot values (``peftc/swap/storage.py``)."""
    oracle: bool = True
    seed: int = 0
    precision: str | None = None
    max_error: float | None = None
    calibration: Path | None = None
    calibration_samples: int = CALIBRATION_SAMPLES
    combine: str | None = None
    """``METHOD[:k=v,…]``: combine the adapters into one first (``peftc.combine``)."""
    task: str | None = None
    """``text-generation``: a generation step with explicit KV caches; ``text2text-generation``: an
    encoder program and a decoder step (None: from ``config.architectures``)."""
    co_permute: bool = False
    """``--no-merge`` S²FT sites as slices of a base permuted once (``peftc/sparse/copermute.py``)."""
    merge_policy: str = "auto"
    """LoRA on a quantized base: auto, float, requant, two-path or two-path-fp16 per site (``peftc/quant/policy.py``)."""
    quantize_embeddings: str = "none"
    """A quantized base's float embedding and LM-head tables: none, int8, int4 or int8-head
    (``peftc/quant/embeddings.py``)."""
    density: tuple[str, ...] = ()
    """DEFT passes on the merged model: ``prune-dead-neurons``, ``skip-blocks`` (``peftc/density/compiled.py``)."""
    dead_threshold: float | None = None
    """``--dead-threshold``: with a smooth activation (GELU, SiLU), a neuron whose down-projection input
    is within it on every calibration row is dead (None: ``peftc.density.measure.THRESHOLD``)."""

    def __post_init__(self) -> None:
        self._check_types()
        arguments.paths(self.adapters, "adapters")
        adapters = [self.adapters] if isinstance(self.adapters, (str, os.PathLike)) else list(self.adapters)
        target_options = dict(self.target_options or {})
        given = target_options.pop("precision", None)  # the trt option of earlier versions
        if given and self.precision and given != self.precision:
            raise InputError(f"--precision {self.precision!r} and the target option precision={given!r} disagree")
        self._set(
            adapters=tuple(adapters),
            out=Path(self.out),
            target_options=types.MappingProxyType(target_options),
            inputs=tuple(self.inputs),
            configs=tuple(self.configs),
            dump_ir=Path(self.dump_ir) if self.dump_ir else None,
            precision=self.precision or given or None,
            calibration=Path(self.calibration) if self.calibration else None,
            density=tuple(self.density),
        )
        if self.precision is not None and self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.max_error is not None and not self.max_error > 0:
            raise InputError(f"--max-error {self.max_error!r}: give a positive error relative to the output scale")
        calibrated = self.calibration or self.calibration_samples != CALIBRATION_SAMPLES
        if calibrated and self.precision not in QUANTIZED and not self.density:
            raise InputError(
                f"--calibration and --calibration-samples apply to --precision {', '.join(QUANTIZED)} and the density "
                "passes (--prune-dead-neurons, --skip-blocks)"
            )
        if self.calibration:
            check_calibration_file(Path(self.calibration))
        if self.density or self.dead_threshold is not None:
            _check_density(self)
        if self.task_id is not None and (isinstance(self.task_id, bool) or not isinstance(self.task_id, int)
                                         or self.task_id < 0):  # fmt: skip
            raise InputError(f"--task-id {self.task_id!r}: give a task index >= 0")
        if self.merge_policy not in MERGE_POLICIES:
            raise InputError(f"--merge-policy {self.merge_policy!r}: use one of {', '.join(MERGE_POLICIES)}")
        if self.quantize_embeddings not in EMBEDDINGS:
            raise InputError(f"--quantize-embeddings {self.quantize_embeddings!r}: use one of {', '.join(EMBEDDINGS)}")
        if not self.merge and self.merge_policy not in ("auto", "two-path"):
            raise InputError(f"--merge-policy {self.merge_policy} with --no-merge: unmerged QLoRA sites are two-path")
        check_seed(self.seed)
        if self.calibration_samples < 1:
            raise InputError(f"--calibration-samples {self.calibration_samples}: give at least 1")
        if self.precision in QUANTIZED and self.swappable:
            raise UnsupportedError(
                f"--precision {self.precision} with --swappable: adapter slots are float tensors set at run time; "
                "quantize a merged (default) or --no-merge artifact"
            )
        if not self.adapters:
            raise InputError("no adapter given")
        if self.combine is not None:
            from peftc.combine.options import parse_spec

            parse_spec(self.combine).checked_for(len(self.adapters))  # refuses bad specs before any work
            if self.swappable:
                raise InputError(
                    "--combine makes one adapter of the --adapter arguments; --swappable keeps alternatives"
                )
        if self.co_permute and (self.merge or self.swappable):
            raise InputError("--co-permute applies to --no-merge artifacts (merged S²FT sites have no gather left)")
        self._check_slots()
        if self.dump_ir is not None:
            self._check_dump_dir(self.dump_ir)
        if self.configs and len(self.configs) not in (1, len(self.adapters)):
            raise InputError(
                f"{len(self.configs)} --config files for {len(self.adapters)} adapters; give one per adapter, in order"
            )

    def _check_slots(self) -> None:
        """``--max-rank``, ``--multi-adapter``, ``--slot-capacity``, ``--slot-dtype``: with ``--swappable``, in range."""
        if (self.max_rank is not None or self.multi_adapter) and not self.swappable:
            raise InputError("--max-rank and --multi-adapter apply to --swappable artifacts only")
        if self.slot_capacity is not None and not self.swappable:
            raise InputError("--slot-capacity applies to --swappable artifacts only")
        if self.multi_adapter < 0 or (self.max_rank is not None and self.max_rank < 1):
            raise InputError("--multi-adapter must be >= 0 and --max-rank >= 1")
        if self.slot_dtype not in SLOT_DTYPES:
            raise InputError(f"--slot-dtype {self.slot_dtype!r}: use one of {', '.join(SLOT_DTYPES)}")
        if self.slot_dtype != "fp32" and not self.swappable:
            raise InputError(f"--slot-dtype {self.slot_dtype} applies to --swappable artifacts only")
        if self.slot_capacity is not None and self.slot_capacity < 1:
            raise InputError(f"--slot-capacity {self.slot_capacity}: give at least 1")
        if self.multi_adapter > MAX_MULTI_ADAPTER:
            raise InputError(
                f"--multi-adapter {self.multi_adapter}: at most {MAX_MULTI_ADAPTER} (the bank holds a copy of "
                "every slot per adapter)"
            )

    def _check_types(self) -> None:
        """A Python caller's argument of the wrong type is one line naming it, not a ``TypeError`` later."""
        arguments.path(self.out, "out")
        for name in ("dump_ir", "calibration"):
            if getattr(self, name) is not None:
                arguments.path(getattr(self, name), name)
        if isinstance(self.configs, (str, os.PathLike)) or not isinstance(self.configs, Sequence):
            raise InputError(f"configs={self.configs!r}: expected a list of adapter_config.json paths, one per adapter")
        for index, config in enumerate(self.configs):
            if config is not None:  # None: that adapter's directory has its own
                arguments.path(config, f"configs[{index}]")
        arguments.texts(self.inputs, "inputs")
        for name in ("merge", "force", "keep_failed", "allow_pickle", "base_residual", "swappable", "oracle",
                     "co_permute"):  # fmt: skip
            arguments.flag(getattr(self, name), name)
        for name in ("max_rank", "slot_capacity", "task_id"):
            arguments.integer(getattr(self, name), name, optional=True)
        arguments.integer(self.multi_adapter, "multi_adapter")
        arguments.integer(self.calibration_samples, "calibration_samples")
        arguments.number(self.max_error, "max_error", optional=True)
        arguments.number(self.dead_threshold, "dead_threshold", optional=True)
        for name in ("target", "merge_policy", "quantize_embeddings", "slot_dtype"):
            arguments.text(getattr(self, name), name)
        for name in ("precision", "combine", "task"):
            arguments.text(getattr(self, name), name, optional=True)
        if self.target_options is not None and not isinstance(self.target_options, Mapping):
            raise InputError(
                f"target_options: expected a mapping of option name to value, got {type(self.target_options).__name__}"
            )

    def _check_dump_dir(self, directory: Path) -> None:
        """``--dump-ir`` writes ``NN_<pass>.txt`` files: into a new directory, an empty one or an earlier dump,
        never into another directory (nor a file, nor the compile's inputs)."""
        if os.path.lexists(directory) and not directory.is_dir():
            raise InputError(f"--dump-ir {directory}: exists and is not a directory")
        for given in self.input_paths():
            source, target = Path(os.path.realpath(given)), Path(os.path.realpath(directory))
            if target == source or source in target.parents or target in source.parents:
                raise InputError(f"--dump-ir {directory}: is, holds or lies inside the compile's input {given}")
        others = (
            sorted(p.name for p in directory.iterdir() if not _DUMP_FILE.fullmatch(p.name))
            if directory.is_dir()
            else []
        )
        if others:
            raise InputError(
                f"--dump-ir {directory}: holds {others[0]!r}, not an IR dump; give a new or empty directory"
            )

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def config_for(self, index: int) -> PathLike | None:
        """The ``--config`` of adapter ``index``: one per adapter, or one for all."""
        if len(self.configs) == len(self.adapters):
            return self.configs[index]
        return self.configs[0] if self.configs else None

    def input_paths(self) -> list[Path]:
        """The local files and directories the compile reads: the model (a directory, a ``.pt2`` or
        ``.py`` file, timm weights), the adapters, their configs and the calibration file."""
        paths = [*self.adapters, *self.configs, *([self.calibration] if self.calibration else [])]
        if isinstance(self.model, (str, os.PathLike)):
            text = str(self.model)
            paths += [text, text.rpartition("@")[2] if text.startswith("timm:") else text.rpartition(":")[0]]
        return [Path(p) for p in paths if p and os.path.lexists(p)]

    def target_json(self) -> dict[str, Any]:
        """The target options that were given, JSON-ready: ``{"precision": "fp16", "profile": [...]}``."""
        out: dict[str, Any] = {}
        for name, value in sorted(self.target_options.items()):
            if value in (None, False, (), []):
                continue
            text = lambda v: v.text() if hasattr(v, "text") else str(v)  # noqa: E731  (a DimProfile or its text)
            out[name] = [text(v) for v in value] if isinstance(value, (list, tuple)) else value
        return out

    def command(self, *, max_rank: int | None = None) -> list[str] | None:
        """The ``peftc compile`` command that rebuilds the artifact (None for an in-memory model).

        Args:
            max_rank: the slot rank a ``--swappable`` compile chose (recorded even when defaulted).
        """
        if not isinstance(self.model, (str, os.PathLike)):
            return None
        command = ["peftc", "compile", str(self.model)]
        command += _repeated("--adapter", self.adapters) + _repeated("--config", self.configs)
        command += _repeated("--input", self.inputs)
        command += ["--target", self.target, "-o", str(self.out), "--force"]
        flags = {
            "--no-merge": not self.merge,
            "--allow-pickle": self.allow_pickle,
            "--base-residual": self.base_residual,
            "--co-permute": self.co_permute,
        }
        command += [flag for flag, given in flags.items() if given] + [f"--{name}" for name in self.density]
        command += ["--task-id", str(self.task_id)] if self.task_id is not None else []
        command += ["--combine", self.combine] if self.combine else []
        command += ["--task", self.task] if self.task else []
        command += ["--precision", self.precision] if self.precision else []
        command += ["--max-error", repr(self.max_error)] if self.max_error is not None else []
        command += ["--dead-threshold", repr(self.dead_threshold)] if self.dead_threshold is not None else []
        command += ["--merge-policy", self.merge_policy] if self.merge_policy != "auto" else []
        command += ["--quantize-embeddings", self.quantize_embeddings] if self.quantize_embeddings != "none" else []
        command += ["--calibration", str(self.calibration)] if self.calibration else []
        command += (
            ["--calibration-samples", str(self.calibration_samples)]
            if self.calibration_samples != CALIBRATION_SAMPLES
            else []
        )
        for name, value in self.target_json().items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                command.append(flag)
            else:
                command += _repeated(flag, value if isinstance(value, list) else [value])
        if self.swappable:
            rank = self.max_rank if max_rank is None else max_rank
            command += ["--swappable", *(["--max-rank", str(rank)] if rank else [])]  # 0: no LoRA slot
            command += ["--multi-adapter", str(self.multi_adapter)] if self.multi_adapter else []
            command += ["--slot-capacity", str(self.slot_capacity)] if self.slot_capacity is not None else []
            command += ["--slot-dtype", self.slot_dtype] if self.slot_dtype != "fp32" else []
        return command


def check_calibration_file(path: Path) -> None:
    """A calibration file is a regular ``.safetensors``/``.npz`` file (a compile checks it before any work:
    it is read only after the export, and a FIFO would block there, a device never end).

    Raises:
        InputError: naming the file and what it is.
    """
    if path.suffix not in (".safetensors", ".npz"):
        raise InputError(f"--calibration {path}: give a .safetensors or .npz file")
    if not os.path.lexists(path):
        raise InputError(f"--calibration {path}: no such file")
    try:
        reading.check_regular(path)
    except InputError as e:
        raise InputError(f"--calibration {e}") from None


def _check_density(options: CompileOptions) -> None:
    """The density passes run on a merged fp32 artifact (``peftc/density/compiled.py``)."""
    if options.dead_threshold is not None and "prune-dead-neurons" not in options.density:
        raise InputError(f"--dead-threshold {options.dead_threshold!r} applies to --prune-dead-neurons only")
    unknown = [name for name in options.density if name not in DENSITY_PASSES]
    if "sparse-mlp" in unknown:
        raise UnsupportedError(
            "--sparse-mlp: the gather-GEMM's active columns depend on each call's data, which a compiled graph "
            "does not express; measure it in eager with peftc analyze --density --sparse-mlp"
        )
    if unknown:
        raise InputError(f"unknown density pass(es) {unknown}; compile knows {list(DENSITY_PASSES)}")
    flags = " ".join(f"--{name}" for name in options.density)
    tau = options.dead_threshold
    if tau is not None and not (0 <= tau < math.inf):  # also refuses NaN
        raise InputError(f"--dead-threshold {tau!r}: give a finite |activation| >= 0 (a neuron within it is dead)")
    if not options.merge or options.swappable or options.co_permute:
        raise InputError(f"{flags}: the density passes rewrite merged MLP weights; drop --no-merge/--swappable")
    if options.combine or options.task not in (None, "none"):
        raise UnsupportedError(
            f"{flags} with --combine or --task: not supported (the search reads the adapters as given)"
        )
    if options.precision not in (None, "fp32"):
        raise UnsupportedError(f"{flags} with --precision {options.precision}: the density passes run on fp32 only")


def _repeated(flag: str, values: Sequence[Any]) -> list[str]:
    return [item for value in values for item in (flag, str(value))]
