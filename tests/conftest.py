"""Shared fixtures: golden tiny models, PEFT-made adapters (cached per session), exported programs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import models

from peftc import ir
from peftc.loaders.inputs import InputSignature, from_transformers

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` on two cores: each worker computes on one thread. Two workers whose torch and onnxruntime
    # pools each span both cores spin against each other (measured on tests/backends/test_onnx.py and
    # tests/test_swap.py in one process: 26% less CPU time with one thread).
    import peftc.backends.ort

    torch.set_num_threads(1)
    peftc.backends.ort.DEFAULT_THREADS = 1

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ADAPTER = REPO / "examples" / "minilm-lora"
MINILM_SPEC = f"{REPO / 'examples' / 'minilm.py'}:model"


@pytest.fixture(scope="session")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="session")
def bert_adapter(golden: Path) -> Path:
    """LoRA on query/value/all dense layers of the tiny BERT."""
    return models.make_lora(models.tiny_bert(), golden / "bert-lora", target_modules=["query", "value", "dense"])


@pytest.fixture(scope="session")
def gpt2_adapter(golden: Path) -> Path:
    return models.make_lora(
        models.tiny_gpt2(), golden / "gpt2-lora", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )


def edited_adapter(src: Path, dst: Path | None = None, *, config=None, tensors=None) -> Path:
    """A copy of the adapter ``src`` at ``dst`` (or ``src`` itself, edited in place) with ``config``
    fields changed and ``tensors`` changed: a dict of key → tensor (None removes the key), or a
    function of the loaded tensors returning the tensors to save."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    path = src if dst is None else Path(shutil.copytree(src, dst))
    if config:
        file = path / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    if tensors is not None:
        weights = load_file(path / "adapter_model.safetensors")
        if callable(tensors):
            weights = tensors(weights)
        else:
            weights.update(tensors)
        kept = {k: v.contiguous() for k, v in weights.items() if v is not None}
        save_file(kept, path / "adapter_model.safetensors")
    return path


def export(model: torch.nn.Module, signature: InputSignature | None = None) -> ir.Program:
    """Trace a model the way ``peftc.compile`` does; inputs a call may leave out (BERT's
    ``token_type_ids``) are left out, so the program takes what ``models.text_inputs`` gives."""
    if signature is None:
        derived = from_transformers(model)
        signature = InputSignature(tuple(i for i in derived.inputs if i.default is None), derived.dims)
    example = signature.example(signature.trace_sizes())
    return ir.trace(model, example, signature.dynamic_shapes())


@pytest.fixture(scope="session")
def bert_program() -> ir.Program:
    return export(models.tiny_bert())


@pytest.fixture(scope="session")
def bert_table(bert_program) -> ir.ModuleTable:
    """The module table of the tiny BERT, which adapters are parsed against."""
    return ir.module_table(bert_program)


@pytest.fixture(scope="session")
def gpt2_program() -> ir.Program:
    return export(models.tiny_gpt2())


def adapt(program: ir.Program, *adapter_paths: Path) -> ir.Program:
    """The reference program: ``program`` with the adapters' sites inserted (the adapt stage)."""
    from peftc.methods.loading import load_adapter
    from peftc.passes import PassContext, PassManager, pipelines

    table = ir.module_table(program)
    adapters = [load_adapter(p, table) for p in adapter_paths]
    return PassManager(pipelines.adapt(adapters)).run(program, PassContext())[0]


def run_passes(program: ir.Program, *passes) -> tuple[ir.Program, list]:
    from peftc.passes import PassContext, PassManager

    return PassManager(list(passes)).run(program, PassContext())


def eager(program: ir.Program, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return dict(ir.flatten_named(program.module()(**inputs)))


def assert_outputs_close(actual: dict, expected: dict, rel: float = 1e-5) -> None:
    """Every output within ``rel`` of max|expected| (the fp32 bound peftc verifies with)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a = torch.as_tensor(actual[name]).double()
        e = torch.as_tensor(expected[name]).double()
        err = (a - e).abs().max().item() / e.abs().max().item()
        assert err <= rel, f"{name}: relative error {err:.3g} > {rel}"


@pytest.fixture(scope="session")
def bert_merged(golden: Path, bert_adapter: Path):
    """The tiny BERT with ``bert_adapter`` merged, compiled to ONNX with the defaults: one compile for
    the tests that only read it (load it, read its manifest); a test that edits an artifact makes its own."""
    import peftc

    return peftc.compile(models.tiny_bert(), bert_adapter, out=golden / "bert-merged")


@pytest.fixture(scope="session")
def bert_dir(golden: Path) -> Path:
    """The tiny BERT saved as a Hugging Face model directory (config.json + safetensors)."""
    path = golden / "bert-hf"
    models.tiny_bert().save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def bert_swappable(golden: Path, bert_dir: Path, bert_adapter: Path) -> Path:
    """The tiny BERT directory compiled swappable with ``bert_adapter``, oracle off: the artifact the
    refusal tests probe (never edited in place: a test that edits it works on a copy)."""
    import peftc

    return peftc.compile(bert_dir, bert_adapter, out=golden / "bert-swappable", swappable=True, oracle=False).path


@pytest.fixture(scope="session")
def minilm_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The bundled example compiled merged and unmerged (real weights, real trained adapter)."""
    import peftc

    out = tmp_path_factory.mktemp("minilm")
    return {
        merge: peftc.compile(MINILM_SPEC, EXAMPLE_ADAPTER, out=out / f"merge-{merge}", merge=merge).path
        for merge in (True, False)
    }
