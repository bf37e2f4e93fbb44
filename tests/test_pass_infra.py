"""The pass manager enforces the pass contract (onnx-ir style): these passes break it and are caught."""

from __future__ import annotations

import pytest
import torch

from peftc import ir
from peftc.errors import PassError, PostconditionError, PreconditionError
from peftc.passes import PassBase, PassContext, PassManager, PassResult


class Rename(PassBase):
    """A correct pass: replaces every aten.gelu by aten.relu via the editor."""

    name = "gelu-to-relu"

    def run(self, program, ctx):
        editor = ir.ProgramEditor(program, self.name)
        count = 0
        for node in list(editor.graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.aten.gelu.default:
                editor.replace(node, editor.call(torch.ops.aten.relu.default, (node.args[0],), like=node))
                count += 1
        return PassResult(editor.finish() if count else program, count > 0, {"replaced": count})


class MutatesInput(PassBase):
    name = "mutates-input"

    def run(self, program, ctx):
        for node in program.graph.nodes:
            if node.op == "call_function" and node.target is torch.ops.aten.gelu.default:
                node.target = torch.ops.aten.relu.default
        return PassResult(program, True)


class WritesWeightInPlace(PassBase):
    name = "writes-weight-in-place"

    def run(self, program, ctx):
        next(iter(program.state_dict.values())).data.mul_(2.0)
        return PassResult(program, False)


class LiesUnmodified(Rename):
    name = "lies-unmodified"

    def run(self, program, ctx):
        result = super().run(program, ctx)
        return PassResult(result.program, False, result.stats)


class LiesModified(PassBase):
    name = "lies-modified"

    def run(self, program, ctx):
        return PassResult(program, True)


class Fails(PassBase):
    name = "fails"

    def run(self, program, ctx):
        raise RuntimeError("boom")


class BadEnsures(Rename):
    name = "bad-ensures"

    def ensures(self, program, result):
        raise AssertionError("promise broken")


class BadRequires(Rename):
    name = "bad-requires"

    def requires(self, program):
        raise ValueError("not ready")


class DropsMeta(PassBase):
    name = "drops-meta"

    def run(self, program, ctx):
        editor = ir.ProgramEditor(program, self.name)
        node = next(n for n in editor.graph.nodes if n.op == "call_function")
        del node.meta["val"]
        return PassResult(editor.finish(), True)


def _program():
    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.nn.functional.gelu(self.lin(x))

    return torch.export.export(Small().eval(), (torch.randn(3, 4),))


def test_correct_pass_runs_and_records():
    program = _program()
    out, records = PassManager([Rename()]).run(program, PassContext())
    assert ir.op_counts(out)["aten.relu"] == 1 and ir.op_counts(program)["aten.gelu"] == 1
    assert records[0].stats == {"replaced": 1} and records[0].modified
    x = torch.randn(3, 4)
    expected = torch.relu(
        torch.nn.functional.linear(x, program.state_dict["lin.weight"], program.state_dict["lin.bias"])
    )
    torch.testing.assert_close(out.module()(x), expected)


def test_second_run_is_a_no_op():
    program, _ = PassManager([Rename()]).run(_program(), PassContext())
    _, records = PassManager([Rename()]).run(program, PassContext())
    assert records[0].modified is False


@pytest.mark.parametrize("bad", [MutatesInput(), WritesWeightInPlace()], ids=["graph", "tensor"])
def test_catches_pass_that_mutates_its_input(bad):
    with pytest.raises(PassError, match="mutated the program it was given"):
        PassManager([bad]).run(_program(), PassContext())


def test_catches_pass_that_hides_a_change():
    with pytest.raises(PassError, match="reported modified=False but the program changed"):
        PassManager([LiesUnmodified()]).run(_program(), PassContext())


def test_catches_pass_that_claims_a_change():
    with pytest.raises(PassError, match="reported modified=True but the program did not change"):
        PassManager([LiesModified()]).run(_program(), PassContext())


def test_failure_names_the_pass_chain():
    with pytest.raises(PassError, match=r"fails failed after \[gelu-to-relu\]: RuntimeError: boom"):
        PassManager([Rename(), Fails()]).run(_program(), PassContext())


def test_history_from_an_earlier_stage_is_named():
    with pytest.raises(PassError, match=r"failed after \[insert-sites\]"):
        PassManager([Fails()]).run(_program(), PassContext(), history=["insert-sites"])


def test_broken_ensures_is_a_postcondition_error():
    with pytest.raises(PostconditionError, match="promise broken"):
        PassManager([BadEnsures()]).run(_program(), PassContext())


def test_broken_requires_is_a_precondition_error():
    with pytest.raises(PreconditionError, match="not ready"):
        PassManager([BadRequires()]).run(_program(), PassContext())


def test_invariant_check_catches_missing_fake_value():
    # torch's verifier (run when the edited program is built) or peftc's invariant check catches it.
    with pytest.raises(PassError, match="missing val|has no meta"):
        PassManager([DropsMeta()]).run(_program(), PassContext())


def test_dump_ir_writes_one_numbered_file_per_pass(tmp_path):
    PassManager([Rename(), Rename()]).run(_program(), PassContext(dump_dir=tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00_input.txt", "01_gelu-to-relu.txt", "02_gelu-to-relu.txt"]
    assert "aten.gelu" in (tmp_path / "00_input.txt").read_text()
    assert "aten.relu" in (tmp_path / "01_gelu-to-relu.txt").read_text()
