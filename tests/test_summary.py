"""The hot path: per-channel summaries against numpy on known tensors."""

import numpy as np
import pytest
import torch

from covshift.summary.finalize import finalize
from covshift.summary.summarize import (
    N_BINS,
    QUANTILE_LEVELS,
    STAT_NAMES,
    Summarizer,
    merge,
)

EXACT = 10**9
STAT = {name: i for i, name in enumerate(STAT_NAMES)}


def per_channel(x: torch.Tensor, dim: int) -> np.ndarray:
    """(C, values) view of x in numpy, the reference layout."""
    return x.movedim(dim, 0).reshape(x.shape[dim], -1).double().numpy()


def summarize(x, dim=1, sample_size=EXACT):
    return finalize([Summarizer(sample_size).summarize(x, dim)])


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((16, 5, 7, 7), 1), ((64, 12), 1), ((3, 9, 6), -1), ((2, 4, 3, 5, 6), 1), ((40,), 0)],
)
def test_moments_and_extrema_equal_numpy(shape, dim):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 1.5
    record = summarize(x, dim)
    ref = per_channel(x, dim)
    stats = record.stats.numpy()
    np.testing.assert_array_equal(stats[:, STAT["count"]], ref.shape[1])
    np.testing.assert_allclose(stats[:, STAT["mean"]], ref.mean(1), rtol=1e-5, atol=1e-6)
    # float32 sums: the variance is exact to about 1e-7 of the mean square
    np.testing.assert_allclose(stats[:, STAT["var"]], ref.var(1), rtol=1e-5, atol=1e-6 * (ref**2).mean())
    np.testing.assert_array_equal(stats[:, STAT["min"]], ref.min(1))
    np.testing.assert_array_equal(stats[:, STAT["max"]], ref.max(1))
    np.testing.assert_array_equal(stats[:, STAT["nonfinite"]], 0)


def test_exact_quantiles_and_bin_means_equal_numpy():
    x = torch.randn(50, 3, 8, 8, generator=torch.Generator().manual_seed(2)).exp()
    record = summarize(x)
    ref = per_channel(x, 1)
    expected_q = np.quantile(ref, QUANTILE_LEVELS, axis=1).T
    np.testing.assert_allclose(record.quantiles.numpy(), expected_q, rtol=1e-5)
    # 3200 values in 32 equal-mass bins of 100 sorted values each
    expected_bins = np.sort(ref, axis=1).reshape(3, N_BINS, -1).mean(2)
    np.testing.assert_allclose(record.binmeans.numpy(), expected_bins, rtol=1e-5)


def test_whole_tensor_summary_when_channel_dim_is_none():
    x = torch.randn(10, 4, 3)
    record = summarize(x, None)
    assert record.stats.shape[0] == 1
    assert record.stats[0, STAT["count"]] == x.numel()
    np.testing.assert_allclose(record.stats[0, STAT["mean"]], x.double().mean().item(), rtol=1e-6)


def test_nan_and_inf_are_counted_and_excluded():
    x = torch.randn(20, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    x[5, 2, 1, 1] = float("-inf")
    record = summarize(x)
    stats = record.stats.numpy()
    np.testing.assert_array_equal(stats[:, STAT["nonfinite"]], [2, 0, 1])
    ref = per_channel(x, 1)
    for c in range(3):
        finite = ref[c][np.isfinite(ref[c])]
        assert stats[c, STAT["count"]] == finite.size
        np.testing.assert_allclose(stats[c, STAT["mean"]], finite.mean(), rtol=1e-5)
        np.testing.assert_allclose(stats[c, STAT["var"]], finite.var(), rtol=1e-5)
        assert stats[c, STAT["min"]] == finite.min() and stats[c, STAT["max"]] == finite.max()
        np.testing.assert_allclose(record.quantiles[c].numpy(), np.quantile(finite, QUANTILE_LEVELS), rtol=1e-5)
    assert np.isfinite(record.binmeans.numpy()).all()


def test_all_nonfinite_channel_gives_nan_statistics_not_errors():
    x = torch.randn(8, 2, 5)
    x[:, 1] = float("nan")
    stats = summarize(x).stats.numpy()
    assert stats[1, STAT["count"]] == 0 and stats[1, STAT["nonfinite"]] == 40
    assert np.isnan(stats[1, STAT["mean"]]) and np.isnan(stats[1, STAT["min"]])
    assert stats[0, STAT["count"]] == 40


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_summarized_in_float32(dtype):
    x = (torch.randn(32, 4, 6, 6) * 50).to(dtype)
    record = summarize(x)
    ref = per_channel(x.float(), 1)
    np.testing.assert_allclose(record.stats[:, STAT["mean"]].numpy(), ref.mean(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(record.stats[:, STAT["max"]].numpy(), ref.max(1))


def test_zero_fraction_of_relu_input():
    x = torch.relu(torch.randn(64, 2, 10, 10, generator=torch.Generator().manual_seed(4)))
    x[:, 1] = 0.0
    zero = summarize(x).stats[:, STAT["zero_frac"]].numpy()
    np.testing.assert_allclose(zero[0], (per_channel(x, 1)[0] == 0).mean())
    assert zero[1] == 1.0


def test_subsampled_quantiles_within_documented_error():
    """Default sample: quantile error within 4 standard errors of a 1024-value sample."""
    x = torch.randn(600, 4, 10, generator=torch.Generator().manual_seed(5))  # 6000 values per channel
    sampled = summarize(x, 1, sample_size=1024)
    exact = summarize(x, 1)
    levels = np.array(QUANTILE_LEVELS)
    from scipy.stats import norm

    standard_error = np.sqrt(levels * (1 - levels) / 1024) / norm.pdf(norm.ppf(levels))
    error = np.abs(sampled.quantiles.numpy() - exact.quantiles.numpy())
    assert (error < 4 * standard_error).all()
    # moments and extrema still use every value
    for name in ("count", "mean", "var", "min", "max", "nonfinite"):
        np.testing.assert_array_equal(sampled.stats[:, STAT[name]].numpy(), exact.stats[:, STAT[name]].numpy())


def test_sample_takes_the_same_positions_every_time():
    """Fresh summarizers (no shared cache) sample the same positions: the seed is fixed."""
    x = torch.randn(128, 8, 12, 12)
    first = Summarizer(256).summarize(x, 1).sample
    again = Summarizer(256).summarize(x.clone(), 1).sample
    assert torch.equal(first, again) and first.shape == (8, 256)


def test_sample_does_not_alias_with_image_width():
    """A column-constant image must not be sampled from one column only."""
    columns = torch.arange(24.0).expand(128, 1, 24, 24)  # value = column index
    sample = Summarizer(1024).summarize(columns.contiguous(), 1).sample
    assert len(torch.unique(sample)) == 24


def test_merge_of_two_calls_equals_summary_of_both():
    summarizer = Summarizer(EXACT)
    a, b = torch.randn(10, 3, 4), torch.randn(6, 3, 4) + 2
    merged = finalize([merge([summarizer.summarize(a, 1), summarizer.summarize(b, 1)])])
    together = finalize([summarizer.summarize(torch.cat([a, b]), 1)])
    torch.testing.assert_close(merged.stats, together.stats, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged.quantiles, together.quantiles)


def test_finalize_many_pads_samples_of_different_widths():
    summarizer = Summarizer(64)
    small, large = torch.randn(4, 2, 3), torch.randn(100, 3, 5)
    both = finalize([summarizer.summarize(small, 1), summarizer.summarize(large, 1)])
    alone = finalize([summarizer.summarize(small, 1)])
    assert both.stats.shape == (5, len(STAT_NAMES))
    torch.testing.assert_close(both.quantiles[:2], alone.quantiles)


def test_full_rows_and_padded_rows_give_the_same_statistics():
    """A block of full finite rows takes a shortcut; it must agree with the general (padded) path."""
    summarizer = Summarizer(64)
    x = torch.randn(50, 3, 8, generator=torch.Generator().manual_seed(8)).relu()  # 400 values, 64 sampled
    full = finalize([summarizer.summarize(x, 1)])
    narrow = summarizer.summarize(torch.randn(5, 2, 4), 1)  # 20 values per channel: +inf padding
    padded = finalize([summarizer.summarize(x, 1), narrow])
    torch.testing.assert_close(padded.quantiles[:3], full.quantiles)
    torch.testing.assert_close(padded.binmeans[:3], full.binmeans)
    torch.testing.assert_close(padded.stats[:3], full.stats)
    ordered = np.sort(summarizer.summarize(x, 1).sample.numpy(), axis=1)
    np.testing.assert_allclose(full.quantiles.numpy(), np.quantile(ordered, QUANTILE_LEVELS, axis=1).T, rtol=1e-6)
    np.testing.assert_allclose(full.binmeans.numpy(), ordered.reshape(3, N_BINS, 2).mean(2), rtol=1e-6)
    np.testing.assert_allclose(full.stats[:, STAT["zero_frac"]].numpy(), (ordered == 0).mean(1))


def test_blocks_of_rows_give_the_same_statistics_as_one(monkeypatch):
    from covshift.summary import row_statistics

    summarizer = Summarizer(32)
    partials = [summarizer.summarize(torch.randn(10, c, 7), 1) for c in (3, 5, 2, 4)]
    whole = finalize(partials)
    monkeypatch.setattr(row_statistics, "BLOCK_VALUES", 100)  # about 3 rows of 32 per block
    assert len(row_statistics.blocks([p.sample for p in partials])) == 4
    blocked = finalize(partials)
    for field in ("stats", "quantiles", "binmeans"):
        torch.testing.assert_close(getattr(blocked, field), getattr(whole, field))


def test_sketching_a_subset_of_channels_keeps_their_sketches_and_every_channels_moments():
    summarizer = Summarizer(64)
    x = torch.randn(16, 6, 8)
    x[:, 4] = torch.relu(x[:, 4])
    partials = [summarizer.summarize(x, 1), summarizer.summarize(torch.randn(16, 3), 1)]
    whole = finalize(partials)
    subset = finalize(partials, [torch.tensor([0, 4]), None])
    torch.testing.assert_close(subset.stats, whole.stats)  # moments, extrema and zero fraction of every channel
    assert subset.sketched.tolist() == [True, False, False, False, True, False, True, True, True]
    torch.testing.assert_close(subset.quantiles, whole.quantiles[subset.sketched])
    torch.testing.assert_close(subset.binmeans, whole.binmeans[subset.sketched])
    assert whole.sketched is None


def test_bad_sample_size_is_rejected():
    with pytest.raises(ValueError, match="sample_size must be a positive int, got 0"):
        Summarizer(0)


@pytest.mark.parametrize(("shape", "dim"), [((6, 3), None), ((1, 4, 5), 1), ((8, 2, 3), 1)])
def test_summary_is_not_changed_by_later_in_place_edits_of_the_input(shape, dim):
    """Partials wait for the flush; an activation edited in place meanwhile must not leak in."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    expected = summarize(x.clone(), dim)
    partial = Summarizer(EXACT).summarize(x, dim)
    x.mul_(100).add_(5)
    got = finalize([partial])
    torch.testing.assert_close(got.quantiles, expected.quantiles)
    torch.testing.assert_close(got.stats, expected.stats)


def test_masked_path_counts_with_bool_sums():
    x = torch.full((4, 2, 3), float("nan"))
    x[0, 0, 0] = 1.0
    partial = Summarizer(EXACT).summarize(x, 1)
    assert partial.count.dtype == torch.int64 and partial.count.tolist() == [1, 0]
