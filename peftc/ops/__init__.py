"""``peftc::`` site ops: one module per method, each with its eager reference math.

Importing this package registers every op with torch (needed before tracing, running or loading a
program that contains them). ``SITE_OPS`` maps op names to their calling conventions.
"""

from peftc.ops import adalora, beft, boft, dora, ia3, loha, lokr, lora, oft, slots, ssf, tokens, vera, zeroi2v
from peftc.ops.base import LAYOUTS, SiteOp

SITE_OPS: dict[str, SiteOp] = {
    op.name: op
    for op in (
        lora.LORA_LINEAR,
        lora.LORA_WEIGHT,
        lora.LORA_BIAS,
        lora.LORA_EXPERTS,
        adalora.ADALORA_WEIGHT,
        beft.BEFT_BIAS,
        dora.DORA_WEIGHT,
        dora.DORA_FACTORED_WEIGHT,
        ia3.IA3_WEIGHT,
        oft.OFT_WEIGHT,
        boft.BOFT_WEIGHT,
        tokens.TOKENS_WEIGHT,
        loha.LOHA_WEIGHT,
        lokr.LOKR_WEIGHT,
        vera.VERA_WEIGHT,
        slots.LORA_SLOT,
        slots.LORA_EMBEDDING_SLOT,
        slots.LORA_SLOT_BANK,
        slots.LORA_EMBEDDING_SLOT_BANK,
        ssf.SSF,
        zeroi2v.LINEAR_ADAPTER,
        zeroi2v.TEMPORAL_SHIFT,
    )
}

__all__ = ["LAYOUTS", "SITE_OPS", "SiteOp"]
