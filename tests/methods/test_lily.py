"""Lily is refused, with its reason; and the reason holds for PEFT itself: its forward couples the
inputs of a batch, and it has no merge."""

from __future__ import annotations

import models
import pytest
import tiny_targets as tiny
import torch

from peftc.errors import UnsupportedError
from peftc.ir.modules import module_table_from_module
from peftc.methods.loading import load_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from peft import LilyConfig

    config = LilyConfig(r=2, num_B=2, target_modules=["up", "down"])
    return models.make_adapter(tiny.mixed(), tmp_path_factory.mktemp("lily") / "a", config, noise=1.0)


def test_refused_with_the_reason(adapter):
    with pytest.raises(UnsupportedError, match=r"peft_type 'LILY' is refused: Lily mixes .* averaged over every token"):
        load_adapter(adapter, module_table_from_module(tiny.mixed()))


def test_peft_forward_depends_on_the_batch_and_has_no_merge(adapter):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny.mixed(), str(adapter)).eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone, batched = peft_model(x[:1]), peft_model(x)[:1]
    assert tiny.rel(batched, alone) > 1e-4  # ten times the fp32 bound peftc verifies with
    with pytest.raises(NotImplementedError):
        peft_model.merge_and_unload()
