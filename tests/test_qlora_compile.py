"""QLoRA through ``peftc compile``: the LoRA read as call sites on the packed layers, the ``merge-quantized``
pass under each policy, verification against PEFT's own QLoRA model, the manifest's site table.

The base is traced once per format (``build``, the driver's first stages); each policy is then the
build mode's ``optimize`` and ``verify`` (lowering is left to one CLI compile on an eager toy target and
to ``test_qlora.py``'s ONNX checks of the site ops). The exact oracle is PEFT on the fp32 model whose
weights are bitsandbytes' own dequantization (``test_qlora.dequantized_peft``); PEFT's eager QLoRA model
on bitsandbytes' kernels is the driver's ``peft`` oracle, within ``peftc/quant/compiled.py``'s budget.
"""

from __future__ import annotations

import functools
import json

import bnb_checkpoints
import pytest
import torch
from cli_run import error_line

from peftc.driver.build import Stages, build
from peftc.driver.modes import Merged, Unmerged
from peftc.driver.sources import Sources
from peftc.errors import InputError, UnsupportedError
from peftc.options import CompileOptions
from peftc.passes.base import PassContext
from peftc.quant import policy, qlora
from peftc.quant.compiled import tolerances

pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXACT = 1e-5  # fp32 against fp32: the same products summed in another order


def built_for(fmt: str, **options):
    sources = Sources(str(bnb_checkpoints.root() / fmt), (str(bnb_checkpoints.adapter(fmt)),), task="none", **options)
    return build(sources, Stages(None), stack=True)


@functools.cache
def base_for(fmt: str):
    """The driver's build of ``fmt``'s QLoRA model, PEFT's logits on the dequantized weights at ``IDS``, and
    that PEFT model's module (once per session: ``tests/backends/test_tensorrt_quantized.py`` shares it)."""
    from test_qlora import dequantized_peft

    reference = dequantized_peft(fmt)
    with torch.no_grad():
        exact = reference(input_ids=IDS).logits
    return built_for(fmt), exact, reference.base_model.model


@pytest.fixture(scope="module")
def bases():
    return {fmt: base_for(fmt) for fmt in ("nf4-dq", "int8")}


def optimize(built, mode):
    optimized = mode.optimize(built, PassContext())
    return optimized, optimized.program.module()(input_ids=IDS, attention_mask=torch.ones_like(IDS))["logits"].detach()


def verify(built, mode, optimized, peft=True):
    """The mode's verification of the optimized program run eagerly (the target's lowering aside)."""
    from peftc.driver import precision as precisions

    module = optimized.program.module()

    class Runner:
        def run(self, feeds):
            with torch.no_grad():
                return {k: v.numpy() for k, v in module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).items()}

    target = {"outputs": [{"name": "logits", "dtype": "float32"}], "precision": {"depth": 8}}
    target["quantized_sites"] = optimized.state
    return mode.verify(Runner(), built, target, precisions.plans(built, peft, {"budget": None}), 0)


def targets(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "peftc" in str(n.target)]


@pytest.mark.parametrize("fmt", ["nf4-dq", "int8"])
def test_each_policy_through_the_driver(bases, fmt):
    built, exact, _ = bases[fmt]
    base_op = "peftc.bnb4dq_linear.default" if fmt == "nf4-dq" else "peftc.int8_linear.default"  # absmax kept 8-bit
    site_op = f"peftc.lora_{'bnb4dq' if fmt == 'nf4-dq' else 'int8'}.default"
    requant_op = "peftc.bnb4_linear.default" if fmt == "nf4-dq" else base_op  # a fresh fp32 absmax
    assert targets(built.world.reference).count(site_op) == 3  # the reference: unmerged QLoRA sites
    two_path, out = optimize(built, Merged(merge_policy="two-path"))
    assert targets(two_path.program).count(site_op) == 3 and targets(two_path.program).count(base_op) == 4
    assert qlora.relative_error(out, exact) < EXACT
    assert optimize(built, Unmerged())[0].state == two_path.state  # --no-merge keeps them two-path
    merged, out = optimize(built, Merged(merge_policy="float"))
    assert targets(merged.program) == [base_op] * 4 and qlora.relative_error(out, exact) < EXACT
    assert [r["policy"] for r in merged.state] == ["float"] * 3
    requant, out = optimize(built, Merged(merge_policy="requant"))
    assert sorted(targets(requant.program)) == sorted([base_op] * 4 + [requant_op] * 3)
    errors = [r["error"] for r in requant.state]
    assert all(e > 0 for e in errors) and 1e-4 < qlora.relative_error(out, exact) < sum(errors)
    assert requant.state[0]["bytes"] < two_path.state[0]["bytes"] < merged.state[0]["bytes"]
    requantized_by_bitsandbytes(fmt, requant.program.state_dict, bases[fmt][2])
    # Against PEFT's own QLoRA model on bitsandbytes' kernels: the exact policy on NF4, requant on int8.
    checked, mode = (
        (two_path, Merged(merge_policy="two-path")) if fmt == "nf4-dq" else (requant, Merged(merge_policy="requant"))
    )
    report = verify(built, mode, checked)
    assert report.passed and {c.oracle for c in report.cases} == {"reference", "peft"}


def requantized_by_bitsandbytes(fmt, state, reference):
    """The requantized tensors in the program are what bitsandbytes makes of PEFT's merged weight."""
    F = pytest.importorskip("bitsandbytes").functional
    lora = reference.get_submodule("model.layers.0.self_attn.q_proj")
    merged = (lora.base_layer.weight + lora.get_delta_weight("default")).detach().float()
    if fmt == "int8":
        codes, scales, _ = F.int8_vectorwise_quant(merged.clone())
        assert torch.equal(state["model.layers.0.self_attn.q_proj.weight_int8"], codes)
        assert torch.equal(state["model.layers.0.self_attn.q_proj.scb"], scales)
    else:
        packed, _ = F.quantize_4bit(merged, blocksize=64, quant_type="nf4")
        assert torch.equal(state["model.layers.0.self_attn.q_proj.packed"], packed.flatten())


def test_auto_chooses_per_site_and_the_table_shows_it(bases):
    nf4 = optimize(bases["nf4-dq"][0], Merged(merge_policy="auto", max_error=1e-2))[0].state
    assert [r["policy"] for r in nf4] == ["two-path-fp16"] * 3 and "requant exceeds it" in nf4[0]["reason"]
    exact = optimize(bases["nf4-dq"][0], Merged(merge_policy="auto", max_error=1e-9))[0].state
    assert [r["policy"] for r in exact] == ["two-path"] * 3 and "fp16 factors exceed it" in exact[0]["reason"]
    assert [r["policy"] for r in optimize(bases["nf4-dq"][0], Merged(merge_policy="auto", max_error=0.5))[0].state] == [
        "requant"
    ] * 3
    int8 = optimize(bases["int8"][0], Merged(merge_policy="auto"))[0].state
    assert [r["policy"] for r in int8] == ["requant"] * 3 and all(r["error"] <= 1e-2 for r in int8)
    text = qlora_table(int8)
    assert "model.layers.0.mlp.down_proj" in text and text.count("requant") == 3 and "int8" in text


def qlora_table(rows):
    from peftc.quant.compiled import table

    return table(rows)


def test_quantized_embeddings_are_recorded_like_sites(bases):
    """``--quantize-embeddings``: the tables stored int8 (head NF4 for int4; embedding fp16 for int8-head), each
    error in the site table and the model within the budget of the exact one (the gathers in ONNX: test_qlora.py)."""
    built, exact, reference = bases["nf4-dq"]
    table = reference.model.embed_tokens.weight.detach()
    for scheme, lookup, head, formats in (
        ("int8", "int8", "int8_linear", ["int8", "int8"]),
        ("int4", "int8", "bnb4_linear", ["int8", "nf4"]),
        ("int8-head", "fp16", "int8_linear", ["fp16", "int8"]),
    ):
        optimized, out = optimize(built, Merged(merge_policy="two-path", embeddings=scheme))
        found = targets(optimized.program)
        assert found.count(f"peftc.{lookup}_embedding.default") == 1 and found[-1] == f"peftc.{head}.default"
        tables = [r for r in optimized.state if r["policy"] == "quantized"]
        assert [r["module"] for r in tables] == ["model.embed_tokens.weight", "lm_head.weight"]
        assert all(0 < r["error"] < 0.1 for r in tables) and [r["format"] for r in tables] == formats
        assert (
            1e-5
            < qlora.relative_error(out, exact)
            < tolerances({"quantized_sites": tables}, {"reference": 0})["reference"].rel
        )
        assert "model.embed_tokens.weight" not in optimized.program.state_dict
    assert tables[0]["error"] == pytest.approx(float((table.half().float() - table).norm() / table.norm()), rel=1e-3)
    assert tables[0]["bytes"] == table.numel() * 2


def test_fp16_factors(bases, monkeypatch):
    """two-path-fp16: the factors stored fp16 under their keys, the error each site adds what PEFT's own factors
    give when rounded to fp16, the model within that of the exact one and of PEFT's QLoRA model; a factor
    stored with a wrong scale leaves the verification budget."""
    built, exact, reference = bases["nf4-dq"]
    optimized, out = optimize(built, Merged(merge_policy="two-path-fp16"))
    state = optimized.program.state_dict
    assert {state[k].dtype for k in state if ".lora_" in k} == {torch.float16} and len(optimized.state) == 3
    for row in optimized.state:
        lora = reference.get_submodule(row["module"])
        a, b = lora.lora_A["default"].weight.detach(), lora.lora_B["default"].weight.detach()
        delta = lora.scaling["default"] * (b.half().float() @ a.half().float() - b @ a)
        merged = lora.base_layer.weight.detach().float() + lora.get_delta_weight("default")
        assert row["error"] == pytest.approx(float(delta.norm() / merged.norm()), rel=1e-3) and 0 < row["error"] < 1e-3
        blocks = merged.numel() // 64  # NF4, double-quantized: 8-bit absmax, an fp32 scale per 256, the 256 codes
        nf4 = merged.numel() // 2 + blocks + -(-blocks // 256) * 4 + 256 * 4
        assert row["bytes"] == nf4 + (a.numel() + b.numel()) * 2
    budget = tolerances({"quantized_sites": optimized.state}, {"reference": 0})["reference"].rel
    assert qlora.relative_error(out, exact) < budget
    assert verify(built, Merged(merge_policy="two-path-fp16"), optimized).passed
    candidates = policy.candidates

    def off(base, a, b, scale, **kwargs):
        found = candidates(base, a, b, scale)
        module, error = found["two-path-fp16"]
        module.lora_B.mul_(1.01)  # an fp16 factor stored with a wrong scale
        return {**found, "two-path-fp16": (module, error)}

    monkeypatch.setattr(policy, "candidates", off)
    assert qlora.relative_error(optimize(built, Merged(merge_policy="two-path-fp16"))[1], exact) > budget


def decoded_int8(state: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A requant-int8 site's weight ``[N, K]`` decoded from its bytes by MatMulNBits' published layout (one
    8-bit code a byte along K, ``scale · (code − zero)`` per block of 32), and each weight's block scale."""
    codes = state[f"{module}.nbits_packed"]  # [N, k_blocks, 32]
    scales, zeros = state[f"{module}.nbits_scales"], state[f"{module}.nbits_zero_points"]
    n, blocks, size = codes.shape
    weight = scales.unsqueeze(-1) * (codes.float() - zeros.float().unsqueeze(-1))
    return weight.reshape(n, blocks * size), scales.repeat_interleave(size, dim=1)


def test_requant_int8_against_peft(bases, monkeypatch):
    """requant-int8: one MatMulNBits-layout op a site whose bytes decode to PEFT's merged weight within half
    a step, the model within the sites' budget of the exact QLoRA model and verified against PEFT's own
    QLoRA model; codes stored in reverse order within each block (a pack along the wrong direction of K)
    leave the budget. On an int8 base it is refused naming the site."""
    built, exact, reference = bases["nf4-dq"]
    optimized, out = optimize(built, Merged(merge_policy="requant-int8"))
    found = targets(optimized.program)
    assert found.count("peftc.blocks_linear.default") == 3 and found.count("peftc.bnb4dq_linear.default") == 4
    for row in optimized.state:
        lora = reference.get_submodule(row["module"])
        merged = (lora.base_layer.weight + lora.get_delta_weight("default")).detach().float()
        weight, step = decoded_int8(optimized.program.state_dict, row["module"])
        assert (weight - merged).abs().le(step / 2 * (1 + 1e-5) + 1e-7).all()  # round to nearest on the grid
        n, k = merged.shape
        assert row["policy"] == "requant-int8" and row["format"] == "nf4" and 1e-3 < row["error"] <= 1e-2
        assert row["bytes"] == n * k + n * (k // 32) * (4 + 1)  # codes, fp32 scales, uint8 zero points
    budget = tolerances({"quantized_sites": optimized.state}, {"reference": 0})["reference"].rel
    assert 1e-4 < qlora.relative_error(out, exact) < budget
    report = verify(built, Merged(merge_policy="requant-int8"), optimized)
    assert report.passed and {c.oracle for c in report.cases} == {"reference", "peft"}
    with pytest.raises(UnsupportedError, match=r"q_proj: --merge-policy requant-int8 on a base in int8; .*NF4/FP4"):
        optimize(bases["int8"][0], Merged(merge_policy="requant-int8"))
    candidates = policy.candidates

    def reversed_codes(base, a, b, scale, **kwargs):
        found = candidates(base, a, b, scale)
        module, error = found["requant-int8"]
        module.packed = module.packed.flip(-1)
        return {**found, "requant-int8": (module, error)}

    monkeypatch.setattr(policy, "candidates", reversed_codes)
    assert qlora.relative_error(optimize(built, Merged(merge_policy="requant-int8"))[1], exact) > budget


def test_budgets_come_from_the_sites(bases):
    rows = [{"error": 0.01, "format": "nf4"}, {"error": 0.02, "format": "nf4"}]
    found = tolerances({"quantized_sites": rows, "precision": {"depth": 3}}, {"reference": 0, "peft": 0})
    assert found["reference"].rel == pytest.approx(3 * (0.01**2 + 0.02**2) ** 0.5 + 1e-5)  # SAFETY · √Σe²
    assert found["peft"].rel == pytest.approx(found["reference"].rel + 2**-8 * 3)  # bf16 u·√(3·depth)
    assert tolerances({"quantized_sites": [{"error": 0.0, "format": "int8"}]}, {"reference": 0}) == {}


def test_broken_requant_is_caught_by_the_reference(bases, monkeypatch):
    """One site's requantized row scales 5 % off what was measured: beyond the root-sum-square budget, though
    within the first-order one it replaced (3 × the sum of the sites' errors)."""
    built, _, _ = bases["int8"]
    choose = policy.choose

    def off(name, *args):
        choice, module = choose(name, *args)
        if name.endswith("v_proj"):
            module.scb.mul_(1.05)
        return choice, module

    monkeypatch.setattr(policy, "choose", off)
    optimized = optimize(built, Merged(merge_policy="requant"))[0]
    report = verify(built, Merged(merge_policy="requant"), optimized, peft=False)
    assert {c.oracle for c in report.cases if not c.ok} == {"reference"}
    worst = max(o.max_rel for c in report.cases for o in c.outputs)
    assert worst < 3 * sum(r["error"] for r in optimized.state)


def test_refusals(bases, tmp_path, capsys):
    """Each refusal names the flag (and the site); the CLI prints one line and exits 2."""
    from peftc import options
    from peftc.quant import cli

    assert cli.MERGE_POLICIES == options.MERGE_POLICIES == policy.POLICIES
    from peftc.cli import main

    with pytest.raises(InputError, match="--merge-policy 'fast'"):
        CompileOptions("m", ("a",), tmp_path / "o", merge_policy="fast")
    with pytest.raises(InputError, match="--merge-policy requant with --no-merge"):
        CompileOptions("m", ("a",), tmp_path / "o", merge_policy="requant", merge=False)
    with pytest.raises(
        UnsupportedError, match=r"q_proj: --merge-policy requant adds error 0\.0\d+ > --max-error 0\.01"
    ):
        optimize(bases["nf4-dq"][0], Merged(merge_policy="requant", max_error=1e-2))
    with pytest.raises(
        UnsupportedError, match=r"q_proj: --merge-policy two-path-fp16 adds error .* > --max-error 1e-09"
    ):
        optimize(bases["nf4-dq"][0], Merged(merge_policy="two-path-fp16", max_error=1e-9))
    args = [str(bnb_checkpoints.root() / "nf4-dq"), "--adapter", str(bnb_checkpoints.adapter("nf4-dq"))]
    for flag in ("requant", "two-path-fp16"):
        assert main(["compile", *args, "-o", str(tmp_path / "o"), "--merge-policy", flag, "--no-merge"]) == 2
        assert f"--merge-policy {flag} with --no-merge" in error_line(capsys.readouterr().err)


def test_cli_compile_inspect_and_the_qlora_alias(tmp_path, capsys, monkeypatch):
    """The CLI end to end on an in-memory eager target (PEFT's oracle and the ONNX lowering of the site ops
    are checked above and in test_qlora.py; an ONNX export of the whole model costs tens of seconds)."""
    from peftc.backends import BACKENDS
    from peftc.cli import main

    monkeypatch.setitem(BACKENDS, "memory", f"{__name__}:MemoryBackend")
    out = tmp_path / "out"
    args = [str(bnb_checkpoints.root() / "int8"), "--adapter", str(bnb_checkpoints.adapter("int8"))]
    assert main(["compile", *args, "-o", str(out), "--target", "memory", "--max-error", "0.01", "--no-oracle"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "LoRA merge policy per site" in shown and shown.count("requant") >= 3
    assert main(["inspect", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in manifest["target"]["quantized_sites"]] == ["requant"] * 3
    assert manifest["status"] == "ok" and manifest["options"]["merge_policy"] == "auto"
    assert main(["qlora", *args, "-o", str(out)]) == 2  # the alias: compile's own refusal (exists, no --force)
    assert "exists" in error_line(capsys.readouterr().err)


PROGRAMS: dict[str, object] = {}


class MemoryBackend:
    """A target that keeps the optimized program in this process and runs it eagerly."""

    name = "memory"

    def __init__(self):
        from peftc.backends.base import Capabilities

        self.capabilities = Capabilities(dynamic_shapes=True, adapter_swap=False, device="cpu")

    def available(self):
        from peftc.backends.base import Availability

        return Availability(True)

    def versions(self):
        return {}

    def lower(self, request, directory, progress):
        from peftc import ir
        from peftc.backends.base import Lowered

        (directory / "program.txt").write_text("in memory")
        PROGRAMS["last"] = request.program
        names = ir.output_names(request.program)
        outputs = [{"name": n, "dtype": "float32", "shape": []} for n in names]
        inputs = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in request.signature.inputs]
        return Lowered(files=("program.txt",), inputs=tuple(inputs), outputs=tuple(outputs), info={})

    def load(self, directory, target):
        from peftc import ir

        module, program = PROGRAMS["last"].module(), PROGRAMS["last"]

        class Runner:
            input_names, output_names = ir.user_input_names(program), ir.output_names(program)

            def run(self, feeds):
                with torch.no_grad():
                    outputs = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
                return {k: v.numpy() for k, v in ir.flatten_named(outputs).items()}

        return Runner()
