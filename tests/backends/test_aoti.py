"""The AOTInductor target's op translations match the site ops' eager bodies (no compile needed).

The compiled end-to-end checks (one shared package) are in ``tests/test_targets.py``.
"""

from __future__ import annotations

import pytest
import torch

import peftc.methods.registry  # noqa: F401  (registers the ops)
from peftc.backends.aoti import AotiBackend
from peftc.errors import InputError


def test_every_call_site_op_decomposes_to_aten(bert_program, bert_adapter):
    """AOTInductor sees each call-site op as its eager body: after decomposition no peftc op is left
    and the numbers are the reference program's."""
    from conftest import adapt, assert_outputs_close, eager

    from peftc import ir
    from peftc.backends.aoti import decompositions as table
    from peftc.methods.registry import site_ops
    from peftc.quant.ops import OPS as QUANT_OPS

    calls = {op.overload for op in [*site_ops().values(), *QUANT_OPS] if op.form == "call"}
    assert calls == set(table()) and {op.overload for op in QUANT_OPS} <= calls  # quantized layers' ops too
    reference = adapt(bert_program, bert_adapter)
    decomposed = reference.run_decompositions(table())
    assert not [n for n in ir.op_counts(decomposed) if n.startswith("peftc.")]
    import models

    inputs = models.text_inputs(2, 7)
    assert_outputs_close(eager(decomposed, inputs), eager(reference, inputs), rel=1e-6)


def test_unknown_device_and_option_are_refused():
    with pytest.raises(InputError, match="--device 'tpu': use one of cpu, cuda"):
        AotiBackend({"device": "tpu"})
    with pytest.raises(InputError, match=r"target 'aoti' has no option\(s\) \['precision'\]"):
        AotiBackend({"precision": "fp16"})


def test_cuda_without_a_cuda_device_is_unavailable():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    availability = AotiBackend({"device": "cuda"}).available()
    assert not availability.ok and "sees no CUDA device" in availability.reason
