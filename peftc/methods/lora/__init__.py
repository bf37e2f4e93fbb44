"""LoRA and its variants (PEFT ``peft_type: "LORA"``; ``shared/methods.md`` §2–§3): DoRA, rsLoRA,
``lora_bias``, LoRA on embeddings, convolutions and raw parameters, trainable tokens, and the
residual bases of PiSSA/OLoRA.

* ``ops.py``: the site ops and their math (``lora_linear`` call site, ``lora_weight``/``lora_bias``/
  ``lora_experts_weight`` weight sites) and the one rule from a call site to its weight form;
* ``dora.py``: DoRA's weight transform; ``factor_dora.py``: its norm computed at compile time when
  sites stay unmerged;
* ``onnx.py``: the ONNX translation of ``lora_linear``;
* ``parse.py``: peftc's parser of PEFT LoRA adapters; ``residual.py``: PiSSA/OLoRA residual bases.
"""

from peftc.methods.lora import parse
from peftc.methods.lora.dora import DORA_FACTORED_WEIGHT, DORA_WEIGHT
from peftc.methods.lora.factor_dora import FactorDoraPass
from peftc.methods.lora.ops import LORA_BIAS, LORA_EXPERTS, LORA_LINEAR, LORA_WEIGHT
from peftc.methods.record import Method
from peftc.quant.sites import OPS as QLORA_OPS

METHOD = Method(
    "lora",
    ("LORA",),
    parse.parse,
    ops=(LORA_LINEAR, LORA_WEIGHT, LORA_BIAS, LORA_EXPERTS, DORA_WEIGHT, DORA_FACTORED_WEIGHT, *QLORA_OPS),
    unmerged_passes=(FactorDoraPass,),
    fields=parse.FIELDS,
)

__all__ = ["METHOD"]
