"""GPTQ / AWQ / plain block weights repacked for ``com.microsoft.MatMulNBits``, run by onnxruntime on CPU
against ``A · Wᵀ`` with the decoded fp32 weight; TensorRT's symmetric int4 through ``DequantizeLinear``."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import quant_packing as qp
import torch
from onnx import TensorProto, helper

from peftc.errors import UnsupportedError
from peftc.quant import awq, gptq, matmulnbits

OUT, IN, GS = 32, 64, 16
A = torch.randn(3, IN, generator=torch.Generator().manual_seed(5))


def _case(act_order: bool = False):
    gen = torch.Generator().manual_seed(1)
    group = torch.arange(IN) // GS
    if act_order:
        group = group[torch.randperm(IN, generator=gen)]
    q, zeros, scales = qp.quantize(torch.randn(OUT, IN, generator=gen), group, IN // GS, 4, gen)
    return q, zeros, scales, group


def _gptq_config(version: int) -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": GS, "checkpoint_format": ["gptq", "gptq_v2"][version - 1]}


def _run(blocks: matmulnbits.Blocks, a: torch.Tensor = A) -> torch.Tensor:
    made, initializers = matmulnbits.node(blocks, "A", "Y", "proj")
    graph = helper.make_graph(
        [made],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"A": a.numpy()})[0])


def _assert_fp32_close(got: torch.Tensor, weight: torch.Tensor, a: torch.Tensor = A) -> None:
    """Within fp32 accumulation rounding: |err| ≤ K·2⁻²³·(|A|·|W|ᵀ) per element (plus a tiny floor)."""
    exact = a.double() @ weight.double().t()
    bound = a.shape[1] * 2.0**-23 * (a.double().abs() @ weight.double().abs().t()) + 1e-30
    assert bool(((got.double() - exact).abs() <= bound).all()), float((got.double() - exact).abs().max())


@pytest.mark.parametrize("version", [1, 2])
def test_gptq_repacked_runs_in_onnxruntime(version: int) -> None:
    q, zeros, scales, group = _case()
    tensors = qp.gptq(q, zeros, scales, group, 4, version, g_idx=True)
    weight = gptq.dequantize(tensors, _gptq_config(version), "L")
    blocks = matmulnbits.from_gptq(tensors, _gptq_config(version), "L")
    assert torch.equal(matmulnbits.dequantize(blocks), weight)
    assert blocks.packed.shape == (OUT, IN // GS, GS // 2) and blocks.zero_points.shape == (OUT, 2)
    _assert_fp32_close(_run(blocks), weight)


def test_awq_repacked_runs_in_onnxruntime() -> None:
    q, zeros, scales, _ = _case()
    config = {"quant_method": "awq", "bits": 4, "group_size": GS, "version": "gemm"}
    tensors = qp.awq(q, zeros, scales)
    weight = awq.dequantize(tensors, config, "L")
    blocks = matmulnbits.from_awq(tensors, config, "L")
    assert torch.equal(matmulnbits.dequantize(blocks), weight)
    _assert_fp32_close(_run(blocks), weight)


@pytest.mark.parametrize(("bits", "symmetric", "k"), [(4, False, 64), (4, True, 64), (8, False, 80), (2, False, 64)])
def test_block_quantization_runs_in_onnxruntime(bits: int, symmetric: bool, k: int) -> None:
    """Round-to-nearest within half a step; K = 80 leaves a partial last block (padded)."""
    weight = torch.randn(OUT, k, generator=torch.Generator().manual_seed(2))
    blocks = matmulnbits.quantize(weight, bits, 32, symmetric)
    deq = matmulnbits.dequantize(blocks)
    step = blocks.scales.repeat_interleave(32, 1)[:, :k]
    assert bool(((deq - weight).abs() <= step / 2 + 1e-6).all())
    assert (blocks.zero_points is None) == symmetric
    a = torch.randn(3, k, generator=torch.Generator().manual_seed(6))
    _assert_fp32_close(_run(blocks, a), deq, a)


def test_low_nibble_first_is_what_onnxruntime_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation: packing the first code in the HIGH nibble (and reading it back the same way) keeps the
    reference self-consistent, but onnxruntime's output no longer matches it."""
    q, zeros, scales, _ = _case()
    config = {"quant_method": "awq", "bits": 4, "group_size": GS}
    pack, unpack = matmulnbits.pack_rows, matmulnbits.unpack_rows
    monkeypatch.setattr(matmulnbits, "pack_rows", lambda c, b: pack(c.flip(-1), b).flip(-1) if b == 4 else pack(c, b))
    monkeypatch.setattr(
        matmulnbits, "unpack_rows", lambda p, b, n: unpack(p.flip(-1), b, p.shape[-1] * 8 // b).flip(-1)[..., :n]
    )
    blocks = matmulnbits.from_awq(qp.awq(q, zeros, scales), config, "L")
    weight = matmulnbits.dequantize(blocks)
    assert torch.equal(weight, awq.dequantize(qp.awq(q, zeros, scales), config, "L"))
    with pytest.raises(AssertionError):
        _assert_fp32_close(_run(blocks), weight)


def test_refusals() -> None:
    q, zeros, scales, group = _case(act_order=True)
    with pytest.raises(UnsupportedError, match=r"L\.g_idx: act-order groups are not contiguous"):
        matmulnbits.from_gptq(qp.gptq(q, zeros, scales, group, 4, 2, g_idx=True), _gptq_config(2), "L")
    with pytest.raises(UnsupportedError, match=r"quantize: group_size 8; MatMulNBits blocks are powers of two ≥ 16"):
        matmulnbits.quantize(torch.randn(4, 16), 4, 8)  # names the caller: "quantize"
    with pytest.raises(UnsupportedError, match=r"3-bit codes"):
        matmulnbits.quantize(torch.randn(4, 16), 3, 16)


def test_tensorrt_symmetric_int4_through_dequantize_linear() -> None:
    """GPTQ's asymmetric weight requantized with zero points 0 (TensorRT's rule), run as opset-21
    ``DequantizeLinear`` (int4, blocks along K) + ``MatMul`` in onnxruntime; the requantization error is
    measured against the GPTQ weight and must stay within one GPTQ step (it is a second rounding)."""
    q, zeros, scales, group = _case()
    weight = gptq.dequantize(qp.gptq(q, zeros, scales, group, 4, 2, g_idx=False), _gptq_config(2), "L")
    codes, sym_scales = matmulnbits.symmetric(weight, GS)
    assert int(codes.min()) >= -7 and int(codes.max()) <= 7
    dq, initializers = matmulnbits.dequantize_linear(codes, sym_scales, GS, "W_t")
    mm = helper.make_node("MatMul", ["A", "W_t"], ["Y"])
    graph = helper.make_graph(
        [dq, mm],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(A.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    options = ort.SessionOptions()
    # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits at accuracy level 4 (int8 activations)
    # by default, which moves this output by ~1e-1; level 0 keeps fp32 so the layout itself is checked.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"A": A.numpy()})[0])
    again = sym_scales.repeat_interleave(GS, 1) * codes.float()
    _assert_fp32_close(got, again)
    error = matmulnbits.requant_error(weight, GS)
    gptq_step = float(scales.float().max())
    assert 0 < error["max_abs"] <= gptq_step, (error, gptq_step)
    print(f"symmetric int4 requantization of a GPTQ asymmetric weight: {error}, GPTQ max step {gptq_step:.4f}")
    assert np.isfinite(error["rel_fro"])


def _dq_matmul_model(codes: torch.Tensor, scales: torch.Tensor, zero_point: int | None):
    """``A · dequant(W)ᵀ`` as opset-21 ``DequantizeLinear`` (int4 blocks along K) + ``MatMul``; with
    ``zero_point``, an int4 zero-point input of that value for every block."""
    dq, initializers = matmulnbits.dequantize_linear(codes, scales, GS, "W_t")
    if zero_point is not None:
        blocks, n = scales.shape[1], scales.shape[0]
        initializers.append(helper.make_tensor("W_t.zp", TensorProto.INT4, [blocks, n], [zero_point] * (blocks * n)))
        dq.input.append("W_t.zp")
    graph = helper.make_graph(
        [dq, helper.make_node("MatMul", ["A", "W_t"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(A.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [A.shape[0], codes.shape[0]])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_tensorrt_rtx_parses_symmetric_int4_and_refuses_zero_points(tmp_path) -> None:
    """TensorRT's own ONNX parser (no GPU needed) takes the int4 ``DequantizeLinear`` of :func:`symmetric`
    as a DEQUANTIZE layer feeding the matrix multiply, and rejects the same graph once a zero point is not
    0 — the rule (FORMATS.md §4) that makes NF4 and asymmetric GPTQ/AWQ need requantizing for it."""
    import onnx

    from peftc.backends.tensorrt import engine, install

    if install.find_module() is None:
        pytest.skip(f"TensorRT parser not installed ({install.INSTALL_HINT})")
    codes, scales = matmulnbits.symmetric(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(7)), GS)
    for zero_point in (None, 0):
        onnx.save(_dq_matmul_model(codes, scales, zero_point), tmp_path / "dq.onnx")
        report = engine.parse(tmp_path / "dq.onnx")
        assert report.layer_types["DEQUANTIZE"] == 1 and report.layer_types["MATRIX_MULTIPLY"] == 1
        assert report.outputs[0]["shape"] == [A.shape[0], OUT]
    onnx.save(_dq_matmul_model(codes, scales, 1), tmp_path / "dq.onnx")
    with pytest.raises(UnsupportedError, match="(?i)zero point"):
        engine.parse(tmp_path / "dq.onnx")
