"""Numbers over seeds: median, min–max and bootstrap interval; the seeds' summary; the report's verdict over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from covshift.experiments.seeds import command_line, write_seeds
from covshift.metrics.seeds import mean_and_error, seed_spread
from covshift.reporting.verdicts import seed_verdict_lines


def test_the_spread_is_the_median_the_range_and_a_reproducible_bootstrap_interval() -> None:
    values = [7.6, 6.8, 11.0, 9.0, 8.1, 7.2, 10.1, 6.9, 8.8]
    s = seed_spread(values, resamples=2000, seed=3)
    assert (s.n, s.median, s.minimum, s.maximum) == (9, 8.1, 6.8, 11.0)
    assert s.minimum < s.low < s.median < s.high < s.maximum  # 9 seeds: narrower than the range
    # the interval is the percentiles of medians of resamples drawn from a generator seeded with `seed`
    rng = np.random.default_rng(3)
    medians = np.median(np.asarray(values)[rng.integers(0, 9, size=(2000, 9))], axis=1)
    assert (s.low, s.high) == tuple(np.quantile(medians, [0.025, 0.975]))
    assert seed_spread(values, resamples=2000, seed=3) == s
    assert seed_spread(values, resamples=2000, seed=4) != s


def test_five_seeds_give_a_95_percent_interval_as_wide_as_their_range() -> None:
    # each extreme is the median of a resample with 3 or more of 5 draws equal to it: 5.8% > 2.5%
    s = seed_spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.low, s.high) == (1.0, 5.0)
    assert "over 5 seeds (min–max 1.00–5.00; 95% percentile bootstrap of the median, 10,000 resamples" in s.describe()


def test_nan_seeds_are_left_out_and_one_seed_says_it_has_no_spread() -> None:
    assert seed_spread([2.0, float("nan")]).describe("×") == "2.00× (one seed: no spread)"
    assert seed_spread([]).n == 0
    with pytest.raises(ValueError, match="level must be in"):
        seed_spread([1.0], level=95)
    mean, error = mean_and_error([0.90, 0.92, 0.97])
    assert mean == pytest.approx(0.93) and error == pytest.approx(np.std([0.90, 0.92, 0.97], ddof=1) / np.sqrt(3))


def test_the_seeds_summary_reads_every_seed_folder(tmp_path: Path) -> None:
    headlines = {1: {"drift:ks:median:plain/batchnorm": 2.0, "test_acc:plain": 0.90},
                 2: {"drift:ks:median:plain/batchnorm": 4.0, "test_acc:plain": 0.94},
                 10: {"drift:ks:median:plain/batchnorm": 3.0, "test_acc:plain": 0.92}}
    for seed, headline in headlines.items():
        (tmp_path / f"seed-{seed}").mkdir()
        (tmp_path / f"seed-{seed}" / "results.json").write_text(json.dumps({"headline": headline}))
    content = write_seeds(tmp_path, "covshift experiment bn-paper --seeds 3")
    assert content["seeds"] == [1, 2, 10]  # numeric order
    assert content["values"]["drift:ks:median:plain/batchnorm"] == [2.0, 4.0, 3.0]
    assert content["spread"]["drift:ks:median:plain/batchnorm"]["median"] == 3.0
    assert content["accuracy"]["test_acc:plain"]["mean"] == pytest.approx(0.92)
    assert content["accuracy"]["test_acc:plain"]["se"] == pytest.approx(0.02 / np.sqrt(3))
    md = (tmp_path / "seeds.md").read_text()
    assert "covshift experiment bn-paper --seeds 3" in md and "| `drift:ks:median:plain/batchnorm` | 2 | 4 | 3 | 3 | 2–4 |" in md
    assert "0.9200 ± 0.0115" in md
    with pytest.raises(FileNotFoundError, match="--seeds N"):
        write_seeds(tmp_path / "seed-1", "x")


def test_the_stated_command_names_what_differs_from_the_defaults() -> None:
    from covshift.experiments import bn_paper, mnist_bn

    config = bn_paper.Config(steps=5000, variants=bn_paper.VARIANTS, download=False, progress=False, seed=3, seeds=5)
    assert command_line("noisy-bn", config, 5) == ("covshift experiment noisy-bn --steps 5000 --seed 3 --no-download "
                                                   "--seeds 5")
    assert command_line("mnist-bn", mnist_bn.Config(epochs=2, report=False), 5) == (
        "covshift experiment mnist-bn --epochs 2 --no-report --seeds 5")


def verdict_table(drift: dict[str, list[float]]) -> pd.DataFrame:
    """A comparison table's W1 rows: layers in, h1, h2, one ``<label> mean`` column per run."""
    return pd.DataFrame({"layer": ["in", "h1", "h2"], "metric": "wasserstein",
                         **{f"{label} mean": values for label, values in drift.items()}})


def test_the_report_verdict_states_the_interval_over_seeds_paired_in_order() -> None:
    drift = {"plain": [1.0, 4.0, 8.0], "plain #2": [1.0, 6.0, 6.0], "plain #3": [1.0, 9.0, 9.0],
             "bn": [1.0, 1.0, 1.0], "bn #2": [1.0, 2.0, 2.0], "bn #3": [1.0, 1.0, 2.0]}
    labels = list(drift)
    medians = [pd.Series(values, index=["in", "h1", "h2"]) / 2 for values in drift.values()]
    medians[3] = medians[3] * 2  # bn seed 1: its channel median is twice its channel mean's half
    lines = seed_verdict_lines(verdict_table(drift), ["plain"] * 3 + ["bn"] * 3, labels, [5] * 6, "wasserstein",
                               medians)
    assert len(lines) == 1
    head, details = lines[0]
    # factors by the channel mean: 6/1, 6/2, 9/1.5 -> 6, 3, 6; by the median: 3/1, 3/1, 4.5/0.75 -> 3, 3, 6
    assert details == "Per seed, by the channel median: 3.00×, 3.00×, 6.00×; by the channel mean: 6.00×, 3.00×, 6.00×."
    assert head.startswith("plain/bn mean W1") and "3 seeds paired in order (above 1: bn drifts less)" in head
    assert "median 3.00× over 3 seeds (min–max 3.00–6.00×; 95% percentile bootstrap" in head
    assert head.endswith("by the channel median; median 6.00× over 3 seeds (min–max 3.00–6.00×; 95% percentile "
                         "bootstrap of the median, 10,000 resamples, seed 0: 3.00–6.00×) by the channel mean")


def test_runs_of_distinct_names_get_no_seed_verdict() -> None:
    drift = {"plain": [1.0, 4.0, 8.0], "bn": [1.0, 1.0, 1.0]}
    medians = [pd.Series(v, index=["in", "h1", "h2"]) for v in drift.values()]
    assert seed_verdict_lines(verdict_table(drift), ["plain", "bn"], list(drift), [5, 5], "wasserstein", medians) == []
