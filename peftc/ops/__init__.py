"""``peftc::`` custom ops: one module per method, each with its eager reference math.

Importing this package registers every op with torch (needed before tracing, running or loading a
program that contains them).
"""

from peftc.ops import lora
from peftc.ops.base import SiteOp

SITE_OPS: dict[str, SiteOp] = {op.name: op for op in (lora.LORA_LINEAR,)}

__all__ = ["SITE_OPS", "SiteOp", "lora"]
