"""S²FT co-permutation (``--co-permute``): the base is permuted once (whole KV groups, query heads inside
their group, FFN channels) so every S²FT site is a slice; the result matches a dense eager oracle (base
weights with the blocks index-added, written out here) and the unpermuted gather program; the permuted
base is checked before adapters are applied, and that check catches a broken permutation (q rows moved
without o columns; query heads moved across KV groups); selections that are not whole heads, or that no
order makes contiguous, are refused in one line."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import types

import pytest
import s2ft_train
import torch
from cli_run import error_line, run
from conftest import eager
from safetensors.torch import save_file

from peftc import ir
from peftc.driver.build import Sources, Stages, adapted, build
from peftc.driver.modes import Unmerged
from peftc.errors import UnsupportedError, VerificationError
from peftc.methods import s2ft
from peftc.methods.loading import load_adapter
from peftc.passes.base import PassContext
from peftc.sparse import copermute, copermute_mode
from peftc.sparse.copermute import Selection
from peftc.sparse.extract_cli import extract_adapter

HD, REP = 8, 2  # the tiny LLaMA: 4 query heads over 2 KV heads, head_dim 8, FFN 64
HEADS = (4, 2, HD)


def _heads(*heads: int) -> list[int]:
    return [h * HD + i for h in heads for i in range(HD)]


# Layer 0: v = KV head 1, o = query head 1 (half of KV group 0). Layer 1: v = KV head 1, o = query heads
# 0 and 3 (one in each group: contiguous only with both groups reordered inside). q/k/gate columns index
# the hidden state, which keeps its order: their blocks' rows follow the heads/channels (q's indices stay
# scattered, so it stays a gather).
SELECTED = {
    "layers.0.self_attn.q_proj": ("columns", [2, 7, 20]),
    "layers.1.self_attn.k_proj": ("columns", [0, 1, 2, 3]),
    "layers.1.mlp.gate_proj": ("columns", [4, 5, 6]),
    "layers.0.self_attn.v_proj": ("rows", _heads(1)),
    "layers.0.self_attn.o_proj": ("columns", _heads(1)),
    "layers.0.mlp.up_proj": ("rows", [3, 10, 40, 41]),
    "layers.0.mlp.down_proj": ("columns", [10, 41, 50]),
    "layers.1.self_attn.v_proj": ("rows", _heads(1)),
    "layers.1.self_attn.o_proj": ("columns", _heads(0, 3)),
    "layers.1.mlp.up_proj": ("rows", [0, 63]),
    "layers.1.mlp.down_proj": ("columns", [5, 6, 7]),
}


def _write_adapter(path, selected, base):
    """A seeded PEFTC_S2FT adapter; also the dense weights (base + blocks, added entry by entry)."""
    generator = torch.Generator().manual_seed(4)
    tensors, dense = {}, {k: v.detach().clone() for k, v in base.state_dict().items()}
    for module, (side, indices) in selected.items():
        weight = dense[module + ".weight"]
        shape = (len(indices), weight.shape[1]) if side == "rows" else (weight.shape[0], len(indices))
        block = 0.3 * torch.randn(shape, generator=generator)
        tensors[f"{module}.s2ft_{side}"] = torch.tensor(indices, dtype=torch.int64)
        tensors[f"{module}.s2ft_block"] = block
        for j, i in enumerate(indices):
            if side == "rows":
                weight[i, :] += block[j, :]
            else:
                weight[:, i] += block[:, j]
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "PEFTC_S2FT", "format_version": 1, "target_modules": sorted(selected)}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return dense


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The trained checkpoint (``s2ft_train``), its extracted adapter, a hand-made adapter with its dense
    oracle module, and the hand-made adapter's build (load, trace, adapt)."""
    root = tmp_path_factory.mktemp("copermute")
    truth = s2ft_train.train(root)
    extract_adapter(truth.base, truth.finetuned, root / "extracted")
    base = s2ft_train.base_model()
    oracle = copy.deepcopy(base)
    oracle.load_state_dict(_write_adapter(root / "handmade", SELECTED, base))
    built = build(Sources(str(truth.base), (root / "handmade",)), Stages(), stack=True)
    return types.SimpleNamespace(truth=truth, root=root, base=base, oracle=oracle, built=built)


def _inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (2, 9), generator=generator), "attention_mask": torch.ones(2, 9).long()}


def _rel(actual, expected) -> float:
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((a - e).abs().max() / e.abs().max())


def _targets(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


# --------------------------------------------------------------------------------------------
# the plan


def test_plan_makes_every_selection_contiguous_with_whole_kv_groups():
    selections = [Selection(m, 0 if side == "rows" else 1, tuple(i)) for m, (side, i) in SELECTED.items()]
    shapes = {f"layers.{n}.mlp.down_proj.weight": (32, 64) for n in (0, 1)}
    plan = copermute.plan(selections, HEADS, shapes)
    for groups, query in plan.attention.values():
        assert sorted(groups) == [0, 1] and sorted(query) == [0, 1, 2, 3]
        assert [q // REP for q in query] == [g for g in groups for _ in range(REP)], "query heads left their group"
    assert plan.attention["layers.1.self_attn"][1] != (0, 1, 2, 3), "query heads 0 and 3 need reordering"
    for s in selections:
        order = plan.order_for(s.module, s.dim)
        if order is None:  # the hidden-state dimension keeps its order
            assert s.module.endswith(("q_proj", "k_proj", "gate_proj")), s.module
            continue
        positions = copermute.new_positions(order, torch.tensor(s.indices)).sort().values
        assert positions.tolist() == list(range(int(positions[0]), int(positions[0]) + len(s.indices))), s.module


@pytest.mark.parametrize(
    ("selections", "match"),
    [
        (
            [Selection("layers.0.self_attn.v_proj", 0, tuple(range(4)))],
            r"v_proj s2ft_rows select 4 of the 8 rows/columns of KV head 0: .* must be whole heads",
        ),
        (
            [
                Selection("layers.0.self_attn.o_proj", 1, tuple(_heads(0, 2))),
                Selection("layers.0.self_attn.q_proj", 0, tuple(_heads(1, 2))),
            ],
            r"layers.0.self_attn: no order of its 4 query heads over 2 KV heads \(whole KV groups moving together\) makes",
        ),
    ],
    ids=["partial-head", "no-order"],
)
def test_plan_refuses_what_whole_heads_cannot_express(selections, match):
    with pytest.raises(UnsupportedError, match=match):
        copermute.plan(selections, HEADS, {})


# --------------------------------------------------------------------------------------------
# the permuted program against the dense oracle and the gather program


def test_sliced_program_matches_dense_oracle_and_the_gather_program(setup):
    ctx = PassContext()
    optimized = copermute_mode.CoPermuted().optimize(setup.built, ctx)
    gather = Unmerged().optimize(setup.built, ctx).program
    record = optimized.options["co_permute"]
    assert record["base_check"]["max_rel_error"] <= 1e-5 and record["base_check"]["cases"] == 2
    assert record["attention"]["layers.0.self_attn"]["kv_groups"] == [1, 0]
    inputs = _inputs()
    with torch.no_grad():
        expected = setup.oracle(**inputs).last_hidden_state
        assert _rel(setup.base(**inputs).last_hidden_state, expected) > 0.05, "the adapter barely changes the output"
    sliced = eager(optimized.program, inputs)["last_hidden_state"]
    assert _rel(sliced, expected) <= 1e-5
    assert _rel(sliced, eager(gather, inputs)["last_hidden_state"]) <= 1e-5
    gathers = [
        n.meta["peftc"]["module"] for n in optimized.program.graph.nodes if n.target is s2ft.S2FT_LINEAR.overload
    ]
    assert gathers == ["layers.0.self_attn.q_proj"], "only the site on scattered hidden columns stays a gather"
    expected_ops = collections.Counter(_targets(gather))  # the gather program, 10 of its 11 sites now slices
    expected_ops.update({"peftc.s2ft_linear.default": -10, "peftc.s2ft_slice_linear.default": 10})
    assert collections.Counter(_targets(optimized.program)) == +expected_ops, "co-permute added more than slices"


def test_extracted_adapter_permuted_matches_the_finetuned_checkpoint(setup):
    import transformers

    world = setup.built.fp32
    adapter = load_adapter(setup.root / "extracted", ir.module_table(world.base))
    world = dataclasses.replace(world, reference=adapted(world.base, [adapter]))
    built = dataclasses.replace(setup.built, adapters=(adapter,), worlds=(world,))
    program = copermute_mode.CoPermuted().optimize(built, PassContext()).program
    finetuned = transformers.LlamaModel.from_pretrained(str(setup.truth.finetuned)).eval()
    inputs = _inputs(5)
    with torch.no_grad():
        expected = finetuned(**inputs).last_hidden_state
    assert _rel(eager(program, inputs)["last_hidden_state"], expected) <= 1e-5
    assert "peftc.s2ft_linear.default" not in _targets(program)


# --------------------------------------------------------------------------------------------
# the base check catches a broken permutation


def _o_columns_left(orders):
    return {k: v for k, v in orders.items() if not k.endswith("o_proj.weight")}


def _query_heads_ignore_groups(plan):
    return dataclasses.replace(plan, attention={b: (g, tuple(sorted(q))) for b, (g, q) in plan.attention.items()})


@pytest.mark.parametrize("mutation", ["q-rows-without-o-columns", "query-heads-across-kv-groups"])
def test_mutation_broken_permutation_fails_the_base_check(setup, monkeypatch, mutation):
    if mutation == "q-rows-without-o-columns":
        real = copermute.Plan.orders
        monkeypatch.setattr(copermute.Plan, "orders", lambda self: _o_columns_left(real(self)))
    else:
        real_plan = copermute_mode.plan
        monkeypatch.setattr(copermute_mode, "plan", lambda *a: _query_heads_ignore_groups(real_plan(*a)))
    with pytest.raises(VerificationError, match="--co-permute: the permuted base differs from the original"):
        copermute_mode.CoPermuted().optimize(setup.built, PassContext())


# --------------------------------------------------------------------------------------------
# refusals


def test_cli_refuses_a_selection_that_is_not_whole_heads(setup, capsys):
    bad = setup.root / "half-head"
    _write_adapter(bad, {"layers.0.self_attn.v_proj": ("rows", [0, 1, 2, 3])}, setup.base)
    out = setup.root / "out"
    code, _, err = run(capsys, "compile", setup.truth.base, "--adapter", bad, "-o", out, "--no-merge", "--co-permute")
    assert code == 2
    line = error_line(err)
    assert "layers.0.self_attn.v_proj s2ft_rows select 4 of the 8 rows/columns of KV head 0" in line
    assert "--co-permute" in line and not out.exists()
    code, _, err = run(capsys, "compile", setup.truth.base, "--adapter", bad, "-o", out, "--co-permute")
    assert code == 2 and "--co-permute applies to --no-merge artifacts" in error_line(err)


def test_generation_step_is_refused(setup):
    built = dataclasses.replace(setup.built, loaded=dataclasses.replace(setup.built.loaded, task="text-generation"))
    with pytest.raises(
        UnsupportedError,
        match="--co-permute with --task text-generation .given, or inferred from config.architectures.: the KV cache",
    ):
        copermute_mode.plan_for(built)


GATHERS = ("aten.index_select", "aten.index_add", "aten.gather", "aten.scatter", "aten.index.", "aten.index_put")


def test_slice_op_matches_the_gather_op_and_lowers_without_a_gather():
    generator = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(6, 5, generator=generator), torch.randn(6, generator=generator), torch.randn(2, 5)
    for dim, start, k in ((0, 0, 2), (0, 3, 2), (0, 4, 2), (1, 1, 3), (1, 0, 5)):
        block = torch.randn((k, 5) if dim == 0 else (6, k), generator=generator)
        indices = torch.arange(start, start + k)
        gathered = s2ft.S2FT_LINEAR.overload(x, weight, bias, indices, block, dim)
        assert torch.allclose(s2ft.S2FT_SLICE_LINEAR.overload(x, weight, bias, block, start, dim), gathered, atol=1e-6)
    rows, columns = torch.randn(2, 5), torch.randn(6, 2)
    sliced = _Calls([(s2ft.S2FT_SLICE_LINEAR, (rows, 1, 0)), (s2ft.S2FT_SLICE_LINEAR, (columns, 1, 1))], weight, bias)
    gathered = _Calls([(s2ft.S2FT_LINEAR, (torch.tensor([1, 2]), rows, 0))], weight, bias)
    for module, has_gathers in ((sliced, False), (gathered, True)):
        lowered = _targets(torch.export.export(module, (x,)).run_decompositions())
        assert any(t.startswith(GATHERS) for t in lowered) == has_gathers, lowered


class _Calls(torch.nn.Module):
    """Each op on the same input and base weight (what an exporter lowers)."""

    def __init__(self, calls, weight, bias):
        super().__init__()
        self.calls, self.weight, self.bias = calls, weight, bias

    def forward(self, x):
        return tuple(op.overload(x, self.weight, self.bias, *args) for op, args in self.calls)
