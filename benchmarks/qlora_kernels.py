"""MatMulBnb4 (NF4 as bitsandbytes stores it) against MatMulNBits (4-bit blocks requantized from the NF4
weight) on onnxruntime's CPU kernels, for the decoder linears of ``benchmarks/qlora.py``'s model.

Run from the repository root::

    python benchmarks/qlora_kernels.py [--reps N] [--json]

One ONNX graph per kernel holds the seven linears of one LLaMA decoder layer (hidden 768, intermediate
2048: q/k/v/o 768→768, gate/up 768→2048, down 2048→768) on inputs ``[batch, 64, 768]`` and
``[batch, 64, 2048]``; weights ``N(0, 0.02)`` quantized to NF4 (blocks of 64, ``peftc.quant.bnb``).
MatMulNBits gets the NF4-dequantized weight requantized to asymmetric 4-bit blocks of 32
(``peftc.quant.matmulnbits.quantize``), with ``accuracy_level`` 0 (fp32 compute) and 4 (int8 activations),
and to 8-bit blocks (accuracy level 4);
its error is reported as the relative Frobenius error of the requantized weight against the NF4 one
(what a site would add), and each graph's output error against fp32 matmuls on the NF4 weights.
Latency: median ms of interleaved calls at batch 1 and 8 (one thread pool, the machine's defaults). The
machine this runs on is shared: read the ratios measured side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftc.quant import bnb, matmulnbits

SHAPES = {"q": (768, 768), "k": (768, 768), "v": (768, 768), "o": (768, 768), "gate": (2048, 768),
          "up": (2048, 768), "down": (768, 2048)}  # fmt: skip
SEQ = 64


def weights() -> dict[str, torch.Tensor]:
    """The NF4-dequantized weight of each linear, and its packed form, keyed by name."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.02
        packed, absmax = bnb.quantize_4bit(w, "nf4", 64)
        out[name] = (
            packed.flatten(),
            absmax,
            bnb.decode_4bit(packed.flatten(), absmax, bnb.code_table("nf4"), 64, n, k),
        )
    return out


KINDS = {
    "MatMulBnb4 (NF4)": ("bnb4", {}),
    "fp32 MatMul": ("dense", {"dtype": "fp32"}),
    "fp16 MatMul": ("dense", {"dtype": "fp16"}),
    **{f"NBits4 bs{bs}{' sym' if sym else ''} acc{lv}": ("nbits", {"bits": 4, "block": bs, "sym": sym, "level": lv})
       for bs in (32, 64, 128) for sym in (False, True) for lv in (0, 4)},
    **{f"NBits8 bs{bs}{' sym' if sym else ''} acc{lv}": ("nbits", {"bits": 8, "block": bs, "sym": sym, "level": lv})
       for bs in (32, 64, 128) for sym in (False, True) for lv in (0, 4)},
    "MatMulBnb4 + LoRA r16": ("bnb4", {"lora": True}),
    "NBits8 bs32 acc4 + LoRA r16": ("nbits", {"bits": 8, "block": 32, "sym": False, "level": 4, "lora": True}),
}  # fmt: skip
"""Label → (kind, options) of every lowering measured."""


def _linear(name: str, kind: str, options: dict, tensors: dict, source: str) -> tuple[list, list, float]:
    """The nodes and initializers of one linear ``name`` lowered as ``kind`` (``lora``: plus an unmerged
    rank-16 branch, the two-path policy on top of it), and the weight error it adds."""
    from onnx import helper, numpy_helper

    if not options.get("lora"):
        return _base(name, kind, options, tensors, source)
    nodes, inits, error = _base(name, kind, options, tensors, source, f"{name}.base")
    (n, k), gen = SHAPES[name], torch.Generator().manual_seed(3)
    a_t, b_t = torch.randn(k, 16, generator=gen) * 0.02, torch.randn(16, n, generator=gen) * 0.02
    inits += [numpy_helper.from_array(a_t.numpy(), f"{name}.At"), numpy_helper.from_array(b_t.numpy(), f"{name}.Bt")]
    nodes += [helper.make_node("MatMul", [source, f"{name}.At"], [f"{name}.xa"]),
              helper.make_node("MatMul", [f"{name}.xa", f"{name}.Bt"], [f"{name}.lora"]),
              helper.make_node("Add", [f"{name}.base", f"{name}.lora"], [name])]  # fmt: skip
    return nodes, inits, error


def _base(name: str, kind: str, options: dict, tensors: dict, source: str, out: str = "") -> tuple[list, list, float]:
    from onnx import TensorProto, helper, numpy_helper

    (n, k), (packed, absmax, dense) = SHAPES[name], tensors[name]
    if kind == "bnb4":
        inits = [numpy_helper.from_array(packed.numpy(), f"{name}.B"),
                 numpy_helper.from_array(absmax.numpy(), f"{name}.absmax")]  # fmt: skip
        made = helper.make_node("MatMulBnb4", [source, f"{name}.B", f"{name}.absmax"], [out or name],
                                domain="com.microsoft", K=k, N=n, block_size=64, quant_type=1)  # fmt: skip
        return [made], inits, 0.0
    if kind == "dense":
        half = options["dtype"] == "fp16"
        weight = dense.t().contiguous().to(torch.float16 if half else torch.float32)
        error = float(torch.linalg.norm(weight.t().float() - dense) / torch.linalg.norm(dense))
        inits = [numpy_helper.from_array(weight.numpy(), f"{name}.W")]
        if not half:
            return [helper.make_node("MatMul", [source, f"{name}.W"], [out or name])], inits, error
        nodes = [helper.make_node("Cast", [source], [f"{name}.x16"], to=TensorProto.FLOAT16),
                 helper.make_node("MatMul", [f"{name}.x16", f"{name}.W"], [f"{name}.y16"]),
                 helper.make_node("Cast", [f"{name}.y16"], [out or name], to=TensorProto.FLOAT)]  # fmt: skip
        return nodes, inits, error
    blocks = matmulnbits.quantize(dense, options["bits"], options["block"], symmetric=options["sym"])
    error = float(torch.linalg.norm(matmulnbits.dequantize(blocks) - dense) / torch.linalg.norm(dense))
    made, inits = matmulnbits.node(blocks, source, out or name, name)
    for attribute in made.attribute:
        if attribute.name == "accuracy_level":
            attribute.i = options["level"]
    return [made], inits, error


def graph(kind: str, tensors: dict, options: dict) -> tuple[bytes, float, int]:
    """The ONNX model of one lowering, the largest per-linear weight error it adds to NF4, and its weight bytes."""
    from onnx import TensorProto, helper

    nodes, inits, outputs, worst = [], [], [], 0.0
    for name, (_, k) in SHAPES.items():
        made, more, error = _linear(name, kind, options, tensors, "x2" if k == 2048 else "x")
        nodes += made
        inits += more
        worst = max(worst, error)
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", SEQ, 768]),
              helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", SEQ, 2048])]  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, kind, inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )
    size = sum(len(t.raw_data) for t in inits)
    return model.SerializeToString(), worst, size


def main() -> None:
    """Time every lowering side by side and print the table."""
    import re
    import tempfile

    from peftc.backends.ort import OrtRunner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default="", help="a regular expression: the labels to measure (MatMulBnb4 always)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tensors = weights()
    gen = np.random.default_rng(1)
    feeds = {b: {"x": gen.standard_normal((b, SEQ, 768), dtype=np.float32),
                 "x2": gen.standard_normal((b, SEQ, 2048), dtype=np.float32)} for b in (1, 8)}  # fmt: skip
    expected = {b: {n: f[("x2" if k == 2048 else "x")] @ tensors[n][2].numpy().T for n, (_, k) in SHAPES.items()}
                for b, f in feeds.items()}  # fmt: skip
    kinds = {
        label: spec for label, spec in KINDS.items() if label.startswith("MatMulBnb4") or re.search(args.only, label)
    }
    sessions, rows = {}, {}
    folder = Path(tempfile.mkdtemp(prefix="peftc-kernels-"))
    fp16_bytes = 2 * sum(n * k for n, k in SHAPES.values())
    for index, (label, (kind, options)) in enumerate(kinds.items()):
        blob, worst, size = graph(kind, tensors, options)
        (folder / f"{index}.onnx").write_bytes(blob)
        sessions[label] = OrtRunner(folder / f"{index}.onnx")
        out = list(sessions[label].run(feeds[8]).values())
        error = max(float(np.abs(o - expected[8][n]).max() / np.abs(expected[8][n]).max()) for o, n in zip(out, SHAPES))
        error = float("nan") if options.get("lora") else error  # the branch changes the output by design
        rows[label] = {"weight_error_vs_nf4": worst, "output_error_vs_nf4": error, "vs_fp16": size / fp16_bytes,
                       "ms": {1: [], 8: []}}  # fmt: skip
    for _ in range(args.reps):
        for label, session in sessions.items():
            for b in (1, 8):
                start = time.perf_counter()
                session.run(feeds[b])
                rows[label]["ms"][b].append((time.perf_counter() - start) * 1e3)
    for row in rows.values():
        row["ms"] = {b: statistics.median(v) for b, v in row["ms"].items()}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    base = rows["MatMulBnb4 (NF4)"]["ms"]
    print(
        f"{'':<24}{'b1 ms':>8}{'b8 ms':>8}{'b1 ×bnb4':>10}{'b8 ×bnb4':>10}{'×fp16 B':>9}{'weight err':>12}{'output err':>12}"
    )
    for label, r in rows.items():
        print(f"{label:<24}{r['ms'][1]:>8.2f}{r['ms'][8]:>8.2f}{r['ms'][1] / base[1]:>10.2f}{r['ms'][8] / base[8]:>10.2f}"
              f"{r['vs_fp16']:>9.3f}{r['weight_error_vs_nf4']:>12.3g}{r['output_error_vs_nf4']:>12.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
