"""What TensorRT's symmetric int4 rule costs a GPTQ/AWQ-style asymmetric weight, and what MatMulNBits
costs against an fp32 MatMul in onnxruntime (issue 16).

Run from the repository root::

    python benchmarks/int4_requant.py [--out 1024] [--in 1024] [--group 128] [--json]

A random fp32 weight (std 0.02, heavy-tailed by a Student-t draw) is quantized to asymmetric 4-bit with
group size ``--group`` (round-to-nearest on the min/max grid: the layout GPTQ and AWQ store). Its
dequantized weight ``W_q`` is then requantized symmetrically (zero points 0, codes in [-7, 7], same
blocks) as TensorRT's int4 ``DequantizeLinear`` requires. Reported: the asymmetric quantization error
(``W_q`` vs fp32), the added requantization error (symmetric vs ``W_q``), both as max abs and relative
Frobenius norm (and, for comparison, the symmetric quantization of the fp32 weight itself), and the relative error of ``x·Wᵀ`` on random inputs. Then onnxruntime CPU runs the
asymmetric weight as ``com.microsoft.MatMulNBits`` (accuracy level 0) and ``W_q`` as an fp32 MatMul, side by
side (median of repeated runs; shared machine, noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peftc.backends.ort import OrtRunner
from peftc.quant import matmulnbits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _session(directory: Path, k: int, node, initializers) -> OrtRunner:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    path = directory / f"{node.op_type}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    return OrtRunner(path)


def _median_ms(runner: OrtRunner, feed, repeats: int = 30) -> float:
    runner.run(feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(feed)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    """Print the errors and timings (``--json`` for a dict)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=int, default=1024)
    parser.add_argument("--in", dest="inp", type=int, default=1024)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the Student-t draw uses the global generator
    weight = torch.distributions.StudentT(5.0).sample((args.out, args.inp)) * 0.02
    asym = matmulnbits.quantize(weight, 4, args.group, symmetric=False)
    w_q = matmulnbits.dequantize(asym)
    codes, scales = matmulnbits.symmetric(w_q, args.group)
    w_s = scales.repeat_interleave(args.group, 1)[:, : args.inp] * codes.float()
    x = torch.randn(64, args.inp, generator=gen)
    found = {
        "asym_vs_fp32": {"max_abs": float((w_q - weight).abs().max()), "rel_fro": _rel(w_q, weight)},
        "sym_requant_vs_asym": matmulnbits.requant_error(w_q, args.group),
        "sym_direct_vs_fp32": matmulnbits.requant_error(weight, args.group),
        "sym_requant_output_rel_fro": _rel(x @ w_s.T, x @ w_q.T),
        "asym_output_rel_fro_vs_fp32": _rel(x @ w_q.T, x @ weight.T),
    }
    from onnx import helper, numpy_helper

    directory = Path(tempfile.mkdtemp(prefix="int4-requant-"))
    nbits = _session(directory, args.inp, *matmulnbits.node(asym, "A", "Y", "w"))
    dense = _session(
        directory,
        args.inp,
        helper.make_node("MatMul", ["A", "wt"], ["Y"]),
        [numpy_helper.from_array(w_q.T.contiguous().numpy(), "wt")],
    )
    for batch in (1, 8):
        feed = {"A": x[:batch].numpy()}
        found[f"b{batch}_ms"] = {"matmulnbits": _median_ms(nbits, feed), "fp32_matmul": _median_ms(dense, feed)}
    found["bytes"] = {
        "matmulnbits": sum(t.numel() * t.element_size() for t in (asym.packed, asym.scales, asym.zero_points)),
        "fp32": w_q.numel() * 4,
    }
    print(json.dumps(found, indent=None if args.json else 2))
    for file in directory.iterdir():
        file.unlink()
    directory.rmdir()


if __name__ == "__main__":
    main()
