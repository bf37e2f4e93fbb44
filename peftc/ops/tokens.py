"""Trainable tokens: rows of an embedding matrix replaced by trained values (PEFT TrainableTokens).

    W' = W with rows ``indices`` replaced by ``values``   (replacement, not addition)

The indices come from the adapter config (``trainable_token_indices``); a tied output layer reads the
same rows.
"""

from __future__ import annotations

import torch

from peftc.ops.base import SiteOp, weight_op

TOKENS_WEIGHT = SiteOp(name="tokens_weight", form="weight", tensor_roles=("indices", "values"), scalars=())


@weight_op("tokens_weight(Tensor weight, Tensor indices, Tensor values) -> Tensor")
def tokens_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``W.index_copy(0, indices, values)``."""
    return weight.index_copy(0, indices.to(torch.int64), values.to(weight.dtype))
