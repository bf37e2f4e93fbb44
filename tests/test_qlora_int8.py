"""``auto-speed`` and the refusals of ``requant-int8`` (a QLoRA site on an NF4 base merged, requantized into
8-bit MatMulNBits blocks and run at accuracy level 4): chosen per site on the tiny NF4 model's own layers.
The policy through ``peftc compile`` against PEFT: ``test_qlora_compile.py``; its ONNX node: ``test_qlora.py``.
"""

from __future__ import annotations

import bnb_checkpoints
import pytest
from cli_run import run

from peftc.errors import UnsupportedError
from peftc.quant import policy, qlora

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def q_proj():
    """The tiny model's q_proj site (NF4 base, PEFT's LoRA factors), kept two-path."""
    module = qlora.build(bnb_checkpoints.root() / "nf4-dq", bnb_checkpoints.adapter("nf4-dq"), "two-path").module
    return module.model.layers[0].self_attn.q_proj


def chosen(site, name: str, max_error: float | None = None):
    return policy.choose("site", site.base, site.lora_A, site.lora_B, site.scale, name, max_error)


def test_auto_speed_takes_requant_int8_within_the_budget(q_proj):
    fast, module = chosen(q_proj, "auto-speed", 1e-2)
    assert fast.policy == "requant-int8" and fast.error == chosen(q_proj, "requant-int8")[0].error
    assert 1e-3 < fast.error <= 1e-2 and fast.reason == f"error {fast.error:.2g} <= 0.01"
    assert fast.bytes == module.stored_bytes() > 2 * q_proj.base.packed.numel()  # twice NF4's codes, for the speed
    tight = chosen(q_proj, "auto-speed", 1e-3)[0]
    assert tight.policy == "two-path-fp16" and "requant-int8 exceeds it; requant exceeds it" in tight.reason
    assert chosen(q_proj, "auto", 1e-2)[0].policy == "two-path-fp16"  # auto: the smallest, as before


def test_refusals(q_proj, tmp_path, capsys):
    """Over a given --max-error requant-int8 is refused naming the site and both numbers; on an int8 base the
    CLI prints one line naming the site and exits 2."""
    with pytest.raises(
        UnsupportedError, match=r"site: --merge-policy requant-int8 adds error 0\.00\d+ > --max-error 0\.001"
    ):
        chosen(q_proj, "requant-int8", 1e-3)
    args = [bnb_checkpoints.root() / "int8", "--adapter", bnb_checkpoints.adapter("int8"), "-o", tmp_path / "o"]
    code, _, err = run(capsys, "compile", *args, "--merge-policy", "requant-int8", "--no-oracle")
    errors = [line for line in err.splitlines() if line.startswith("peftc: error")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "_proj: --merge-policy requant-int8 on a base in int8" in errors[0] and "NF4/FP4" in errors[0]
