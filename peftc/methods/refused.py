"""PEFT types peftc refuses as a whole (Lily, ShadowPEFT), with the reasons read from PEFT's source.

**Lily** (``peft/tuners/lily/``): Lily gives each group of ``stride_A`` layers a shared down-projection ``A`` ``[r, d_in]`` and each
target type ``num_B`` shared up-projections ``B_e`` ``[r, d_out]``, mixed by a router ``G``
``[num_B, r]``. PEFT's forward, for a batch of inputs ``x_t`` (every token of every sequence)::

    h_t = A x_t        p = mean_t softmax(G h_t)        y_t = W x_t + b + s · h_tᵀ Σ_e p_e B_e

The mixing weights ``p`` are averaged over *all* tokens of the batch, so the update applied to one
input depends on every other input in the batch (``tests/methods/test_lily.py`` measures it on PEFT's
own model: one sample's output moves by more than 10⁻⁴ of its scale between running it alone and in
a batch of four, ten times the fp32 bound). There is no weight form — PEFT's own ``merge()`` raises ``NotImplementedError`` — and a
compiled model that reproduced the forward would give results that change with batch composition,
padding included. peftc refuses the type.

**ShadowPEFT** (``peft/tuners/shadow/``): a second, trainable transformer backbone (the *shadow*
model, built from the base's architecture) runs beside the base; at each wrapped decoder block its
state is injected into the block's input and updated from the block's output, passed between blocks
as a carrier object instead of a tensor. The adaptation is an input-dependent trajectory through the
layers, not a change of any module's weights (PEFT's own merge refuses), and it wraps whole decoder
blocks, not the modules peftc's sites adapt; peftc refuses it.
"""

from __future__ import annotations

LILY = (
    "Lily mixes its shared B adapters with router weights averaged over every token of the whole batch, so "
    "one input's output depends on the other inputs it is batched with (padding included); it has no weight "
    "form (PEFT's own merge raises NotImplementedError), and peftc compiles only adapters whose effect is a "
    "fixed function of each input"
)
"""Why ``peft_type: "LILY"`` is refused."""

SHADOW = (
    "ShadowPEFT runs a second trainable transformer backbone beside the base and threads its state through "
    "every wrapped decoder block (injected into the block's input, updated from its output); the adaptation "
    "is an input-dependent trajectory, not a weight change (PEFT's own merge refuses it), and it wraps whole "
    "decoder blocks rather than the modules peftc adapts"
)
"""Why ``peft_type: "SHADOW"`` is refused."""
