"""merge-quantized: fold each QLoRA site (``peftc/quant/sites.py``) by its merge policy.

For every ``peftc::lora_bnb4`` / ``lora_bnb4dq`` / ``lora_int8`` / ``lora_nbits`` node the pass rebuilds the packed layer
from the program's tensors and asks ``peftc.quant.policy.choose`` what it becomes (``--merge-policy``;
``auto``: the smallest artifact within ``--max-error``; ``auto-speed``: the fastest), then rewrites the node:

* ``float``: ``aten.linear(x, W + ΔW, b)`` on a new fp32 parameter ``<module>.weight``;
* ``requant``: the base op again (``bnb4_linear`` / ``int8_linear``) on the requantized tensors, which
  replace the layer's own under the same keys (same shapes and dtypes; a double-quantized layer becomes
  ``bnb4_linear`` on a new fp32 ``<module>.absmax``);
* ``two-path``: the site stays (the packed GEMM plus the LoRA branch);
* ``two-path-fp16``: the site stays, its ``lora_A`` / ``lora_B`` replaced by fp16 copies under their keys
  (the site op computes in fp32 whatever the factors' dtype);
* ``requant-int8``: ``peftc::blocks_linear`` (ONNX ``MatMulNBits``) on new tensors ``<module>.nbits_packed``,
  ``.nbits_scales``, ``.nbits_zero_points`` (the packed NF4 tensors go when nothing else reads them).

With ``dequantize`` (``--target trt``: TensorRT's parser reads neither ``MatMulBnb4`` nor ``MatMulNBits``,
and takes int4 only as symmetric ``DequantizeLinear``, which NF4 codebooks and asymmetric GPTQ/AWQ grids
reach only by a second rounding), ``auto`` / ``auto-speed`` take ``float`` at every site, and every
un-adapted 4-bit layer (``bnb4_linear``, ``nbits_linear``) becomes ``aten.linear`` on its dequantized fp32
weight (error 0, a row ``policy: float`` in the table); LLM.int8 layers lower to standard ops and stay.

The choices (format, policy, error added, bytes, why) are kept on the pass (:attr:`MergeQuantizedPass.sites`)
for the manifest's table; the pass's stats count each policy.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch import fx

from peftc import ir
from peftc.passes.base import PassBase, PassContext, PassResult, fresh_name
from peftc.quant import policy as policies
from peftc.quant.modules import Bnb4Linear, Bnb4NestedLinear, Int8Linear, NBitsLinear
from peftc.quant.ops import BLOCKS_LINEAR, BNB4_LINEAR, BNB4DQ_LINEAR, FORMATS, NBITS_LINEAR, QUANT_TYPES
from peftc.quant.sites import BASE_OF, LORA_BNB4, LORA_BNB4DQ, LORA_INT8, OPS


@dataclasses.dataclass(frozen=True)
class MergeQuantizedOptions:
    policy: str = "auto"
    """``--merge-policy``: one of ``policy.POLICIES``."""
    max_error: float | None = None
    """``auto``'s per-site budget (None: ``policy.DEFAULT_MAX_ERROR``)."""
    dequantize: bool = False
    """Float weights for every 4-bit layer (``--target trt``; see the module docstring)."""


class MergeQuantizedPass(PassBase):
    """Fold or keep every QLoRA site by the merge policy."""

    name = "merge-quantized"

    def __init__(self, policy: str = "auto", max_error: float | None = None, dequantize: bool = False) -> None:
        self.options = MergeQuantizedOptions(policy, max_error, dequantize)
        self.sites: list[dict] = []
        """One row per adapted module: :meth:`policy.SiteChoice.row` and the base's ``format``."""

    def run(self, program: ir.Program, ctx: PassContext) -> PassResult:
        editor = ir.ProgramEditor(program, self.name)
        ops = {op.overload: op for op in OPS}
        chosen: dict[str, tuple[policies.SiteChoice, torch.nn.Module]] = {}
        self.sites = []
        with torch.no_grad():
            for node in list(editor.graph.nodes):
                if node.op != "call_function" or node.target not in ops:
                    continue
                module = node.meta.get(ir.meta.PEFTC, {}).get("module", node.name)
                if module not in chosen:  # a module called several times is decided once
                    layer, factors = _layer(editor, node, ops[node.target])
                    chosen[module] = self._choose(module, layer, factors)
                    self.sites.append({**chosen[module][0].row(), "format": _format(layer)})
                _rewrite(editor, node, ops[node.target], *chosen[module])
            if self.options.dequantize:
                self.sites += dequantize_layers(editor)
        counts = Counter(row["policy"] for row in self.sites)
        stats = {p: counts.get(p, 0) for p in ("float", "requant", "requant-int8", "two-path", "two-path-fp16")}
        if not any(n for p, n in stats.items() if p != "two-path"):
            return PassResult(program, False, stats)
        editor.eliminate_dead_code()
        editor.remove_unused_state()
        return PassResult(editor.finish(), True, stats)

    def _choose(
        self, module: str, layer: torch.nn.Module, factors: tuple
    ) -> tuple[policies.SiteChoice, torch.nn.Module]:
        policy, max_error = self.options.policy, self.options.max_error
        if not (self.options.dequantize and policy in policies.AUTO_ORDER):
            return policies.choose(module, layer, *factors, policy, max_error)
        choice, merged = policies.choose(module, layer, *factors, "float", max_error)
        return dataclasses.replace(choice, reason=TRT_REASON), merged

    def ensures(self, program: ir.Program, result: PassResult) -> None:
        left = sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target in {o.overload for o in OPS})
        if left and result.stats.get("two-path", 0) + result.stats.get("two-path-fp16", 0) == 0:
            raise AssertionError(f"{left} QLoRA sites left, none kept two-path")


TRT_REASON = "--target trt: TensorRT reads no packed NF4/FP4/GPTQ/AWQ layer; dequantized and merged in fp32"
NOT_ADAPTED = "not adapted; --target trt: dequantized (TensorRT reads no packed 4-bit layer)"
DEQUANTIZED = (BNB4_LINEAR, BNB4DQ_LINEAR, NBITS_LINEAR)
"""The un-adapted layers ``dequantize`` turns into float ``aten.linear`` (their ONNX ops are contrib ops);
``compiled.PACKED_OPS`` names the same ops for the driver, which imports no torch."""


def dequantize_layers(editor: ir.ProgramEditor) -> list[dict]:
    """Rewrite every :data:`DEQUANTIZED` node as ``aten.linear`` on a new fp32 parameter ``<module>.weight``
    (the op's own decoding: its eager body on the identity, transposed); one table row per layer."""
    ops = {op.overload: op for op in DEQUANTIZED}
    rows: dict[str, dict] = {}
    weights: dict[str, fx.Node] = {}  # a layer called several times is dequantized once
    for node in list(editor.graph.nodes):
        if node.op != "call_function" or node.target not in ops:
            continue
        op, values = ops[node.target], _values(editor, node)
        bias_at = 1 + len(op.tensor_roles)
        module = ir.meta.peftc_meta(node).get("module") or ir.meta.module_path(node) or node.name
        if module not in weights:
            dense = dequantized(op, values)
            weights[module] = editor.add_parameter(fresh_name(editor, f"{module}.weight"), dense)
            fmt = FORMATS[values[bias_at + 1]] if op is NBITS_LINEAR else QUANT_TYPES[values[bias_at + 2]]
            rows[module] = {"module": module, "policy": "float", "error": 0.0, "bytes": dense.numel() * 4,
                            "reason": NOT_ADAPTED, "format": fmt}  # fmt: skip
        args = (node.args[0], weights[module], node.args[bias_at])
        editor.replace(node, editor.call(torch.ops.aten.linear.default, args, like=node))
    return list(rows.values())


def dequantized(op, values: list) -> torch.Tensor:
    """The fp32 weight ``[out, in]`` of a :data:`DEQUANTIZED` node's argument ``values``: the op's own eager
    body on the identity (bias left out), transposed."""
    bias_at = 1 + len(op.tensor_roles)
    eye = torch.eye(values[-1], dtype=torch.float32)  # in_features, the last scalar of both ops
    return op.body(eye, *values[1:bias_at], None, *values[bias_at + 1 :]).T.contiguous()


def _values(editor: ir.ProgramEditor, node: fx.Node) -> list:
    return [editor.tensor(a) if isinstance(a, fx.Node) else a for a in node.args]


def _layer(editor: ir.ProgramEditor, node: fx.Node, op) -> tuple[torch.nn.Module, tuple]:
    """The packed layer of a QLoRA site node, and its LoRA factors and scale (fp32)."""
    values = _values(editor, node)
    base = values[1 : op.operands_start]
    a, b, scale, *scalars = values[op.operands_start :]
    bias = base[-1]
    if op is LORA_BNB4:
        blocksize, quant_type, out_features, in_features = scalars
        packed, absmax, code = base[:3]
        layer = Bnb4Linear(packed, absmax, code, blocksize, QUANT_TYPES[quant_type], (out_features, in_features), bias)
    elif op is LORA_BNB4DQ:
        blocksize, quant_type, nested_blocksize, offset, out_features, in_features = scalars
        nested = dict(zip(("absmax_codes", "nested_absmax", "nested_code"), base[1:4], strict=True))
        layer = Bnb4NestedLinear(
            base[0], nested, nested_blocksize, offset, base[4], blocksize, QUANT_TYPES[quant_type],
            (out_features, in_features), bias,
        )  # fmt: skip
    elif op is LORA_INT8:
        layer = Int8Linear(base[0], base[1], bias)
    else:
        fmt, bits, version, group_size, out_features, in_features = scalars
        tensors = dict(zip(("qweight", "qzeros", "scales", "g_idx"), base[:4], strict=True))
        layer = NBitsLinear(FORMATS[fmt], bits, version, group_size, tensors, (out_features, in_features), bias)
    return layer, (a.to(torch.float32), b.to(torch.float32), scale)


def _format(layer: torch.nn.Module) -> str:
    if isinstance(layer, Bnb4Linear):
        return layer.quant_type
    return "int8" if isinstance(layer, Int8Linear) else layer.fmt


def _rewrite(editor: ir.ProgramEditor, node: fx.Node, op, choice: policies.SiteChoice, layer: torch.nn.Module) -> None:
    x, base = node.args[0], list(node.args[1 : op.operands_start])
    if choice.policy == "two-path":
        return
    if choice.policy == "two-path-fp16":
        for arg, value in zip(
            node.args[op.operands_start : op.operands_start + 2], (layer.lora_A, layer.lora_B), strict=True
        ):
            editor.set_tensor(editor.fqn(arg), value.detach())
        return
    if choice.policy == "float":
        fqn = f"{choice.module}.weight"
        weight = editor.node_for(fqn) or editor.add_parameter(fresh_name(editor, fqn), layer.weight.detach())
        out = editor.call(torch.ops.aten.linear.default, (x, weight, base[-1]), like=node)
    elif choice.policy == "requant-int8":
        tensors = []
        for role in ("packed", "scales", "zero_points"):
            fqn = f"{choice.module}.nbits_{role}"
            tensors.append(editor.node_for(fqn) or editor.add_parameter(fresh_name(editor, fqn), getattr(layer, role)))
        scalars = (layer.bits, layer.block_size, layer.accuracy_level, layer.out_features, layer.in_features)
        out = editor.call(BLOCKS_LINEAR.overload, (x, *tensors, base[-1], *scalars), like=node)
    elif op is LORA_BNB4DQ:  # requant: fresh fp32 absmax (no double quantization), the same codes table
        editor.set_tensor(editor.fqn(base[0]), layer.packed)
        fqn = f"{choice.module}.absmax"
        absmax = editor.node_for(fqn) or editor.add_parameter(fresh_name(editor, fqn), layer.absmax)
        scalars = node.args[op.operands_start + 3 :]
        blocksize, quant_type, _, _, out_features, in_features = scalars
        args = (x, base[0], absmax, base[4], base[-1], blocksize, quant_type, out_features, in_features)
        out = editor.call(BNB4_LINEAR.overload, args, like=node)
    else:  # requant: the layer's tensors replaced under their keys
        new = [layer.packed, layer.absmax] if isinstance(layer, Bnb4Linear) else [layer.weight_int8, layer.scb]
        for arg, value in zip(base, new, strict=False):
            editor.set_tensor(editor.fqn(arg), value)
        scalars = node.args[op.operands_start + 3 :]
        out = editor.call(BASE_OF[op.name].overload, (x, *base, *scalars), like=node)
    editor.replace(node, out)
