"""``nn.Module`` forms of quantized linear layers, as a loaded quantized base holds them.

:class:`Bnb4Linear` and :class:`Int8Linear` keep the checkpoint's packed tensors as buffers and call
the ``peftc::`` ops of ``peftc/quant/ops.py``, so the exported program holds the packed weight and one
dequant-matmul node per layer. :class:`TwoPathLinear` is the ``two-path`` merge policy: the quantized
layer plus an unmerged LoRA branch.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.quant import bnb, matmulnbits, sites  # noqa: F401  (registers the QLoRA site ops TwoPathLinear calls)
from peftc.quant.ops import FORMATS, nbits_weight, nested_absmax_of, quant_type_number


class Bnb4Linear(nn.Module):
    """A bitsandbytes 4-bit linear layer (NF4/FP4): packed uint8 codes, fp32 absmax, the code table."""

    def __init__(
        self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, quant_type: str,
        shape: tuple[int, int], bias: torch.Tensor | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = shape
        self.blocksize, self.quant_type = blocksize, quant_type
        self.register_buffer("packed", packed.flatten().contiguous())
        self.register_buffer("absmax", absmax.to(torch.float32).flatten().contiguous())
        self.register_buffer("code", code.to(torch.float32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]``."""
        return bnb.decode_4bit(self.packed, self.absmax, self.code, self.blocksize, self.out_features, self.in_features)

    def stored_bytes(self) -> int:
        """Bytes of the packed weight and its scales (the bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``peftc::bnb4_linear``."""
        return torch.ops.peftc.bnb4_linear(
            x, self.packed, self.absmax, self.code, self.bias, self.blocksize, quant_type_number(self.quant_type),
            self.out_features, self.in_features,
        )  # fmt: skip


class Bnb4NestedLinear(Bnb4Linear):
    """A bitsandbytes 4-bit layer with double quantization kept as stored: uint8 ``absmax_codes``, fp32
    ``nested_absmax`` per ``nested_blocksize`` codes, the 256-entry ``nested_code``, ``nested_offset``
    (``peftc::bnb4dq_linear``; :attr:`absmax` is the fp32 decode)."""

    def __init__(
        self, packed: torch.Tensor, nested: dict[str, torch.Tensor], nested_blocksize: int, nested_offset: float,
        code: torch.Tensor, blocksize: int, quant_type: str, shape: tuple[int, int], bias: torch.Tensor | None,
    ) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self.out_features, self.in_features = shape
        self.blocksize, self.quant_type = blocksize, quant_type
        self.nested_blocksize, self.nested_offset = nested_blocksize, float(nested_offset)
        self.register_buffer("packed", packed.flatten().contiguous())
        self.register_buffer("absmax_codes", nested["absmax_codes"].flatten().contiguous())
        self.register_buffer("nested_absmax", nested["nested_absmax"].to(torch.float32).flatten().contiguous())
        self.register_buffer("nested_code", nested["nested_code"].to(torch.float32).flatten().contiguous())
        self.register_buffer("code", code.to(torch.float32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def absmax(self) -> torch.Tensor:
        """The fp32 absmax, decoded as bitsandbytes does."""
        return nested_absmax_of(
            self.absmax_codes, self.nested_absmax, self.nested_code, self.nested_blocksize, self.nested_offset
        )

    def stored_bytes(self) -> int:
        """Bytes of the packed weight, its 8-bit absmax and the nested scales and code table."""
        kept = (self.packed, self.absmax_codes, self.nested_absmax, self.nested_code)
        return sum(t.numel() * t.element_size() for t in kept)

    def arguments(self) -> tuple:
        """The tensors and scalars of ``peftc::bnb4dq_linear`` after ``x``."""
        return (
            self.packed, self.absmax_codes, self.nested_absmax, self.nested_code, self.code, self.bias,
            self.blocksize, quant_type_number(self.quant_type), self.nested_blocksize, self.nested_offset,
            self.out_features, self.in_features,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``peftc::bnb4dq_linear``."""
        return torch.ops.peftc.bnb4dq_linear(x, *self.arguments())


class Int8Linear(nn.Module):
    """An LLM.int8 linear layer: int8 ``weight`` [out, in] and fp32 row scales ``scb``."""

    def __init__(self, weight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int8", weight.contiguous())
        self.register_buffer("scb", scb.to(torch.float32).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]``."""
        return self.weight_int8 * self.scb.view(-1, 1) * bnb.INT8_SCALE

    def stored_bytes(self) -> int:
        """Bytes of the int8 weight and its scales."""
        return self.weight_int8.numel() + self.scb.numel() * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``peftc::int8_linear``."""
        return torch.ops.peftc.int8_linear(x, self.weight_int8, self.scb, self.bias)


class NBitsLinear(nn.Module):
    """A GPTQ or AWQ GEMM linear layer: the checkpoint's ``qweight``, ``qzeros``, ``scales`` as stored, and
    ``g_idx`` (the group of every input row: GPTQ's own when stored, else ``i // group_size``)."""

    def __init__(
        self, fmt: str, bits: int, version: int, group_size: int, tensors: dict[str, torch.Tensor],
        shape: tuple[int, int], bias: torch.Tensor | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.out_features, self.in_features = shape
        self.fmt, self.bits, self.version, self.group_size = fmt, bits, version, group_size
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(name, tensors[name].contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _arguments(self) -> tuple:
        return (
            self.qweight, self.qzeros, self.scales, self.g_idx, self.bias, FORMATS.index(self.fmt), self.bits,
            self.version, self.group_size, self.out_features, self.in_features,
        )  # fmt: skip

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]``."""
        return nbits_weight(
            self.qweight, self.qzeros, self.scales, self.g_idx, FORMATS.index(self.fmt), self.bits, self.version
        )

    def stored_bytes(self) -> int:
        """Bytes of the packed codes, zeros and scales (``g_idx`` and the bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``peftc::nbits_linear``."""
        return torch.ops.peftc.nbits_linear(x, *self._arguments())


class BlocksLinear(nn.Module):
    """A weight in MatMulNBits' blocks (:class:`peftc.quant.matmulnbits.Blocks`), run at ``accuracy_level``
    (4: int8 activations): what the ``requant-int8`` merge policy makes of a merged site."""

    def __init__(self, blocks, accuracy_level: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = blocks.n, blocks.k
        self.bits, self.block_size, self.accuracy_level = blocks.bits, blocks.block_size, accuracy_level
        zero_points = blocks.zero_points
        if zero_points is None:  # the mid-range zero, stored: the op always takes the tensor
            zero_points = matmulnbits.pack_rows(torch.full(blocks.scales.shape, 1 << (blocks.bits - 1)), blocks.bits)
        self.register_buffer("packed", blocks.packed.contiguous())
        self.register_buffer("scales", blocks.scales.to(torch.float32).contiguous())
        self.register_buffer("zero_points", zero_points.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``[out, in]``."""
        return matmulnbits.decode(
            self.packed, self.scales, self.zero_points, self.bits, self.block_size, self.in_features
        )

    def stored_bytes(self) -> int:
        """Bytes of the codes, scales and zero points (the bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zero_points))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``peftc::blocks_linear``."""
        return torch.ops.peftc.blocks_linear(
            x, self.packed, self.scales, self.zero_points, self.bias, self.bits, self.block_size,
            self.accuracy_level, self.out_features, self.in_features,
        )  # fmt: skip


class TwoPathLinear(nn.Module):
    """The quantized base GEMM plus the unmerged LoRA branch ``s · (x Aᵀ) Bᵀ`` (computed in fp32; the factors
    are stored fp32, or fp16 where given so: the ``two-path-fp16`` policy)."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        stored = torch.float16 if lora_a.dtype == lora_b.dtype == torch.float16 else torch.float32
        self.lora_A = nn.Parameter(lora_a.to(stored), requires_grad=False)
        self.lora_B = nn.Parameter(lora_b.to(stored), requires_grad=False)
        self.scale = scale

    def stored_bytes(self) -> int:
        """The base's bytes plus the LoRA factors'."""
        factors = (self.lora_A.numel() + self.lora_B.numel()) * self.lora_A.element_size()
        return self.base.stored_bytes() + factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the LoRA branch (added in fp32): the QLoRA site op ``peftc compile`` keeps
        for the two-path policy (``peftc/quant/sites.py``)."""
        base, lora = self.base, (self.lora_A, self.lora_B, self.scale)
        if isinstance(base, Bnb4NestedLinear):
            args = base.arguments()
            return torch.ops.peftc.lora_bnb4dq(x, *args[:6], *lora, *args[6:])
        if isinstance(base, Bnb4Linear):
            return torch.ops.peftc.lora_bnb4(
                x, base.packed, base.absmax, base.code, base.bias, *lora, base.blocksize,
                quant_type_number(base.quant_type), base.out_features, base.in_features,
            )  # fmt: skip
        if isinstance(base, Int8Linear):
            return torch.ops.peftc.lora_int8(x, base.weight_int8, base.scb, base.bias, *lora)
        return torch.ops.peftc.lora_nbits(x, *base._arguments()[:5], *lora, *base._arguments()[5:])
