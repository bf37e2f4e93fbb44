"""Activation density (DEFT, ``methods.md`` §6.1): measure how many MLP activations are non-zero on
calibration inputs (``peftc analyze --density``) and exploit it in the eager model: slice out dead
neurons, compute only the active columns of the down projection, skip MLP blocks whose contribution
is within an error budget.

Not PEFT's ``PeftType.DEFT`` (a different method, read by ``peftc/methods/deft.py``).
"""
