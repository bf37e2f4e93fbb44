"""quantize-embeddings: store a quantized base's float embedding table and output head quantized.

bitsandbytes (and so every bnb checkpoint) leaves ``nn.Embedding`` and the LM head in float: on a
~100M LLaMA they are half the artifact. ``--quantize-embeddings`` (a quantized base only):

* ``int8``: each table row stored as int8 codes with one fp32 scale (``CB · SCB / 127``, LLM.int8's
  row format): the embedding becomes ``peftc::int8_embedding`` (ONNX: ``Gather`` of the codes and scales,
  dequantized per call, only the rows looked up), the head ``peftc::int8_linear``;
* ``int4``: the head as NF4, blocks of 64 (``peftc::bnb4_linear``, ONNX ``MatMulBnb4``), the embedding
  int8 as above (a 4-bit gather would need onnxruntime's ``GatherBlockQuantized``, not wired here);
* ``int8-head``: the head int8 as above, the embedding stored fp16 (``peftc::fp16_embedding``, ONNX:
  ``Gather`` + ``Cast``). The embedding's error enters the residual stream before every layer and reaches
  the logits amplified (1.7× on ``benchmarks/qlora.py``'s model), the head's reaches them as it is: an int8
  embedding is what moves the logits past 1e-2 there, an fp16 one adds ~2e-4;
* ``none`` (default): float, as PEFT's QLoRA model keeps them, so the artifact stays exact against it.

The head is the ``aten.linear`` whose stored float weight has the embedding table's shape (an LM head;
a tied head shares the embedding's codes). Each table's error ``‖Ŵ − W‖_F / ‖W‖_F`` is recorded in the
manifest's site table like a merge policy's, and counts in the verification budget the same way.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from peftc import ir
from peftc.passes.base import PassBase, PassContext, PassResult
from peftc.quant import bnb
from peftc.quant.ops import BNB4_LINEAR, FP16_EMBEDDING, INT8_EMBEDDING, INT8_LINEAR, quant_type_number

SCHEMES = ("none", "int8", "int4", "int8-head")
BLOCKSIZE = 64


@dataclasses.dataclass(frozen=True)
class QuantizeEmbeddingsOptions:
    scheme: str = "int8"


class QuantizeEmbeddingsPass(PassBase):
    """Replace float embedding and LM-head tables by quantized ones (see the module docstring)."""

    name = "quantize-embeddings"

    def __init__(self, scheme: str = "int8") -> None:
        self.options = QuantizeEmbeddingsOptions(scheme)
        self.sites: list[dict] = []

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        self.sites = []
        done: dict[str, tuple[fx.Node, ...]] = {}
        shapes = set()
        with torch.no_grad():
            for node in list(editor.graph.nodes):
                if node.op == "call_function" and node.target == torch.ops.aten.embedding.default:
                    weight = editor.tensor(node.args[0])
                    if weight is None or not weight.is_floating_point():  # padding_idx changes only gradients
                        continue
                    editor.replace(node, self._embedding(editor, node, weight, done))
                    shapes.add(tuple(weight.shape))
            for node in list(editor.graph.nodes):
                if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
                    continue
                weight = editor.tensor(node.args[1])
                if weight is None or not weight.is_floating_point() or tuple(weight.shape) not in shapes:
                    continue
                bias = node.args[2] if len(node.args) > 2 else None
                out = self._head(editor, node, weight, bias, done)
                editor.replace(node, out)
        if not self.sites:
            return PassResult(program, False, {"tables": 0})
        editor.eliminate_dead_code()
        editor.remove_unused_state()
        return PassResult(editor.finish(), True, {"tables": len(self.sites)})

    def _embedding(self, editor, node, weight, done) -> fx.Node:
        if self.options.scheme != "int8-head":
            codes, scales = self._int8(editor, node.args[0], weight, done)
            return editor.call(INT8_EMBEDDING.overload, (node.args[1], codes, scales), like=node)
        fqn = editor.fqn(node.args[0])
        if f"{fqn}:fp16" not in done:
            table = weight.to(torch.float16)
            done[f"{fqn}:fp16"] = (editor.add_parameter(f"{fqn}_fp16", table),)
            self._record(fqn, "fp16", weight, table.to(torch.float32), table.numel() * 2)
        return editor.call(FP16_EMBEDDING.overload, (node.args[1], *done[f"{fqn}:fp16"]), like=node)

    def _int8(self, editor, weight_node, weight, done) -> tuple[fx.Node, ...]:
        fqn = editor.fqn(weight_node)
        if f"{fqn}:int8" not in done:
            scales = weight.abs().amax(dim=1).clamp(min=1e-12).to(torch.float32)
            codes = torch.round(weight * (127.0 / scales).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
            back = codes.to(torch.float32) * (scales * bnb.INT8_SCALE).unsqueeze(1)
            done[f"{fqn}:int8"] = (
                editor.add_parameter(f"{fqn}_int8", codes), editor.add_parameter(f"{fqn}_int8_scales", scales)
            )  # fmt: skip
            self._record(fqn, "int8", weight, back, codes.numel() + scales.numel() * 4)
        return done[f"{fqn}:int8"]

    def _head(self, editor, node, weight, bias, done) -> fx.Node:
        fqn = editor.fqn(node.args[1])
        if self.options.scheme in ("int8", "int8-head"):
            codes, scales = self._int8(editor, node.args[1], weight, done)
            return editor.call(INT8_LINEAR.overload, (node.args[0], codes, scales, bias), like=node)
        if f"{fqn}:nf4" not in done:
            packed, absmax = bnb.quantize_4bit(weight.to(torch.float32), "nf4", BLOCKSIZE)
            code = bnb.code_table("nf4")
            rows, cols = weight.shape
            back = bnb.decode_4bit(packed.flatten(), absmax, code, BLOCKSIZE, rows, cols)
            names = ("nf4_packed", "nf4_absmax", "nf4_code")
            done[f"{fqn}:nf4"] = tuple(
                editor.add_parameter(f"{fqn}_{n}", t)
                for n, t in zip(names, (packed.flatten(), absmax, code), strict=True)
            )
            self._record(fqn, "nf4", weight, back, packed.numel() + absmax.numel() * 4)
        rows, cols = weight.shape
        scalars = (BLOCKSIZE, quant_type_number("nf4"), rows, cols)
        return editor.call(BNB4_LINEAR.overload, (node.args[0], *done[f"{fqn}:nf4"], bias, *scalars), like=node)

    def _record(self, fqn: str, fmt: str, weight: torch.Tensor, back: torch.Tensor, stored: int) -> None:
        error = float(torch.linalg.norm(back - weight.float()) / torch.linalg.norm(weight.float()).clamp(min=1e-30))
        self.sites.append(
            {"module": fqn, "policy": "quantized", "error": error, "bytes": stored, "format": fmt,
             "reason": f"--quantize-embeddings {self.options.scheme}"}
        )  # fmt: skip
