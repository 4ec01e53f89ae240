"""The verdict and the Markdown drift tables of the BatchNorm experiment."""

from __future__ import annotations

from covshift.experiments import comparison


def _measures(plain: list[float], bn: list[float]) -> list[dict]:
    rows = [
        {"layer": f"l{i}", "plain": p, "batchnorm": b, "ratio": b / p, "final_plain": p, "final_batchnorm": b,
         "noise_plain": 0.01, "noise_batchnorm": None}
        for i, (p, b) in enumerate(zip(plain, bn))
    ]
    return [{"metric": metric, "reference": reference, "label": label, "rows": rows}
            for metric, reference, label in comparison.MEASURES]


def test_verdict_reports_the_reduction_factor_and_layer_count() -> None:
    text = comparison.verdict(_measures([0.5, 3.0, 1.0, 2.0], [0.5, 0.5, 1.5, 0.5]))
    # hidden layers: no BN mean 2.0, BN mean 0.8333 -> 2.4x; BN lower in 2 of 3
    assert text.startswith("Mean W1 (× σ_ref) vs the initial step, hidden layers: BN drifts 2.4× less than no BN")
    assert "2 of 3 hidden layers lower" in text and "ratios 0.17–1.50" in text
    assert "Input layer l0, which reads the data itself: BN/no BN 1.00." in text


def test_verdict_states_the_channel_median_beside_the_mean() -> None:
    measures = _measures([1.0, 40.0, 2.0], [1.0, 1.0, 1.0])  # an outlying channel inflates h1's channel mean
    for row, plain, bn in zip(measures[0]["rows"], [1.0, 3.0, 2.0], [1.0, 1.0, 1.0]):
        row.update(plain_median=plain, batchnorm_median=bn)
    text = comparison.verdict(measures)
    assert ("BN drifts 21.0× less than no BN by the channel mean (2 of 2 hidden layers lower), 2.5× less by the "
            "channel median (2 of 2 lower).") in text


def test_verdict_says_plainly_when_there_is_no_reduction() -> None:
    text = comparison.verdict(_measures([1.0, 1.0, 2.0], [1.0, 3.0, 3.0]))
    assert "BN drifts 2.0× more than no BN: 0 of 2 hidden layers lower" in text


def test_markdown_has_one_table_per_measure_with_every_layer() -> None:
    measures = _measures([1.0, 2.0], [1.0, 0.5])
    text = comparison.to_markdown({"source": "train", "input_layer": "l0", "measures": measures,
                                   "verdict": comparison.verdict(measures)})
    assert text.count("| layer | no BN | BN | BN/no BN |") == len(comparison.MEASURES)
    for measure in comparison.MEASURES:
        assert f"### {measure[2]}" in text
    assert "| l1 | 2.00 | 0.500 | 0.250 | 2.00 | 0.500 | 0.0100 | n/a |" in text
    assert text.startswith("**Verdict:** Mean W1 (× σ_ref) vs the initial step, hidden layers: BN drifts")
