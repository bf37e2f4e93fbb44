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


def graph(kind: str, tensors: dict, level: int = 0, bits: int = 4) -> tuple[bytes, float]:
    """The ONNX model of one kernel kind, and the largest per-linear weight error it adds to NF4."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs, worst = [], [], [], 0.0
    for name, (n, k) in SHAPES.items():
        packed, absmax, dense = tensors[name]
        source = "x2" if k == 2048 else "x"
        if kind == "bnb4":
            inits += [
                numpy_helper.from_array(packed.numpy(), f"{name}.B"),
                numpy_helper.from_array(absmax.numpy(), f"{name}.absmax"),
            ]
            nodes.append(helper.make_node("MatMulBnb4", [source, f"{name}.B", f"{name}.absmax"], [name], domain="com.microsoft",
                                          K=k, N=n, block_size=64, quant_type=1))  # fmt: skip
        else:
            blocks = matmulnbits.quantize(dense, bits, 32)
            worst = max(
                worst, float(torch.linalg.norm(matmulnbits.dequantize(blocks) - dense) / torch.linalg.norm(dense))
            )
            made, more = matmulnbits.node(blocks, source, name, name)
            for attribute in made.attribute:
                if attribute.name == "accuracy_level":
                    attribute.i = level
            nodes.append(made)
            inits += more
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", SEQ, 768]),
              helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["b", SEQ, 2048])]  # fmt: skip
    model = helper.make_model(
        helper.make_graph(nodes, kind, inputs, outputs, inits),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )
    return model.SerializeToString(), worst


def main() -> None:
    """Time both kernels side by side and print the table."""
    import tempfile

    from peftc.backends.ort import OrtRunner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tensors = weights()
    gen = np.random.default_rng(1)
    feeds = {b: {"x": gen.standard_normal((b, SEQ, 768), dtype=np.float32),
                 "x2": gen.standard_normal((b, SEQ, 2048), dtype=np.float32)} for b in (1, 8)}  # fmt: skip
    expected = {b: {n: f[("x2" if k == 2048 else "x")] @ tensors[n][2].numpy().T for n, (_, k) in SHAPES.items()}
                for b, f in feeds.items()}  # fmt: skip
    kinds = {"MatMulBnb4 (NF4)": ("bnb4", 0, 4), "MatMulNBits acc0": ("nbits", 0, 4),
             "MatMulNBits acc4": ("nbits", 4, 4), "MatMulNBits 8b acc4": ("nbits", 4, 8)}  # fmt: skip
    sessions, rows = {}, {}
    folder = Path(tempfile.mkdtemp(prefix="peftc-kernels-"))
    for index, (label, (kind, level, bits)) in enumerate(kinds.items()):
        blob, worst = graph(kind, tensors, level, bits)
        (folder / f"{index}.onnx").write_bytes(blob)
        sessions[label] = OrtRunner(folder / f"{index}.onnx")
        out = list(sessions[label].run(feeds[8]).values())
        error = max(float(np.abs(o - expected[8][n]).max() / np.abs(expected[8][n]).max()) for o, n in zip(out, SHAPES))
        rows[label] = {"weight_error_vs_nf4": worst, "output_error_vs_nf4": error, "ms": {1: [], 8: []}}
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
    print(f"{'':<20}{'b1 ms':>8}{'b8 ms':>8}{'b1 ×bnb4':>10}{'b8 ×bnb4':>10}{'weight err':>12}{'output err':>12}")
    for label, r in rows.items():
        print(f"{label:<20}{r['ms'][1]:>8.2f}{r['ms'][8]:>8.2f}{r['ms'][1] / base[1]:>10.2f}{r['ms'][8] / base[8]:>10.2f}"
              f"{r['weight_error_vs_nf4']:>12.3g}{r['output_error_vs_nf4']:>12.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
