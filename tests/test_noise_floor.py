"""The null-distribution noise floor: random splits of the probe batch, calibrated on the input layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.metrics import names as metric_names

METRICS = metric_names()
from covshift.science.null_floor import NULL_FILE, NullFloor, drift_to_null, load_null_floor, null_distribution, null_quantiles

BATCH = 64


def _data(n: int, generator: torch.Generator) -> torch.Tensor:
    """iid draws from one fixed, skewed distribution: channels with different scales and shapes."""
    scale = torch.linspace(0.5, 3.0, 8)
    return torch.distributions.Exponential(1.0).sample((n, 8)) * scale + torch.randn(n, 8, generator=generator)


def _train_with_null(tmp_path, steps: int = 40):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe = _data(512, generator)
    with covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "run") as tracker:
        null = NullFloor(model, probe, optimizer=opt, every=20, directory=tracker.run.directory, size=BATCH,
                         splits=200)
        for _ in range(steps):
            x, y = _data(BATCH, generator), torch.randint(0, 4, (BATCH,), generator=generator)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        null.close()
    return tracker.run, null


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_with_null(tmp_path_factory.mktemp("null"))


def test_the_input_layer_reads_its_null_for_every_metric(trained):
    run, null = trained
    table = drift_to_null(run, null.frame(), metric="all")
    data_layer = table[(table["layer"] == "0") & (table["step"] > 0)]  # step 0 is the reference itself
    for metric in METRICS:
        rows = data_layer[data_layer["metric"] == metric]
        assert len(rows) == 39
        ratio = rows["value"].mean() / rows["null_mean"].mean()
        assert 0.75 < ratio < 1.33, (metric, ratio)
    # (``exceeds`` is not tested: with reference="initial" every step shares one reference batch,
    # so the steps' values are correlated and their exceedance rate scatters widely around 5%.)


def test_null_rows_are_stored_and_vary_with_the_weights(trained):
    run, _ = trained
    stored = load_null_floor(run.directory)
    assert (run.directory / NULL_FILE).exists()
    assert sorted(set(stored["step"])) == [0, 20]
    assert set(stored["metric"]) == set(METRICS)
    assert (stored["splits"] == 200).all() and (stored["size"] == BATCH).all()
    assert (stored["null_q95"] >= stored["null_q50"]).all()
    hidden = stored[(stored["layer"] == "2") & (stored["metric"] == "wasserstein")]
    assert hidden["null_mean"].nunique() == 2  # the hidden layer's input changes with training


def test_null_distribution_is_a_distribution_and_checks_its_arguments():
    x = torch.randn(100, 5, generator=torch.Generator().manual_seed(1))
    null = null_distribution({"a": x}, {"a": 1}, "mean_shift", splits=50)
    assert len(null) == 50 and null["value"].nunique() > 40
    # two independent samples of 50 from N(0, 1): |mean difference| / sd ≈ sqrt(2/50)·sqrt(2/π), averaged over channels
    expected = np.sqrt(2 / 50) * np.sqrt(2 / np.pi)
    assert null["value"].mean() == pytest.approx(expected, rel=0.25)
    summary = null_quantiles(null)
    assert summary.loc[0, "null_q95"] > summary.loc[0, "null_q50"]
    with pytest.raises(ValueError, match="size=60 needs a batch of at least 120"):
        null_distribution({"a": x}, {"a": 1}, size=60)
    with pytest.raises(ValueError, match="same examples along dim 0"):
        null_distribution({"a": x, "b": x[:50]}, {"a": 1, "b": 1})


def _stationary_null(seed: int, batchnorm: bool, steps: int = 200, batch: int = 32) -> pd.DataFrame:
    """Drift step to step of a network that does not learn (lr 0) on i.i.d. batches, beside its null floor."""
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 32), *([nn.BatchNorm1d(32)] if batchnorm else []), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
              nn.Linear(32, 3)]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    gen = torch.Generator().manual_seed(100 + seed)
    probe = torch.randn(256, 10, generator=gen)
    with covshift.attach(model, optimizer=opt, every=1) as tracker:
        tracker.add(NullFloor(model, probe, optimizer=opt, every=50, size=batch, splits=50))
        for _ in range(steps):
            model(torch.randn(batch, 10, generator=gen)).sum().backward()
            opt.step()
            opt.zero_grad()
    run = tracker.run
    return drift_to_null(run, run.table("null_floor"), metric="all", reference="previous")


@pytest.mark.parametrize("batchnorm", [False, True], ids=["plain", "batchnorm"])
def test_the_null_floor_is_calibrated_with_and_without_batchnorm(batchnorm):
    """Pure sampling noise exceeds the 95% floor about 5% of the time, and sits at value / null mean ≈ 1,
    below BatchNorm too: each subset is forwarded on its own, as a training batch is (3 seeds pooled)."""
    pooled = pd.concat([_stationary_null(seed, batchnorm) for seed in range(3)])
    per_metric = pooled.groupby("metric").agg(exceeds=("exceeds", "mean"), ratio=("ratio", "mean"))
    assert set(per_metric.index) == set(METRICS)
    assert per_metric["exceeds"].between(0.02, 0.10).all(), per_metric
    assert per_metric["ratio"].between(0.8, 1.25).all(), per_metric
