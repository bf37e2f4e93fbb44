"""``--target trt`` on a quantized base: every 4-bit layer dequantized before export (``peftc/quant/merge.py``).

The tiny QLoRA model of ``tests/bnb_checkpoints.py`` (NF4 with double quantization, LoRA on q/v/down) and the
GPTQ checkpoint of ``tests/nbits_checkpoints.py`` go through the build mode ``--target trt`` makes
(``Merged(dequantize=True)``) and the TensorRT target's lowering: ONNX with standard ops only, which
TensorRT's own parser (tensorrt-rtx, on CPU) reads; the engine build needs a GPU and is not run here. The ONNX
is run by onnxruntime against PEFT on the dequantized weights (exact) and PEFT's own QLoRA model on
bitsandbytes' CPU kernels (within ``peftc/quant/compiled.py``'s budget).
"""

from __future__ import annotations

import bnb_checkpoints
import nbits_checkpoints
import numpy as np
import pytest
import torch

from peftc.backends import LowerRequest
from peftc.backends.tensorrt import install as trt_install
from peftc.driver.build import Stages, build
from peftc.driver.modes import Merged
from peftc.driver.sources import Sources
from peftc.passes.base import PassContext
from peftc.quant import compiled, qlora

pytest.importorskip("bitsandbytes")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
EXACT = 1e-5  # fp32 against fp32: the same products summed in another order
DEPTH = 8  # the tiny LLaMA's matmul depth, as tests/test_qlora_compile.py states it
ROOTS = {"nf4-dq": bnb_checkpoints.root, "gptq": nbits_checkpoints.root}


def _built(fmt: str):
    root = ROOTS[fmt]()
    adapter = bnb_checkpoints.adapter(fmt) if fmt == "nf4-dq" else root / f"lora-{fmt}"
    return build(Sources(str(root / fmt), (str(adapter),), task="none"), Stages(None), stack=True)


def _lower(built, program, directory):
    """The TensorRT target's lowering (export, parse; no engine without a GPU) and the ONNX it wrote."""
    from peftc.backends.tensorrt import TensorRTBackend

    request = LowerRequest(program, built.loaded.signature.in_dtype(torch.float32), built.world.reference)
    lowered = TensorRTBackend().lower(request, directory, lambda message: None)
    return lowered, directory / "model.onnx"


def _run(onnx_file) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy())}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    return torch.from_numpy(session.run(["logits"], feeds)[0])


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    if trt_install.find_module() is None:
        pytest.skip(f"TensorRT parser not installed ({trt_install.INSTALL_HINT})")
    out = {}
    for fmt in ROOTS:
        built = _built(fmt)
        optimized = Merged(dequantize=True).optimize(built, PassContext())
        info, onnx_file = _lower(built, optimized.program, tmp_path_factory.mktemp(f"trt-{fmt}"))
        out[fmt] = (built, optimized, info, onnx_file)
    return out


def test_onnx_has_no_contrib_op_and_the_parser_reads_it(lowered):
    import onnx

    for fmt, (_, optimized, info, onnx_file) in lowered.items():
        graph = onnx.load(str(onnx_file), load_external_data=False).graph
        assert not [n.op_type for n in graph.node if n.domain not in ("", "ai.onnx")], fmt
        parse = info.info["tensorrt"]["parse"]
        assert parse["layer_types"]["MATRIX_MULTIPLY"] >= 7 and [o["name"] for o in parse["outputs"]] == ["logits"]
        ops = {str(n.target) for n in optimized.program.graph.nodes if n.op == "call_function"}
        assert not {o for o in ops if o.startswith("peftc.")}, fmt  # no packed layer, no site left


def test_the_table_has_every_layer_float_with_error_zero(lowered):
    rows = lowered["nf4-dq"][1].state
    by_module = {r["module"]: r for r in rows}
    layers = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    assert sorted(by_module) == sorted(layers)
    assert all(r["policy"] == "float" and r["error"] == 0.0 and r["format"] == "nf4" for r in rows)
    assert by_module["model.layers.0.mlp.down_proj"]["bytes"] == 64 * 128 * 4
    assert by_module["model.layers.0.self_attn.q_proj"]["reason"].startswith("--target trt")
    assert by_module["model.layers.0.self_attn.k_proj"]["reason"].startswith("not adapted")
    table = compiled.table(rows)
    assert "model.layers.0.self_attn.k_proj" in table and "not adapted; --target trt" in table
    gptq = lowered["gptq"][1].state
    assert len(gptq) == 7 and {r["format"] for r in gptq} == {"gptq"} and {r["policy"] for r in gptq} == {"float"}


def _verify(built, optimized, onnx_file):
    """The driver's verification of the ONNX (onnxruntime): against the unmerged reference program and PEFT's
    own QLoRA model on bitsandbytes' CPU kernels, within ``peftc/quant/compiled.py``'s budgets."""
    import onnxruntime

    from peftc.driver import precision as precisions

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    class Runner:
        def run(self, feeds):
            return dict(zip(["logits"], session.run(["logits"], {k: v for k, v in feeds.items() if k in names})))

    target = {"outputs": [{"name": "logits", "dtype": "float32"}], "precision": {"depth": DEPTH}}
    target["quantized_sites"] = optimized.state
    return Merged().verify(Runner(), built, target, precisions.plans(built, True, {"budget": None}), 0)


def test_onnxruntime_matches_peft(lowered):
    """Exact against PEFT on the dequantized weights; the driver's verification (PEFT's QLoRA model on
    bitsandbytes' kernels within their bf16 rounding: no site adds error) passes."""
    from test_qlora import dequantized_peft

    with torch.no_grad():
        exact = {"nf4-dq": dequantized_peft("nf4-dq")(input_ids=IDS).logits,
                 "gptq": nbits_checkpoints.peft_on_float("gptq")(input_ids=IDS).logits}  # fmt: skip
    for fmt, (_, _, _, onnx_file) in lowered.items():
        assert qlora.relative_error(_run(onnx_file), exact[fmt]) < EXACT, fmt
    built, optimized, _, onnx_file = lowered["nf4-dq"]
    report = _verify(built, optimized, onnx_file)
    assert report.passed and {c.oracle for c in report.cases} >= {"reference", "peft"}
