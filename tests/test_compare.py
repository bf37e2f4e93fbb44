"""``relative_error``: the one number the layer search, the onnxruntime fusion check and ``peftc bench``
take from a comparison."""

from __future__ import annotations

import numpy as np
import pytest

from peftc.verification.compare import compare, relative_error


def test_each_output_is_relative_to_its_own_scale_and_the_worst_counts():
    expected = {"a": np.array([10.0, -20.0]), "b": np.array([0.5, 0.25]), "ids": np.array([1, 2])}
    actual = {"a": np.array([10.0, -19.0]), "b": np.array([0.5, 0.3]), "ids": np.array([7, 7])}
    assert relative_error(expected, actual) == pytest.approx(0.1)  # b: 0.05 of 0.5 (a: 1 of 20); ints ignored
    assert relative_error(expected, actual) == max(e.max_rel for e in compare(expected, actual)[:2])


def test_missing_and_non_finite_outputs_are_infinitely_wrong():
    expected = {"a": np.array([1.0, 2.0])}
    assert relative_error(expected, {}) == float("inf")
    assert relative_error(expected, {"a": np.array([1.0, np.nan])}) == float("inf")
    assert relative_error({"z": np.zeros(2)}, {"z": np.array([0.0, 0.5])}) == 0.5  # a zero output: scale 1
