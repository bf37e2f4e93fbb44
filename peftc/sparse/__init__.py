"""Sparse adapters: recovering S²FT updates from fine-tuned checkpoints (``peftc extract``)."""
