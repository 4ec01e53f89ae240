"""Moments that stay right where float32 sums go wrong: large means, huge values, constants, empty inputs."""

import warnings

import numpy as np
import pytest
import torch

from covshift.summary.finalize import finalize
from covshift.summary.summarize import N_BINS, QUANTILE_LEVELS, STAT_NAMES, Summarizer, merge

STAT = {name: i for i, name in enumerate(STAT_NAMES)}


def stats_of(x: torch.Tensor, dim: int | None = 1, sample_size: int = 1024) -> np.ndarray:
    return finalize([Summarizer(sample_size).summarize(x, dim)]).stats.numpy()


def reference(x: torch.Tensor, dim: int = 1) -> np.ndarray:
    """(C, values) in float64: the exact moments of the values as given."""
    return x.movedim(dim, 0).reshape(x.shape[dim], -1).double().numpy()


@pytest.mark.parametrize("ratio", [1e3, 3e3, 1e4, 1e5])
def test_variance_is_accurate_when_the_mean_dwarfs_the_spread(ratio):
    gen = torch.Generator().manual_seed(0)
    x = ratio + torch.randn(64, 6, 12, 12, generator=gen)
    stats = stats_of(x)
    ref = reference(x)
    np.testing.assert_allclose(stats[:, STAT["var"]], ref.var(1), rtol=1e-3)
    np.testing.assert_allclose(stats[:, STAT["mean"]], ref.mean(1), rtol=1e-7)


def test_a_year_feature_keeps_its_spread():
    gen = torch.Generator().manual_seed(1)
    year = 2000 + 2 * torch.randn(512, 1, generator=gen)
    stats = stats_of(year, dim=1)
    np.testing.assert_allclose(np.sqrt(stats[0, STAT["var"]]), reference(year).std(), rtol=1e-4)


def test_the_fast_path_stays_exact_on_ordinary_activations():
    gen = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(32, 8, 10, 10, generator=gen) + 0.3)
    stats = stats_of(x)
    ref = reference(x)
    np.testing.assert_allclose(stats[:, STAT["var"]], ref.var(1), rtol=1e-5)


def test_a_constant_channel_has_zero_variance():
    x = torch.full((64, 3, 5, 5), 3.3)
    x[:, 1] = torch.randn(64, 5, 5, generator=torch.Generator().manual_seed(3))
    stats = stats_of(x)
    assert stats[0, STAT["var"]] <= 1e-12 * 3.3**2
    assert stats[2, STAT["var"]] <= 1e-12 * 3.3**2
    assert stats[0, STAT["mean"]] == pytest.approx(np.float32(3.3), rel=1e-7)


@pytest.mark.parametrize("scale", [1e37, 3e38 / 4])
def test_finite_values_near_the_float32_limit_give_finite_moments(scale):
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(128, 4, generator=gen) * 2 - 1) * scale
    stats = stats_of(x)
    ref = reference(x)
    assert (stats[:, STAT["nonfinite"]] == 0).all()
    np.testing.assert_allclose(stats[:, STAT["mean"]], ref.mean(1), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(stats[:, STAT["var"]], ref.var(1), rtol=1e-5)


def test_squares_that_overflow_float32_do_not_make_the_variance_infinite():
    x = 1e20 * torch.randn(256, 3, generator=torch.Generator().manual_seed(5))
    stats = stats_of(x)
    np.testing.assert_allclose(stats[:, STAT["var"]], reference(x).var(1), rtol=1e-5)


def test_float64_inputs_beyond_float32_range_are_finite_values_not_nonfinite():
    x = 1e300 * (1 + 0.01 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    stats = stats_of(x)
    ref = reference(x)
    assert (stats[:, STAT["nonfinite"]] == 0).all()
    assert (stats[:, STAT["count"]] == 64).all()
    np.testing.assert_allclose(stats[:, STAT["mean"]], ref.mean(1), rtol=1e-12)
    np.testing.assert_array_equal(stats[:, STAT["min"]], ref.min(1))
    np.testing.assert_array_equal(stats[:, STAT["max"]], ref.max(1))
    assert np.isfinite(stats[:, STAT["mean"]]).all()


def test_float64_inputs_keep_float64_precision_in_the_moments():
    x = 1e8 + torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    stats = stats_of(x)
    np.testing.assert_allclose(stats[:, STAT["var"]], reference(x).var(1), rtol=1e-6)


def test_nan_and_inf_next_to_a_large_mean():
    x = 1e4 + torch.randn(100, 2, generator=torch.Generator().manual_seed(8))
    x[3, 0], x[7, 1] = float("nan"), float("-inf")
    stats = stats_of(x)
    ref = reference(x)
    for c in range(2):
        finite = ref[c][np.isfinite(ref[c])]
        assert stats[c, STAT["nonfinite"]] == 1 and stats[c, STAT["count"]] == 99
        np.testing.assert_allclose(stats[c, STAT["var"]], finite.var(), rtol=1e-3)


def test_merging_calls_with_different_means_is_exact():
    gen = torch.Generator().manual_seed(9)
    a, b = 5e3 + torch.randn(300, 4, generator=gen), -2e3 + 3 * torch.randn(100, 4, generator=gen)
    summarizer = Summarizer(10**9)
    merged = finalize([merge([summarizer.summarize(a, 1), summarizer.summarize(b, 1)])]).stats.numpy()
    ref = reference(torch.cat([a, b]))
    np.testing.assert_allclose(merged[:, STAT["mean"]], ref.mean(1), rtol=1e-7)
    np.testing.assert_allclose(merged[:, STAT["var"]], ref.var(1), rtol=1e-6)
    np.testing.assert_array_equal(merged[:, STAT["count"]], 400)


@pytest.mark.parametrize(
    ("shape", "dim"), [((0, 4), 1), ((0, 3, 8, 8), 1), ((0, 5), None), ((4, 0), 1), ((2, 0, 3), -1)]
)
def test_empty_inputs_are_no_record(shape, dim):
    assert Summarizer().summarize(torch.empty(shape), dim) is None


@pytest.mark.parametrize("with_nan", [False, True])
def test_the_two_pass_path_off_the_cpu_matches_the_one_pass_path(with_nan):
    """Devices other than the CPU always take the two-pass path: it agrees on ordinary inputs."""
    from covshift.summary.summarize import _channel_view

    x = torch.relu(torch.randn(16, 5, 6, 6, generator=torch.Generator().manual_seed(10)) + 0.2)
    if with_nan:
        x[2, 1, 3, 3] = float("nan")
    summarizer = Summarizer(10**9)
    view = _channel_view(x, 1)
    two_pass = finalize([summarizer._summarize_two_pass(view, view)])
    ref = reference(x)
    stats = two_pass.stats.numpy()
    for c in range(5):
        finite = ref[c][np.isfinite(ref[c])]
        np.testing.assert_allclose(stats[c, STAT["mean"]], finite.mean(), rtol=1e-6)
        np.testing.assert_allclose(stats[c, STAT["var"]], finite.var(), rtol=1e-5)
        assert stats[c, STAT["min"]] == finite.min() and stats[c, STAT["max"]] == finite.max()
    assert stats[1, STAT["nonfinite"]] == (1 if with_nan else 0)
    np.testing.assert_array_equal(two_pass.quantiles.numpy(), summarize_quantiles(x))


def summarize_quantiles(x: torch.Tensor) -> np.ndarray:
    return finalize([Summarizer(10**9).summarize(x, 1)]).quantiles.numpy()


def test_a_channel_with_no_finite_value_merges_without_poisoning_the_others():
    summarizer = Summarizer(10**9)
    a = torch.full((4, 2), float("nan"))
    b = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stats = finalize([merge([summarizer.summarize(a, 1), summarizer.summarize(b, 1)])]).stats.numpy()
    np.testing.assert_array_equal(stats[:, STAT["min"]], [1.0, 2.0])
    np.testing.assert_array_equal(stats[:, STAT["max"]], [3.0, 4.0])
    np.testing.assert_array_equal(stats[:, STAT["nonfinite"]], [4, 4])
    np.testing.assert_allclose(stats[:, STAT["mean"]], [2.0, 3.0])
    np.testing.assert_allclose(stats[:, STAT["var"]], [1.0, 1.0])


def finalize_by(route: str, partials: list):
    """``finalize`` on the CPU (numpy), or the torch route other devices take, run here on the CPU."""
    from covshift.summary import finalize as finalizing

    return finalize(partials) if route == "numpy" else finalizing._finalize_in_torch(partials, [None] * len(partials))


@pytest.mark.parametrize("route", ["numpy", "torch"])
@pytest.mark.parametrize("with_inf", [False, True])
def test_bin_means_next_to_one_huge_value_are_the_means_of_their_own_values(route, with_inf):
    # 1,000 values (not a multiple of the bins) or a non-finite one: the general route, bins of uneven width.
    x = torch.randn(1000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(21))
    x[0, 0] = -1e20
    if with_inf:
        x[1, 0] = float("inf")
    record = finalize_by(route, [Summarizer(1024).summarize(x, 1)])
    ordered = np.sort(x[:, 0].numpy())
    ordered = ordered[np.isfinite(ordered)]
    edges = np.round(np.arange(N_BINS + 1) * len(ordered) / N_BINS).astype(int)
    expected = [ordered[start:stop].mean() for start, stop in zip(edges[:-1], edges[1:])]
    np.testing.assert_allclose(record.binmeans[0].numpy(), np.float32(expected), rtol=1e-6)


@pytest.mark.parametrize("width", [2, 37, 64, 1024])
def test_float64_values_near_the_largest_double_warn_nothing_and_keep_their_sign(width):
    x = torch.randn(width, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(22)) * 1e308
    x = x.clamp(-1.7e308, 1.7e308)  # finite, but their sums and differences overflow
    x[: width // 2, 1], x[width // 2 :, 1] = -1.7e308, 1.7e308  # neighbouring ranks 3.4e308 apart
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a user running with -W error: a warning would stop the recording
        record = finalize([Summarizer(1024).summarize(x, 1)])
    assert record.quantiles[1, 0] < -1e308 and record.quantiles[1, -1] > 1e308  # float64 inputs: float64, not ±inf
    assert torch.isfinite(record.quantiles).all()
    torch_route = finalize_by("torch", [Summarizer(1024).summarize(x, 1)])
    assert torch.equal(torch_route.quantiles[1].sign(), record.quantiles[1].sign())


@pytest.mark.parametrize("route", ["numpy", "torch"])
@pytest.mark.parametrize("width", [64, 1000, 1024])
def test_float64_inputs_keep_their_quantiles_and_bin_means_exactly(route, width):
    """Quantiles and bin means of float64 inputs are float64: ±1e300 is not ±inf, 1 + 1e-12 is not 1."""
    gen = torch.Generator().manual_seed(23)
    x = torch.cat([1e300 * torch.randn(width, 1, dtype=torch.float64, generator=gen),
                   1 + 1e-12 * torch.randn(width, 1, dtype=torch.float64, generator=gen)], 1)
    record = finalize_by(route, [Summarizer(1024).summarize(x, 1)])
    assert record.quantiles.dtype == record.binmeans.dtype == torch.float64
    for channel in range(2):
        ordered = np.sort(x[:, channel].numpy())
        levels = np.array(QUANTILE_LEVELS)
        np.testing.assert_allclose(record.quantiles[channel].numpy(), np.quantile(ordered, levels), rtol=1e-15)
        edges = np.round(np.arange(N_BINS + 1) * width / N_BINS).astype(int)
        expected = [ordered[start:stop].mean() for start, stop in zip(edges[:-1], edges[1:])]
        np.testing.assert_allclose(record.binmeans[channel].numpy(), expected, rtol=1e-15)


def test_a_stored_float64_run_reads_back_the_quantiles_of_its_inputs(tmp_path):
    import covshift

    model = torch.nn.Linear(2, 2).double()
    gen = torch.Generator().manual_seed(24)
    inputs = [torch.cat([1e300 * torch.randn(256, 1, dtype=torch.float64, generator=gen),
                         -1e300 + torch.zeros(256, 1, dtype=torch.float64)], 1) for _ in range(2)]
    with covshift.attach(model, every=1, store=tmp_path / "r") as tracker:
        for x in inputs:
            model(x)
    stats = tracker.run.stats()
    assert np.isfinite(stats["q0.5"]).all() and stats["q0.5"].dtype == np.float64
    expected = np.concatenate([np.median(x.numpy(), 0) for x in inputs])
    np.testing.assert_allclose(stats["q0.5"].to_numpy(), expected, rtol=1e-15)
    assert (stats.loc[stats.channel == 1, [f"binmean_{k:02d}" for k in range(N_BINS)]] == -1e300).all().all()
    float32_run = covshift.attach(torch.nn.Linear(2, 2), every=1)  # float32 inputs stay float32: compact
    float32_run.model(torch.randn(8, 2))
    assert float32_run.detach().stats()["q0.5"].dtype == np.float32
