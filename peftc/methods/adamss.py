"""AdaMSS, adaptive multi-subspace fine-tuning (PEFT ``ADAMSS``): its weight transform and parser.

AdaMSS projects the input (with a 1 appended when the layer has a bias) onto ``r`` frozen right
singular directions ``N`` (``adamss_newB``, ``[r, d_in(+1)]``) and maps them back through one trained
low-rank pair per *subspace*: a cluster of output rows. For subspace ``i`` with rows ``S_i``::

    ΔW⁺[S_i] = B_i · A_i · N          (A_i [r_i, r], B_i [|S_i|, r_i]; other rows 0)
    W' = W + ΔW⁺[:, :d_in],   b' = b + ΔW⁺[:, d_in]     (the last column only with a bias)

PEFT's ``forward`` (``x⁺ Nᵀ A_iᵀ B_iᵀ`` scattered to the rows ``S_i``) and its ``merge`` (weight and
bias) are the same function (measured 2e-7 relative apart on a small model). peftc stacks the
subspaces into one product ``L·M·N`` — ``M`` the ``A_i`` stacked, ``L`` ``[d_out, Σr_i]`` the ``B_i`` on
their rows and block columns, zero elsewhere — which adds only exact zeros to PEFT's sums. Each target
becomes an ``adamss_weight`` site on its weight and, with a bias, an ``adamss_bias`` site on it; the
update is formed in fp32 and cast back.

**Regenerated row clusters.** Which rows form each subspace is not in the file. PEFT recomputes it
whenever it loads the adapter, and so does peftc, the same way: the left singular vectors ``U``
``[d_out, r]`` of ``[W | b]`` (fp32) from ``torch.svd_lowrank(q=r, niter=2)`` under
``torch.manual_seed(random_seed)`` in a forked CPU generator, clustered by scikit-learn's ``KMeans``
(``min(num_subspaces, d_out)`` clusters, ``init="random"``, ``n_init=1``, ``max_iter=10``,
``random_state=123456789``) — PEFT's AdaMSS needs scikit-learn too, and peftc asks for it only for
AdaMSS adapters. The clusters' sizes must equal the rows of the file's ``B_i``; a file whose sizes
differ was clustered otherwise (another scikit-learn or torch) and is refused, since PEFT would then
scatter its rows wrongly.

**Adapter files.** Keys ``<m>.adamss_A.<i>``, ``<m>.adamss_B.<i>`` per subspace and ``<m>.adamss_newB``
per ``nn.Linear`` target (the only type PEFT's AdaMSS adapts); ``modules_to_save`` tensors are full
replacements. The per-subspace ranks ``r_i`` are read from the file (PEFT resizes its parameters to
the file's shapes when it loads them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from peftc.errors import InputError, UnsupportedError
from peftc.ir.modules import ModuleTable
from peftc.methods import common
from peftc.methods.base import Adapter, AdapterSource, AdapterTensor, ParseOptions, Site
from peftc.methods.record import Method
from peftc.ops import SiteOp, composite_op

ADAMSS_WEIGHT = SiteOp(
    name="adamss_weight", form="weight", tensor_roles=("adamss_L", "adamss_M", "adamss_newB"), scalars=()
)
ADAMSS_BIAS = SiteOp(
    name="adamss_bias", form="weight", tensor_roles=("adamss_L", "adamss_M", "adamss_newB"), scalars=()
)


def delta(left: torch.Tensor, mid: torch.Tensor, new_b: torch.Tensor) -> torch.Tensor:
    """``ΔW⁺ = L·M·N`` in fp32, ``[d_out, d_in(+1)]``."""
    f = torch.float32
    return left.to(f) @ mid.to(f) @ new_b.to(f)


@composite_op("adamss_weight(Tensor weight, Tensor adamss_l, Tensor adamss_m, Tensor adamss_new_b) -> Tensor")
def adamss_weight(
    weight: torch.Tensor, adamss_l: torch.Tensor, adamss_m: torch.Tensor, adamss_new_b: torch.Tensor
) -> torch.Tensor:
    """``W + ΔW⁺[:, :d_in]`` (fp32 math, cast back)."""
    update = delta(adamss_l, adamss_m, adamss_new_b)[:, : weight.shape[1]]
    return (weight.to(torch.float32) + update).to(weight.dtype)


@composite_op("adamss_bias(Tensor bias, Tensor adamss_l, Tensor adamss_m, Tensor adamss_new_b) -> Tensor")
def adamss_bias(
    bias: torch.Tensor, adamss_l: torch.Tensor, adamss_m: torch.Tensor, adamss_new_b: torch.Tensor
) -> torch.Tensor:
    """``b + ΔW⁺[:, -1]`` (fp32 math, cast back)."""
    return (bias.to(torch.float32) + delta(adamss_l, adamss_m, adamss_new_b)[:, -1]).to(bias.dtype)


_INITIAL_RANKS = "sets the per-subspace ranks at initialisation; PEFT and peftc read them from the file"
_ASA = ("use_asa", "asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval", "asa_importance_beta",
        "asa_uncertainty_beta", "asa_schedule_exponent")  # fmt: skip
FIELDS = common.Fields(
    honoured=(
        "r",
        "num_subspaces",
        "random_seed",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
    ),
    ignored={
        "init_weights": "initialisation only (the trained factors are in the file)",
        "subspace_rank": _INITIAL_RANKS,
        "use_dynamic_rank": _INITIAL_RANKS,
        "svd_threshold": _INITIAL_RANKS,
        **dict.fromkeys(_ASA, "adaptive subspace allocation (ASA) only chooses which subspaces train"),
    },
    defaults={"r": 100, "num_subspaces": 5, "random_seed": 0},
)
TYPES = ("Linear", "NonDynamicallyQuantizableLinear")
_KEY = re.compile(r"(?P<module>.+)\.adamss_(?:(?P<role>[AB])\.(?P<index>\d+)|newB)$")


def _role_of(path: str) -> tuple[str, str] | None:
    match = _KEY.match(path)
    if not match:
        return None
    return match["module"], f"{match['role']}{match['index']}" if match["role"] else "newB"


def parse(source: AdapterSource, modules: ModuleTable, options: ParseOptions) -> Adapter:
    """Interpret an AdaMSS adapter against the base model's modules.

    Raises:
        InputError: a key for no targeted module, a targeted module without its tensors, a subspace
            count or shape that does not fit the module and config, or row clusters whose sizes differ
            from the file's (naming the module and both sizes).
        UnsupportedError: a config field peftc does not know, a target that is not ``nn.Linear``, or
            scikit-learn missing.
    """
    honoured, ignored = common.classify_fields(source, "ADAMSS", FIELDS)
    common.check_number(source, "r", "num_subspaces", "random_seed")
    settings = {k: FIELDS.defaults[k] if honoured[k] is None else honoured[k] for k in FIELDS.defaults}
    if source.config.get("target_modules") is None:
        raise InputError(f"{source.config_path}: AdaMSS config has no target_modules")
    for field in ("r", "num_subspaces"):
        if isinstance(settings[field], bool) or not isinstance(settings[field], int) or settings[field] < 1:
            raise InputError(f"{source.config_path}: {field}={settings[field]!r}; give an integer >= 1")
    grouped = common.group_keys(source, modules, _role_of, bias_field=None)
    common.layouts(source, grouped, modules, "AdaMSS", TYPES)
    sites = []
    for path, tensors in sorted(grouped.modules.items()):
        sites += _sites(source, modules, path, tensors, settings)
    return common.adapter(source, "adamss", sites, grouped, honoured, ignored)


def _sites(
    source: AdapterSource,
    modules: ModuleTable,
    path: str,
    tensors: Mapping[str, AdapterTensor],
    settings: Mapping[str, int],
) -> list[Site]:
    module = modules[path]
    weight = modules.tensors[module.params["weight"]].detach().to(torch.float32)
    bias = modules.tensors[module.params["bias"]].detach().to(torch.float32) if "bias" in module.params else None
    augmented = weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)
    d_out, width = augmented.shape
    rank = min(int(settings["r"]), d_out, width)
    count = min(int(settings["num_subspaces"]), d_out)
    common.require_roles(source, path, tensors, ["newB", *(f"{x}{i}" for i in range(count) for x in "AB")])
    extra = sorted(set(tensors) - {"newB", *(f"{x}{i}" for i in range(count) for x in "AB")})
    if extra:
        raise InputError(
            f"{source.describe(tensors[extra[0]].key)}: {path!r} has {count} subspaces "
            f"(min(num_subspaces={settings['num_subspaces']}, d_out={d_out})), so PEFT would not load this key"
        )
    common.expect_shape(source, tensors["newB"], (rank, width), f"[r={rank}, {width}] for {path!r}")
    rows = clusters(augmented, rank, count, int(settings["random_seed"]))
    left, mid = _stacked(source, path, tensors, rows, rank, d_out)
    site_tensors = {"adamss_L": left, "adamss_M": mid, "adamss_newB": tensors["newB"]}
    info = {"module_type": module.class_name, "r": rank, "subspaces": count, "rows": [len(r) for r in rows],
            "base_weight_derived": "AdaMSS's subspaces are rebuilt from the base weight when it is loaded"}  # fmt: skip
    sites = [Site(path, ADAMSS_WEIGHT.name, site_tensors, {}, info, "weight")]
    if bias is not None:
        sites.append(Site(path, ADAMSS_BIAS.name, site_tensors, {}, info, "bias"))
    return sites


def clusters(augmented: torch.Tensor, rank: int, count: int, seed: int) -> list[torch.Tensor]:
    """The output rows of each subspace, as PEFT clusters them when it loads the adapter."""
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:
        raise UnsupportedError(
            "AdaMSS adapters need scikit-learn (pip install scikit-learn): PEFT rebuilds their row clusters with it "
            "when it loads them, and so does peftc"
        ) from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(augmented, q=rank, niter=2)
    kmeans = KMeans(n_clusters=count, init="random", n_init=1, max_iter=10, random_state=123456789)
    labels = torch.from_numpy(kmeans.fit_predict(u[:, :rank].numpy().astype("float32"))).long()
    return [torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)]


def _stacked(
    source: AdapterSource,
    path: str,
    tensors: Mapping[str, AdapterTensor],
    rows: list[torch.Tensor],
    rank: int,
    d_out: int,
) -> tuple[AdapterTensor, AdapterTensor]:
    """``L`` and ``M`` (module docstring) from the per-subspace factors, checked against the clusters."""
    count = sum(1 for role in tensors if role.startswith("A"))
    if len(rows) != count:
        raise InputError(
            f"{source.weights_path}: {path!r} clusters into {len(rows)} subspaces when clustered as PEFT clusters it, "
            f"but the file has {count}"
        )
    blocks = []
    for i, members in enumerate(rows):
        a, b = tensors[f"A{i}"], tensors[f"B{i}"]
        ri = a.tensor.shape[0] if a.tensor.dim() == 2 else -1
        common.expect_shape(source, a, (ri, rank), f"[r_{i}, r={rank}] for subspace {i} of {path!r}")
        common.expect_shape(
            source,
            b,
            (len(members), ri),
            f"[{len(members)}, r_{i}={ri}]: subspace {i} of {path!r} has {len(members)} rows when clustered as PEFT "
            "clusters them (a file clustered by another scikit-learn or torch cannot be placed)",
        )
        blocks.append((members, b.tensor.to(torch.float32), a.tensor.to(torch.float32)))
    width = sum(b.shape[1] for _, b, _ in blocks)
    left = torch.zeros(d_out, width)
    column = 0
    for members, b, _ in blocks:
        left[members, column : column + b.shape[1]] = b
        column += b.shape[1]
    mid = torch.cat([a for _, _, a in blocks], dim=0)
    keys = f"{path}.adamss_B.*"
    return (
        AdapterTensor(f"{keys} placed on the rows of their clusters", left),
        AdapterTensor(f"{path}.adamss_A.* stacked", mid),
    )


METHOD = Method("adamss", ("ADAMSS",), parse, ops=(ADAMSS_WEIGHT, ADAMSS_BIAS), fields=FIELDS)
