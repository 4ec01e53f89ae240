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
    assert text.startswith("BatchNorm reduced mean W1 (× σ_ref) drift (vs the initial step) by 2.4×")
    assert "2 of 3 hidden layers lower" in text and "ratios 0.17–1.50" in text
    assert "Input layer l0, which reads the data itself: BN/no-BN 1.00." in text


def test_verdict_says_plainly_when_there_is_no_reduction() -> None:
    text = comparison.verdict(_measures([1.0, 1.0, 2.0], [1.0, 3.0, 3.0]))
    assert text.startswith("BatchNorm did not reduce mean W1 (× σ_ref) drift")
    assert "with BN it was 2.0× the drift without" in text and "0 of 2 hidden layers lower" in text


def test_markdown_has_one_table_per_measure_with_every_layer() -> None:
    measures = _measures([1.0, 2.0], [1.0, 0.5])
    text = comparison.to_markdown({"source": "train", "input_layer": "l0", "measures": measures,
                                   "verdict": comparison.verdict(measures)})
    assert text.count("| layer | no BN | BN | BN/no BN |") == len(comparison.MEASURES)
    for measure in comparison.MEASURES:
        assert f"### {measure[2]}" in text
    assert "| l1 | 2.00 | 0.500 | 0.250 | 2.00 | 0.500 | 0.0100 | n/a |" in text
    assert text.startswith("**Verdict:** BatchNorm reduced")
