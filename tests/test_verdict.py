"""The verdict: one computation of how much less one run drifts than another."""

from __future__ import annotations

import math

import pytest

from covshift.metrics.verdict import compare


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


def test_zero_drift_is_no_division_error():
    # a run of one recorded step drifts 0 from it (mnist-bn --epochs 1 on a tiny split)
    still = compare(["in", "h1"], [0.0, 0.0], [0.0, 0.0], "a", "b", [0.0, 0.0], [0.0, 0.0])
    assert math.isnan(still.factor) and "no hidden layer" in still.headline
    assert math.isinf(compare(["in", "h1"], [1.0, 2.0], [1.0, 0.0], "a", "b").factor)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="one drift value per layer in each run, got 2 layers, 2 and 1 values"):
        compare(["a", "b"], [1.0, 2.0], [1.0])


def test_the_headline_states_the_channel_mean_and_median_when_both_are_given():
    # one outlier channel inflates the plain run's channel mean in h1
    v = compare(["in", "h1", "h2"], [1.0, 40.0, 2.0], [1.0, 1.0, 1.0], "plain", "bn",
                baseline_median=[1.0, 3.0, 2.0], other_median=[1.0, 1.0, 1.0])
    assert v.factor == pytest.approx(21.0) and v.median_factor == pytest.approx(2.5)
    assert v.headline == ("bn drifts 21.0× less than plain by the channel mean (2 of 2 hidden layers lower), "
                          "2.5× less by the channel median (2 of 2 lower)")
    more = compare(["in", "h1"], [1.0, 1.0], [1.0, 3.0], "a", "b", [1.0, 1.0], [1.0, 0.5])
    assert more.headline == ("b drifts 3.0× more than a by the channel mean (0 of 1 hidden layers lower), "
                             "2.0× less by the channel median (1 of 1 lower)")
    with pytest.raises(ValueError, match="both runs or for neither"):
        compare(["in", "h1"], [1.0, 1.0], [1.0, 3.0], "a", "b", baseline_median=[1.0, 1.0])


def test_compare_runs_computes_both_aggregates_from_runs():
    import torch

    import covshift
    from covshift.metrics.verdict import compare_runs

    runs = []
    for scale in (1.0, 0.2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        with covshift.attach(model, every=1) as tracker:
            for step in range(4):
                model(torch.randn(64, 4) * (1 + scale * step))
        runs.append(tracker.run)
    v = compare_runs(runs[0], runs[1], "wide", "narrow")
    assert v.median_factor is not None and v.factor > 1 and v.median_factor > 1
    assert "by the channel median" in v.headline
