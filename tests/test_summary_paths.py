"""The hot path's fast routes agree with its general ones: numpy against torch, rank bins against a sort."""

import numpy as np
import pytest
import torch

from covshift.summary import finalize as finalizing
from covshift.summary import row_statistics
from covshift.summary.finalize import finalize
from covshift.summary.summarize import N_BINS, QUANTILE_LEVELS, STAT_NAMES, Summarizer, merge

STAT = {name: i for i, name in enumerate(STAT_NAMES)}


def mixed_partials() -> tuple[list, list]:
    """Partials that take every route of finalize: full 1,024-value rows (rank bins), rows holding NaN
    and Inf, narrow rows (fast sort), widths that do not split into bins, float64, a merged pair, a
    channel with no finite value, and sketches that keep a subset of rows."""
    gen = torch.Generator().manual_seed(11)
    s = Summarizer(1024)
    relu = torch.relu(torch.randn(64, 6, 12, 12, generator=gen))  # 9,216 values per channel, many zeros
    nonfinite = torch.randn(64, 3, 10, 10, generator=gen)
    nonfinite[0, 1, 0, 0], nonfinite[3, 2, 4, 4] = float("nan"), float("inf")
    nonfinite[:, 0] = float("nan")
    partials = [
        s.summarize(relu, 1),
        s.summarize(nonfinite, 1),
        s.summarize(torch.randn(40, 5, 8, generator=gen).round(), 1),  # 320 values: fast sort, ties
        s.summarize(torch.randn(37, 4, generator=gen), 1),  # 37 values: not a multiple of the bins
        s.summarize(1e3 + torch.randn(16, 7, 64, dtype=torch.float64, generator=gen), 1),  # 1,024 in float64
        merge([s.summarize(torch.randn(20, 6, 30, generator=gen), 1), s.summarize(torch.randn(9, 6, 30, generator=gen), 1)]),
        s.summarize(torch.randn(8, 2, generator=gen), 1),  # 8 values: fewer than the bins
    ]
    sketch = [torch.tensor([0, 3, 5]), torch.tensor([0, 2]), None, torch.tensor([1, 2]), None, torch.tensor([0, 5]), None]
    return partials, sketch


@pytest.mark.parametrize("with_sketch", [False, True])
@pytest.mark.parametrize("rows", ["mixed", "full and finite"])
def test_numpy_finalize_equals_the_torch_finalize_it_replaces_on_the_cpu(with_sketch, rows, monkeypatch):
    partials, sketch = mixed_partials()
    if rows == "full and finite":  # only 1,024-value rows without NaN or Inf: the rank bins' route
        partials, sketch = [partials[0], partials[4]], [sketch[0], sketch[4]]
    sketch = sketch if with_sketch else None
    read_from_bins = []
    spied = row_statistics._statistics_of_bins
    monkeypatch.setattr(row_statistics, "_statistics_of_bins", lambda bins: read_from_bins.append(1) or spied(bins))
    got = finalize(partials, sketch)
    # A block holding any row with NaN or Inf takes the general route, rank bins included.
    assert bool(read_from_bins) == (rows == "full and finite")
    expected = finalizing._finalize_in_torch(partials, sketch if sketch is not None else [None] * len(partials))
    torch.testing.assert_close(got.stats, expected.stats, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(got.quantiles, expected.quantiles, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(got.binmeans, expected.binmeans, rtol=1e-6, atol=0, equal_nan=True)
    if with_sketch:
        assert torch.equal(got.sketched, expected.sketched)
    else:
        assert got.sketched is None and expected.sketched is None


def test_finalize_leaves_the_partials_samples_as_they_were():
    partials, sketch = mixed_partials()
    before = [p.sample.clone() for p in partials]
    finalize(partials, sketch)
    for p, sample in zip(partials, before):
        assert torch.equal(p.sample, sample)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(200, 1024, generator=g),
        lambda g: torch.relu(torch.randn(200, 1024, generator=g)),  # half zeros: ties across runs
        lambda g: torch.randint(-3, 4, (200, 1024), generator=g).float(),  # seven distinct values
        lambda g: torch.full((3, 1024), -0.0),
        lambda g: torch.randn(50, 1024, generator=g) * torch.logspace(-30, 30, 1024),
    ],
)
def test_rank_bins_hold_exactly_the_values_of_their_ranks(make):
    rows = make(torch.Generator().manual_seed(12)).numpy()
    expected = np.sort(rows, axis=1).reshape(rows.shape[0], N_BINS, -1)
    bins = row_statistics.rank_bins(rows.copy())
    np.testing.assert_array_equal(np.sort(bins, axis=2), expected)


def test_full_rows_read_through_rank_bins_equal_numpy_quantiles_and_bin_means():
    rows = torch.relu(torch.randn(100, 1024, generator=torch.Generator().manual_seed(13))).numpy()
    zero_frac, quantiles, binmeans = row_statistics.statistics_of_rows(rows.copy())
    ordered = np.sort(rows, axis=1).astype(np.float64)
    np.testing.assert_array_equal(quantiles, np.quantile(ordered, QUANTILE_LEVELS, axis=1).T.astype(np.float32))
    np.testing.assert_allclose(binmeans, ordered.reshape(100, N_BINS, -1).mean(2), rtol=1e-6)
    np.testing.assert_array_equal(zero_frac, (rows == 0).mean(1))


def test_rows_with_nonfinite_values_leave_the_rank_bins_for_the_general_path():
    rows = torch.randn(4, 1024, generator=torch.Generator().manual_seed(14)).numpy()
    rows[1, 7] = np.inf  # samples hold non-finite values as +inf
    zero_frac, quantiles, _ = row_statistics.statistics_of_rows(rows.copy())
    finite = np.sort(rows[1][np.isfinite(rows[1])])
    np.testing.assert_allclose(quantiles[1], np.quantile(finite.astype(np.float64), QUANTILE_LEVELS), rtol=1e-6)
    assert np.isfinite(quantiles).all() and (zero_frac == 0).all()


def test_counts_of_one_shape_are_shared_but_never_changed_by_merges_or_finalize():
    s = Summarizer(64)
    a, b = s.summarize(torch.randn(4, 3, 5), 1), s.summarize(torch.randn(4, 3, 5), 1)
    assert a.count is b.count  # made once per shape
    merged = merge([a, b])
    finalize([merged, a])
    assert a.count.tolist() == [20, 20, 20] and a.nonfinite.tolist() == [0, 0, 0]
    assert merged.count.tolist() == [40, 40, 40]


@pytest.mark.parametrize("width", [1, 8, 37, 512, 1024, 2040, 2048, 4096])
def test_zero_counts_per_row_are_exact_at_every_width(width):
    gen = torch.Generator().manual_seed(15)
    rows = torch.relu(torch.randn(33, width, generator=gen)).numpy()
    rows[0] = 0.0  # a row of zeros: the most any byte lane can hold
    rows[1] = -0.0
    rows[2] = np.inf
    expected = np.array([sum(value == 0 for value in row) for row in rows])
    np.testing.assert_array_equal(row_statistics.zero_count(rows), expected)
    np.testing.assert_array_equal(row_statistics.zero_count(np.asfortranarray(rows)), expected)


@pytest.mark.parametrize("shape, dim", [((16, 20, 12, 12), 1), ((16, 3, 9, 9), 1), ((8, 50, 12), -1)])
def test_channels_last_and_narrow_rows_summarize_as_the_contiguous_layout_does(shape, dim):
    """torch.compile hands over channels-last images, and narrow (tokens, C) rows are folded: the moments and
    extrema agree with a contiguous copy's to float precision, and the sample is the very same values."""
    from covshift.summary.summarize import Summarizer

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2 + 1
    other = x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    if x.ndim == 4:
        assert other.stride(1) == 1  # channels innermost in memory
    summarizer = Summarizer(sample_size=64)
    want = summarizer.summarize(x.clone(), dim)
    got = summarizer.summarize(other, dim)
    values = x.movedim(dim, 0).reshape(x.shape[dim], -1).double()
    torch.testing.assert_close(got.mean, values.mean(1))
    torch.testing.assert_close(got.m2, (values - values.mean(1, keepdim=True)).square().sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(got.min, want.min) and torch.equal(got.max, want.max) and torch.equal(got.count, want.count)
    assert torch.equal(got.sample, want.sample)
