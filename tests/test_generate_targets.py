"""``--task text-generation`` on ``--target trt``: TensorRT's ONNX parser reads the generation step, and
the engine's optimization profile lets ``past`` be empty (the prefill) with ``total`` = ``past`` + ``seq``.

No AOTInductor package is compiled here: the tiny LLaMA step's AOTInductor compile alone takes longer
than this file's time budget on the CI machines, and the suite has no slow-test tier. README
("Generation on other targets") says how ``--target aoti`` generation was checked.
"""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch

import peftc
from peftc.backends.tensorrt import install as trt_install
from peftc.backends.tensorrt.settings import DimProfile, dim_profiles, input_profiles, parse_profile
from peftc.errors import BackendUnavailable, InputError
from peftc.loaders import load_model

TRT_MODULE = trt_install.find_module()
DEVICE, NO_GPU = trt_install.build_device() if TRT_MODULE else trt_install.cuda_device()
LAYERS = 2


def _llama(positions: int = 64) -> torch.nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=positions,
    )  # fmt: skip
    return models._seeded(lambda: transformers.LlamaForCausalLM(config))


def test_bf16_copy_keeps_rotary_frequencies_in_fp32(monkeypatch):
    """The bf16 world (what a bf16 artifact is traced from) keeps RoPE's ``inv_freq`` in fp32: rounded,
    the angle ``position · inv_freq`` at positions near 1000 is off by radians. Layer 0's keys (one
    projection, then the rotation) of a prefill at positions 990-997 stay within the bf16 budget of
    one matmul of the fp32 model's; with the buffers rounded (the mutation) they are far outside it."""
    from peftc.driver import build
    from peftc.precision import budget

    step = load_model(_llama(positions=1024), task="text-generation").module.eval()
    ids = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(990, 998)[None]}

    def keys(module, dtype):
        empty = {name: torch.zeros(1, 2, 0, 8, dtype=dtype) for name in _past_names()}
        with torch.no_grad():
            return module(**feeds, **empty)["present.0.key"].float()

    expected = keys(step, torch.float32)
    rounded = build.in_precision(step, "bf16")
    assert {b.dtype for n, b in rounded.named_buffers() if n.endswith("inv_freq")} == {torch.float32}
    assert {p.dtype for p in rounded.parameters()} == {torch.bfloat16}
    error = lambda got: float((got - expected).abs().max() / expected.abs().max())  # noqa: E731
    assert error(keys(rounded, torch.bfloat16)) <= budget("bf16", 1)
    monkeypatch.setattr(build, "FP32_BUFFERS", ())
    assert error(keys(build.in_precision(step, "bf16"), torch.bfloat16)) > 4 * budget("bf16", 1)


def _past_names() -> list[str]:
    return [f"past_key_values_{i}_{kv}" for i in range(LAYERS) for kv in ("key", "value")]


def test_generation_profile_has_an_empty_past_and_a_consistent_total():
    """Derived ranges: ``past`` from 0 (prefill), ``seq`` optimized for the decode step's 1, ``total``
    the sum of both in min, opt and max, so every input's shapes agree within each of the three."""
    signature = load_model(_llama(), task="text-generation").signature
    dims = dim_profiles(signature)
    assert dims["past"] == DimProfile("past", 0, 63, 63)
    assert dims["seq"] == DimProfile("seq", 1, 1, 64)
    assert dims["total"] == DimProfile("total", 1, 64, 127)
    shapes = {p.name: p for p in input_profiles(signature, dims)}
    for which in ("min", "opt", "max"):
        key, mask, ids = (getattr(shapes[n], which) for n in ("past_key_values_1_key", "attention_mask", "input_ids"))
        assert mask[1] == min(key[2] + ids[1], 127), which
    with pytest.raises(InputError, match=r"past:0,0,0: need 0 <= min <= opt <= max and max >= 1"):
        parse_profile("past:0,0,0")
    with pytest.raises(InputError, match=r"outside the range the model was traced with \(seq 1..64\)"):
        dim_profiles(signature, [parse_profile("seq:0,1,8")])


@pytest.mark.skipif(TRT_MODULE is None, reason=f"TensorRT parser not installed ({trt_install.INSTALL_HINT})")
def test_trt_generation_step_parses_and_its_onnx_generates_like_peft(tmp_path):
    """The parsed network has the step's inputs and outputs with a dynamic past; without a GPU the
    artifact is the verified ONNX, refused by ``peftc.load`` and generating like PEFT when asked for."""
    from peft import PeftModel

    model = _llama()
    adapter = models.make_lora(model, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    artifact = peftc.compile(model, adapter, out=tmp_path / "out", task="text-generation", target="trt", oracle=False)
    info = artifact.manifest.target["tensorrt"]
    pasts = _past_names()
    parsed = {i["name"]: i["shape"] for i in info["parse"]["inputs"]}
    assert list(parsed) == ["input_ids", "attention_mask", "position_ids", *pasts]
    assert parsed["past_key_values_0_key"] == [-1, 2, -1, 8]
    presents = [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    assert [o["name"] for o in info["parse"]["outputs"]] == ["logits", *presents]
    assert info["parse"]["layer_types"]["SOFTMAX"] == LAYERS
    assert artifact.manifest.verification["passed"]
    if DEVICE is not None:
        pytest.skip(f"an engine was built on {DEVICE.name}: the CPU-only checks below do not apply")
    assert [n["reason"] for n in artifact.manifest.not_run if n["what"].startswith("tensorrt")] == [
        f"engine not built: {NO_GPU}"
    ]
    with pytest.raises(BackendUnavailable, match="no TensorRT engine in this artifact"):
        peftc.load(artifact.path)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    got = peftc.load(artifact.path, runtime="onnx").generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter)).eval()
        expected = peft_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    assert torch.equal(got, expected)
