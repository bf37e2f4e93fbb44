"""The method × model family × merged/unmerged matrix (``tests/matrix.py``), verified against PEFT.

Every cell: PEFT itself builds and saves an adapter whose every trained tensor is perturbed
(``models.make_adapter``); peftc parses it, inserts its sites into the traced family model, merges
them or keeps them, and the compiled program must match both peftc's eager reference and PEFT's eager
model within the fp32 bound (1e-5 relative to max|y|) on three seeded input shapes, while the adapter
visibly changes the output. Tracing is shared per family; one cell per method also runs the whole
``peftc.compile`` to an ONNX artifact (the unmerged form, so the method's ops are lowered).
"""

from __future__ import annotations

import functools
from pathlib import Path

import matrix
import models
import prompt_matrix
import pytest
import workdirs
from conftest import export

import peftc
from peftc import ir
from peftc.loaders.inputs import from_transformers, parse_inputs
from peftc.methods.loading import load_adapter
from peftc.passes import PassContext, PassManager, pipelines
from peftc.verification import peft_oracle, program_oracle, verify

FAMILIES = {f.name: f for f in matrix.FAMILIES}
_WORK = workdirs.work_dir("peftc-coverage-")


@functools.cache
def _family(name: str):
    family = FAMILIES[name]
    module = family.build()
    signature = parse_inputs(list(family.inputs)) if family.inputs else from_transformers(module)
    return module, signature, export(module, signature)


@functools.cache
def _adapter(method: str, family: str) -> Path:
    spec = next(m for m in matrix.METHODS if m.name == method)
    module, _, _ = _family(family)
    return models.make_adapter(module, _WORK / f"{method}-{family}", spec.config(FAMILIES[family]), noise=spec.noise)


def _once(oracle):
    """``oracle`` with its outputs kept per input: the merged and the unmerged cell of a pair verify on
    the same seeded inputs, so each oracle computes each case once for both (the outputs are the same
    numbers either way: eval-mode models, fixed inputs)."""
    outputs = {}

    def run(inputs):
        key = tuple((name, str(v.dtype), tuple(v.shape), v.numpy().tobytes()) for name, v in sorted(inputs.items()))
        if key not in outputs:
            outputs[key] = oracle(inputs)
        return outputs[key]

    return run


@functools.cache
def _base_oracle(family: str):
    _, _, base = _family(family)
    return _once(program_oracle(base))


@functools.lru_cache(maxsize=1)  # the merged and unmerged cells of a pair run one after the other
def _adapted(method: str, family: str):
    """The pair's parsed adapter, its reference program (the adapt stage's output, which the passes
    never edit in place) and its oracles."""
    module, _, base = _family(family)
    adapter = load_adapter(_adapter(method, family), ir.module_table(base))
    reference, _ = PassManager(pipelines.adapt([adapter])).run(base, PassContext())
    peft, why = peft_oracle(module, [adapter])
    return adapter, reference, _once(program_oracle(reference)), peft and _once(peft), why


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize(("method", "family"), [(m.name, f.name) for m, f in matrix.cells()])
def test_cell_matches_peft(method, family, merge):
    _, signature, _ = _family(family)
    adapter, reference, reference_oracle, peft, why = _adapted(method, family)
    final, records = PassManager(pipelines.optimize(merge=merge)).run(reference, PassContext())
    sites = {n.target for n in final.graph.nodes if n.op == "call_function" and ir.target_name(n).startswith("peftc.")}
    # Merged: no site op is left. Unmerged: the sites stay (methods that only replace tensors have none).
    assert not sites if merge else bool(sites) == bool(adapter.sites), records
    assert peft is not None, why
    compiled = program_oracle(final)
    report = verify(
        lambda inputs: compiled(inputs),
        signature,
        {"reference": reference_oracle, "peft": peft},
        base=_base_oracle(family),
    )
    worst = {(c.oracle, o.name): o.max_rel for c in report.cases for o in c.outputs}
    assert report.passed, worst
    assert max(report.effect.values()) > 0.02, f"the adapter barely changes the output: {report.effect}"


@pytest.mark.parametrize("method", [m.name for m in matrix.METHODS])
def test_method_compiles_to_a_verified_onnx_artifact(tmp_path, method):
    spec = next(m for m in matrix.METHODS if m.name == method)
    family = FAMILIES[spec.onnx_family]
    module, _, _ = _family(family.name)
    adapter = _adapter(method, family.name)
    artifact = peftc.compile(module, adapter, out=tmp_path / "out", merge=False, inputs=family.inputs or ())
    verification = artifact.manifest.verification
    assert verification["passed"] and {c["oracle"] for c in verification["cases"]} == {"reference", "peft"}
    runner = peftc.load(artifact.path)
    _, signature, _ = _family(family.name)
    inputs = signature.example({**signature.cases(1)[0], "batch": 5}, seed=11)
    expected = models.peft_outputs(module, adapter, inputs)
    got = runner(**inputs)
    from conftest import assert_outputs_close

    assert_outputs_close(got, expected)


def test_readme_table_is_generated_from_the_matrix():
    assert matrix.readme_section(matrix.README.read_text()) == matrix.render()


def test_every_peft_method_peftc_reads_has_a_matrix_row():
    """``peftc methods`` lists no PEFT format left unverified against PEFT: each has a row in this matrix,
    in the prompt-learning matrix (``tests/prompt_matrix.py``), or is in :data:`FOCUSED` (SSF and ZeroI2V
    have no PEFT oracle)."""
    from peft import PeftType

    from peftc.methods.registry import METHODS

    peft_types = {t.value for t in PeftType}
    read = {m.name for m in METHODS if set(m.peft_types) & peft_types}
    verified = {m.name for m in matrix.METHODS} | {m.name for m in prompt_matrix.METHODS} | set(FOCUSED)
    assert read - verified == set()
    assert all((Path(__file__).parent / "methods" / f"{test}.py").is_file() for test in FOCUSED.values())


FOCUSED = {"poly": "test_poly", "xlora": "test_xlora"}
"""Methods verified against PEFT by their own test file instead (Poly needs a ``task_ids`` input and
adapts ``nn.Linear`` only, which only the BERT classifier family has; X-LoRA needs several PEFT-made
expert adapters and a classifier, and PEFT loads its experts only for models whose layers are under
``model.``, the causal LMs: not one of the matrix's families)."""
