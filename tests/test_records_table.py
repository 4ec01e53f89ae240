"""Finalized steps as the stored table: rows and values against a plain pandas reference."""

import numpy as np
import pandas as pd
import pytest
import torch

from covshift.columns import BINMEAN_COLUMNS, QUANTILE_COLUMNS, STAT_NAMES
from covshift.store.records import SCHEMA, PendingStep, records_to_table
from covshift.summary.summarize import Record

KEYS = ["layer", "source", "step", "channel"]


def pending_steps(repeat: bool = True) -> list[PendingStep]:
    """Steps with several sources and layers (names out of sorted order), sketched subsets, and with
    ``repeat`` a repeated step (whose rows interleave with the first's: the row-by-row ordering)."""
    gen = torch.Generator().manual_seed(3)
    steps = []
    layout = [
        (0, [("train", "fc", 3, None), ("train", "conv", 5, [0, 4]), ("probe", "conv", 5, None)]),
        (7, [("train", "conv", 5, [0, 2, 4]), ("train", "fc", 3, None), ("probe_a", "fc", 3, [1])]),
        (7, [("train", "fc", 3, None)]),  # the same step again (a resumed run): kept, after the first
    ][: 3 if repeat else 2]
    for seq, (step, records) in enumerate(layout):
        rows = sum(channels for *_, channels, _ in records)
        masks = [torch.ones(c, dtype=torch.bool) if keep is None else torch.isin(torch.arange(c), torch.tensor(keep))
                 for *_, c, keep in records]
        sketched = torch.cat(masks)
        record = Record(
            stats=torch.randn(rows, len(STAT_NAMES), generator=gen, dtype=torch.float64).abs().round(),
            quantiles=torch.randn(int(sketched.sum()), len(QUANTILE_COLUMNS), generator=gen),
            binmeans=torch.randn(int(sketched.sum()), len(BINMEAN_COLUMNS), generator=gen),
            sketched=None if bool(sketched.all()) else sketched,
        )
        keys = [(step, source, layer, channels) for source, layer, channels, _ in records]
        steps.append(PendingStep(seq, keys, record, 0))
    return steps


def reference(pending: list[PendingStep]) -> pd.DataFrame:
    """The rows in input order as a frame, sorted stably by layer, source, step and channel."""
    frames = []
    for p in pending:
        mask = np.ones(p.record.stats.shape[0], bool) if p.record.sketched is None else p.record.sketched.numpy()
        quantiles = np.full((len(mask), len(QUANTILE_COLUMNS)), np.nan, np.float32)
        binmeans = np.full((len(mask), len(BINMEAN_COLUMNS)), np.nan, np.float32)
        quantiles[mask], binmeans[mask] = p.record.quantiles.numpy(), p.record.binmeans.numpy()
        keys = pd.DataFrame(
            [(step, source, layer, c) for step, source, layer, channels in p.keys for c in range(channels)],
            columns=["step", "source", "layer", "channel"],
        )
        frames.append(pd.concat([
            keys,
            pd.DataFrame(p.record.stats.numpy(), columns=list(STAT_NAMES)),
            pd.DataFrame(quantiles, columns=list(QUANTILE_COLUMNS)),
            pd.DataFrame(binmeans, columns=list(BINMEAN_COLUMNS)),
        ], axis=1))
    frame = pd.concat(frames, ignore_index=True).sort_values(KEYS, kind="stable", ignore_index=True)
    for name in ("count", "nonfinite"):
        frame[name] = frame[name].astype(np.int64)
    frame["channel"] = frame["channel"].astype(np.int32)
    return frame


@pytest.mark.parametrize("repeat", [False, True])
def test_rows_are_sorted_by_layer_source_step_and_channel_with_the_values_of_their_records(repeat):
    pending = pending_steps(repeat)
    table = records_to_table(pending)
    assert table.schema.equals(SCHEMA)
    got = table.to_pandas()
    for name in ("source", "layer"):
        got[name] = got[name].astype(str)
    pd.testing.assert_frame_equal(got, reference(pending)[got.columns.tolist()])


def test_sketch_columns_are_null_outside_the_sketched_rows_and_share_one_validity():
    table = records_to_table(pending_steps())
    valid = table["q0.5"].is_valid().to_numpy(zero_copy_only=False)
    assert 0 < valid.sum() < len(valid)
    for name in (*QUANTILE_COLUMNS, *BINMEAN_COLUMNS):
        np.testing.assert_array_equal(table[name].is_valid().to_numpy(zero_copy_only=False), valid)


def test_no_steps_give_an_empty_table_of_the_stored_schema():
    table = records_to_table([])
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)
