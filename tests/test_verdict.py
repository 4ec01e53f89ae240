"""The verdict: one computation of how much less one run drifts than another."""

from __future__ import annotations

import math

import pytest

from covshift.verdict import compare


def test_factor_count_and_spread_come_from_the_hidden_layers_only():
    v = compare(["in", "h1", "h2", "h3"], [0.5, 3.0, 1.0, 2.0], [0.5, 0.5, 1.5, 0.5], "plain", "bn")
    # hidden: plain mean 2.0, bn mean 0.8333 -> 2.4x; bn lower in 2 of 3; the input layer is left out
    assert v.factor == pytest.approx(2.4)
    assert (v.lower, v.hidden, v.input_layer, v.input_ratio) == (2, ("h1", "h2", "h3"), "in", 1.0)
    assert (v.ratio_min, v.ratio_max) == pytest.approx((1 / 6, 1.5))
    assert v.headline == "bn drifts 2.4× less than plain: 2 of 3 hidden layers lower"
    assert v.details == ("Per-layer bn/plain ratios 0.17–1.50. "
                         "Input layer in, which reads the data itself: bn/plain 1.00.")


def test_more_drift_is_said_plainly():
    v = compare(["in", "h1", "h2"], [1.0, 1.0, 2.0], [1.0, 3.0, 3.0], "plain", "bn")
    assert v.headline == "bn drifts 2.0× more than plain: 0 of 2 hidden layers lower"


def test_missing_values_are_skipped_and_no_hidden_layer_is_named():
    v = compare(["in", "h1", "h2"], [1.0, 2.0, math.nan], [1.0, 1.0, 5.0], "a", "b")
    assert v.factor == pytest.approx(2.0) and v.lower == 1
    lone = compare(["in"], [1.0], [2.0], "a", "b")
    assert lone.headline == "b and a: no hidden layer of both with finite drift to compare"
    assert lone.details == "Input layer in, which reads the data itself: b/a 2.00."
    nothing = compare(["in", "h1"], [1.0, math.nan], [1.0, math.nan], "a", "b")
    assert "no hidden layer" in nothing.headline


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="one drift value per layer in each run, got 2 layers, 2 and 1 values"):
        compare(["a", "b"], [1.0, 2.0], [1.0])
