"""The AOTInductor target's op translations match the site ops' eager bodies (no compile needed).

The compiled end-to-end checks (one shared package) are in ``tests/test_targets.py``.
"""

from __future__ import annotations

import pytest
import torch

import peftc.ops  # noqa: F401  (registers the ops)
from peftc.backends.aoti import AotiBackend
from peftc.backends.aoti.translations import lora_linear
from peftc.errors import InputError


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_lora_linear_translation_matches_eager(fan_in_fan_out, lora_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=g)
    weight = torch.randn(12, 20, generator=g) if fan_in_fan_out else torch.randn(20, 12, generator=g)
    bias = torch.randn(20, generator=g)
    a, b = torch.randn(4, 12, generator=g), torch.randn(20, 4, generator=g)
    b_bias = torch.randn(20, generator=g) if lora_bias else None
    expected = torch.ops.peftc.lora_linear(x, weight, bias, a, b, b_bias, 0.75, fan_in_fan_out)
    got = lora_linear(x, weight, bias, a, b, b_bias, 0.75, fan_in_fan_out)
    assert torch.equal(got, expected)
    wrong = lora_linear(x, weight, bias, a, b, b_bias, 0.5, fan_in_fan_out)
    assert not torch.allclose(wrong, expected)  # the comparison can fail


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
