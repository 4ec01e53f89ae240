"""Time of every drift metric on a run the size of 10 MNIST epochs, against loading it.

Writes a synthetic run (4,700 steps × 8 layers × 32 channels of the "train"
source, ≈1.2 M records) in the real storage format to a temporary directory,
then times ``covshift.load(d).stats()`` and ``covshift.drift(run, metric="all")``
(and each metric alone), best of ``--repeats``.

    .venv/bin/python benchmarks/drift_speed.py --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import covshift
from covshift.store import files as store
from covshift.metrics.engine import METRICS
from covshift.summary.summarize import BINMEAN_COLUMNS, N_BINS, QUANTILE_COLUMNS, QUANTILE_LEVELS, STAT_NAMES


def write_run(directory: Path, steps: int, layers: int, channels: int, steps_per_part: int = 100) -> None:
    """A run whose channels are normals drifting in location and scale, written part by part."""
    rng = np.random.default_rng(0)
    names = [f"layer{i}" for i in range(layers)]
    run_id = store.new_run_id()
    store.write_meta(directory, {
        "format": store.FORMAT, "format_version": store.FORMAT_VERSION, "name": "synthetic", "run_id": run_id,
        "config": {"every": 1, "sample_size": 1024, "quantile_levels": list(QUANTILE_LEVELS), "n_bins": N_BINS},
        "layers": [{"name": n, "type": "Conv2d", "channels": channels, "channel_dim": 1} for n in names],
    })
    # Standard-normal quantiles and equal-mass bin means, from one large sorted sample.
    sample = np.sort(rng.standard_normal(2**20))
    z_quantiles = np.quantile(sample, QUANTILE_LEVELS)
    z_binmeans = sample.reshape(N_BINS, -1).mean(axis=1)
    for first in range(0, steps, steps_per_part):
        step = np.arange(first, min(first + steps_per_part, steps))
        rows = len(step) * layers * channels
        loc = (rng.standard_normal(rows) * 0.05 + np.repeat(step, layers * channels) / steps)[:, None]
        scale = np.exp(rng.standard_normal(rows) * 0.05)[:, None]
        columns = {
            "step": pa.array(np.repeat(step, layers * channels), pa.int64()),
            "source": pa.array(np.full(rows, "train")),
            "layer": pa.array(np.tile(np.repeat(names, channels), len(step))),
            "channel": pa.array(np.tile(np.arange(channels), len(step) * layers), pa.int32()),
        }
        stats = {
            "count": np.full(rows, 4096), "mean": loc[:, 0], "var": scale[:, 0] ** 2,
            "min": loc[:, 0] - 4 * scale[:, 0], "max": loc[:, 0] + 4 * scale[:, 0],
            "nonfinite": np.zeros(rows, np.int64), "zero_frac": np.zeros(rows),
        }
        for name in STAT_NAMES:
            columns[name] = pa.array(stats[name], pa.int64() if name in ("count", "nonfinite") else pa.float64())
        for name, z in zip(QUANTILE_COLUMNS, z_quantiles):
            columns[name] = pa.array((loc[:, 0] + scale[:, 0] * z).astype(np.float32))
        for name, z in zip(BINMEAN_COLUMNS, z_binmeans):
            columns[name] = pa.array((loc[:, 0] + scale[:, 0] * z).astype(np.float32))
        table = pa.table(columns).sort_by([("layer", "ascending"), ("step", "ascending"), ("channel", "ascending")])
        for key in ("source", "layer"):  # as covshift writes them: sorted by layer, dictionary-encoded
            table = table.set_column(table.schema.get_field_index(key), key, table[key].dictionary_encode())
        store.write_part(store.part_path(directory, first, run_id), table, run_id)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4700)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--each", action="store_true", help="also time each metric alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="covshift-bench-") as tmp:
        directory = Path(tmp)
        write_run(directory, args.steps, args.layers, args.channels)
        rows = args.steps * args.layers * args.channels
        load_s = best_of(args.repeats, lambda: covshift.load(directory).stats())
        run = covshift.load(directory)
        run.stats()  # cached in the Run: drift() times below exclude reading the files
        all_s = best_of(args.repeats, lambda: covshift.drift(run, metric="all"))
        print(f"run: {args.steps} steps x {args.layers} layers x {args.channels} channels = {rows:,} records")
        print(f"load (covshift.load(d).stats()): {load_s:.2f} s")
        print(f"drift(metric='all'), 7 metrics:  {all_s:.2f} s   (ratio to loading: {all_s / load_s:.2f})")
        if args.each:
            for name in METRICS:
                print(f"  {name:12s} {best_of(args.repeats, lambda: covshift.drift(run, metric=name)):.2f} s")


if __name__ == "__main__":
    main()
