"""Every method × (LoRA, rsLoRA, DoRA, LoHa) × (tiny BERT, tiny LLaMA) at the ΔW level, against the
independent oracles of ``combine_oracles.py`` (mergekit's formula transcribed, PEFT's merge_utils,
PCB/LiNeS/OPCM from their formulas), reading the written adapter back through the ``--adapter`` path."""

from __future__ import annotations

import hashlib

import combine_oracles as oracle
import pytest
import torch
from combine_fixtures import VARIANTS, make_pair_fixture  # noqa: F401  (the make_pair fixture)

from peftc.combine import merge, sparsify
from peftc.combine.options import METHODS, CombineOptions
from peftc.combine.run import task_vectors, write
from peftc.errors import InputError

WEIGHTS = (1.0, 0.6)


def combined(model, adapters, options, directory):
    tv = task_vectors(model, adapters)
    directory.mkdir(parents=True)
    report = write(tv, options.checked_for(len(adapters)), directory, str(directory))
    back = task_vectors(model, [directory])
    return tv, report, {k: back.delta(0, k) for k in back.keys}


def expected(tv, options) -> dict[str, torch.Tensor]:
    """The oracle's merged task vector of every tensor (before λ = 1)."""
    w, density = list(options.weights), options.kept
    taus = {k: tv.deltas(k) for k in tv.keys}
    method = options.method
    if method == "opcm":
        linear = {k for k in tv.keys if tv.layout(k)}
        ordered = [{k: w[i] * taus[k][i] for k in tv.keys} for i in options.order]
        return oracle.opcm(ordered, 0.5, linear)
    if method == "lines":
        merged = {k: oracle.weighted_sum(t, w) for k, t in taus.items()}
        alpha = sum(float(sum(t).abs().sum()) for t in taus.values())
        alpha /= sum(float(m.abs().sum()) for m in merged.values()) * len(w)
        return oracle.lines(merged, 2, alpha, 1 - alpha)
    out = {}
    for key, ts in taus.items():
        if method in ("cat", "task-arithmetic"):
            out[key] = oracle.weighted_sum(ts, w)
        elif method == "svd":
            u, s, vh = torch.linalg.svd(oracle.weighted_sum(ts, w))
            out[key] = (u[:, :4] * s[:4]) @ vh[:4]
        elif method == "magnitude-prune":
            out[key] = oracle.weighted_sum([oracle.keep_largest(t, density) for t in ts], w)
        elif method == "ties":
            out[key] = oracle.mergekit_gta(
                [oracle.keep_largest(t, density) for t in ts], w, consensus=True, normalize=True
            )
        elif method.startswith("dare"):
            masks = [oracle.dare_mask(t.shape, density, sparsify.generator(0, key, i)) for i, t in enumerate(ts)]
            kept = [t * m / density for t, m in zip(ts, masks, strict=True)]
            ties = method == "dare-ties"
            out[key] = oracle.mergekit_gta(kept, w, consensus=ties, normalize=ties)
        elif method == "breadcrumbs":
            n = ts[0].numel()
            bands = []
            for t in ts:
                order = torch.sort(t.abs().flatten(), descending=True, stable=True).indices
                mask = torch.zeros(n)
                mask[order[int(0.01 * n) : int(0.01 * n) + int(density * n)]] = 1
                bands.append(t * mask.reshape(t.shape))
            out[key] = oracle.weighted_sum(bands, w)
        elif method == "pcb":
            out[key] = oracle.pcb(ts, w, density)
    return out


def assert_close(actual: dict, wanted: dict, rel: float = 1e-5) -> None:
    assert sorted(actual) == sorted(wanted)
    for key, value in wanted.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=rel * max(1e-3, float(value.abs().max())))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["bert", "llama"])
def test_every_method_matches_its_oracle(make_pair, tmp_path, model_name, variant):
    model, pair = make_pair(model_name, variant)
    for method in METHODS:
        options = CombineOptions(method, weights=WEIGHTS, rank=4, order=(1, 0) if method == "opcm" else None)
        tv, report, back = combined(model, pair, options, tmp_path / method)
        assert report.format == ("lora" if method in ("cat", "svd") else "delta"), method
        # fp32 sums in another order; svd: the truncation of a sum near a repeated singular value
        # is not unique to rounding, so 1e-4 of the largest entry there.
        assert_close(back, expected(tv, options.checked_for(2)), rel=1e-4 if method == "svd" else 2e-5)


def test_conventions_peft_and_mergekit(make_pair, tmp_path):
    """``peft``: PEFT's own merge_utils on ΔW; ``mergekit``: its formula (sign on weighted deltas,
    divide by agreeing weights; DARE keeps the L1 norm) — with a negative weight, where they differ."""
    from peft.utils import merge_utils

    model, pair = make_pair("bert", "lora")
    w = (1.0, -0.5)
    tv = task_vectors(model, pair)
    key = next(k for k in tv.keys if all(tv.delta(i, k).any() for i in range(2)))
    taus = tv.deltas(key)
    for convention in ("peft", "mergekit", "paper"):
        options = CombineOptions("ties", weights=w, density=0.3, convention=convention)
        got, stats = merge.combine_tensor(taus, options, key)
        trimmed = [oracle.keep_largest(t, 0.3) for t in taus]
        if convention == "peft":
            want = merge_utils.ties(taus, torch.tensor(w), 0.3, "total")
        elif convention == "mergekit":
            want = oracle.mergekit_gta(trimmed, list(w), consensus=True, normalize=True)
        else:  # sign on weighted deltas, divide by the agreeing |w|: a negated task stays negated
            weighted = [wi * t for wi, t in zip(w, trimmed, strict=True)]
            sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
            masks = [v.sign() == sign for v in weighted]
            divisor = sum(abs(wi) * m for wi, m in zip(w, masks, strict=True))
            want = sum(v * m for v, m in zip(weighted, masks, strict=True)) / torch.where(divisor > 0, divisor, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert stats.conflicts > 0
    got, _ = merge.combine_tensor(taus, CombineOptions("magnitude-prune", weights=w, density=0.3), key)
    torch.testing.assert_close(got, merge_utils.magnitude_prune(taus, torch.tensor(w), 0.3), rtol=1e-5, atol=1e-6)
    options = CombineOptions("dare-linear", weights=w, density=0.4, convention="mergekit", seed=3)
    got, _ = merge.combine_tensor(taus, options, key)
    masks = [oracle.dare_mask(t.shape, 0.4, sparsify.generator(3, key, i)) for i, t in enumerate(taus)]
    want = oracle.weighted_sum([oracle.l1_rescaled(t, t * m) for t, m in zip(taus, masks, strict=True)], w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ties_mutation_is_caught(make_pair, monkeypatch):
    """A sign flip in the election must make the oracle comparison fail."""
    model, pair = make_pair("bert", "lora")
    tv = task_vectors(model, pair)
    key = next(k for k in tv.keys if all(tv.delta(i, k).any() for i in range(2)))
    options = CombineOptions("ties", weights=WEIGHTS)
    want = oracle.mergekit_gta(
        [oracle.keep_largest(t, 0.2) for t in tv.deltas(key)], list(WEIGHTS), consensus=True, normalize=True
    )
    real = merge.elect
    monkeypatch.setattr(merge, "elect", lambda *args: -real(*args))
    got, _ = merge.combine_tensor(tv.deltas(key), options, key)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_negation_cancels_to_the_base(make_pair, tmp_path):
    model, (a, _) = make_pair("llama", "dora")
    _, report, back = combined(model, [a, a], CombineOptions("task-arithmetic", weights=(1.0, -1.0)), tmp_path / "o")
    assert back and all(not v.any() for v in back.values())
    assert all(r.norm == 0.0 and r.input_norms[0] > 0 for r in report.rows)


def test_seed_reproduces_bit_identical_results(make_pair, tmp_path):
    model, pair = make_pair("bert", "loha")
    digests = []
    for index, seed in enumerate((5, 5, 6)):
        combined(model, pair, CombineOptions("dare-ties", seed=seed), tmp_path / str(index))
        digests.append(hashlib.sha256((tmp_path / str(index) / "adapter_model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_opcm_passes_a_task_through_where_the_merge_is_zero():
    merged, tau = torch.zeros(4, 3), torch.randn(4, 3)
    from peftc.combine.sequential import project

    assert torch.equal(project(merged, tau, 0.5), tau)


@pytest.mark.parametrize(
    ("options", "count", "message"),
    [
        ({"method": "ties", "density": 0.0}, 2, "--density 0.0: give a fraction in (0, 1]"),
        ({"method": "ties", "density": 1.5}, 2, "--density 1.5: give a fraction in (0, 1]"),
        ({"method": "ties", "weights": (1.0,)}, 2, "--weights: 1 weight(s) for 2 adapter(s)"),
        ({"method": "opcm"}, 2, "opcm merges adapters one at a time: give their order"),
        ({"method": "opcm", "order": (0, 0)}, 2, "--order 0,0: give each of 0..1 once"),
        ({"method": "nope"}, 2, "--method 'nope': choose"),
    ],
)
def test_bad_options_are_refused(options, count, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        CombineOptions(**options).checked_for(count)
