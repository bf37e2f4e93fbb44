"""Sparse adapters: recovering S²FT updates from fine-tuned checkpoints (``peftc extract``)."""

MAX_DENSITY = 0.5
"""Default largest fraction of a matrix's rows/columns an S²FT update may change (``--max-density``)."""
MIN_FILL = 0.5
"""Default smallest fraction of entries changed in each changed row/column (``--min-fill``)."""
