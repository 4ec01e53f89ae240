"""`to_tensorboard()`: a stored run as TensorBoard scalars (drift) and histograms (layer inputs).

Needs the ``tensorboard`` package (``pip install covshift[tensorboard]``); it is
imported only when :func:`to_tensorboard` runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import covshift
from covshift.integrations._scalars import LAYER_MEAN, PREFIX, metric_names, scalar_name

#: Equal-width buckets of each rebuilt histogram.
HISTOGRAM_BINS = 64


def to_tensorboard(
    run: covshift.Run | str | Path,
    logdir: str | Path,
    *,
    metric: str | Sequence[str] = "wasserstein",
    reference: str | int = "initial",
    histograms: bool = True,
    source: str = "train",
) -> Path:
    """Write a run's drift and layer-input distributions as TensorBoard events in ``logdir``.

    Scalars ``covshift/<metric>/<layer>`` and ``covshift/<metric>/layer_mean``
    hold :func:`covshift.drift` at every recorded step (the step is covshift's
    step). Histograms ``covshift/input/<layer>`` show each layer's input at every
    recorded step, all channels pooled: rebuilt from the stored quantiles of
    each channel (the quantile function is linear between the stored levels and
    runs from the channel's min to its max), weighted by each channel's count;
    count, sum and sum of squares are exact. ``tensorboard --logdir LOGDIR``
    then shows them beside the training's own curves.

    Args:
        run: a :class:`covshift.Run` or the path of a stored one.
        logdir: TensorBoard log directory; a new event file is added to it.
        metric: a drift metric, or a list of them (see :func:`covshift.drift`).
        reference: the drift reference (see :func:`covshift.drift`).
        histograms: also write the input histograms.
        source: the records to export: ``"train"`` or ``"probe"``.

    Returns:
        ``logdir`` as a Path.

    Raises:
        ImportError: tensorboard is not installed.
        ValueError: an unknown metric or reference, or no records of ``source``.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch.utils.tensorboard needs the tensorboard package
        raise ImportError("to_tensorboard() needs tensorboard: pip install 'covshift[tensorboard]'") from err
    if isinstance(run, (str, Path)):
        run = covshift.load(run)
    names = metric_names(metric)
    table = covshift.drift(run, metric=list(names), reference=reference, source=source)
    stats = run.stats(source) if histograms else None
    logdir = Path(logdir)
    writer = SummaryWriter(log_dir=str(logdir))
    try:
        for name in names:
            rows = table[table["metric"] == name]
            for layer, step, value in zip(rows["layer"].astype(str), rows["step"], rows["value"]):
                writer.add_scalar(scalar_name(name, layer), float(value), int(step))
            means = rows.groupby("step")["value"].mean()
            for step, value in means.items():
                writer.add_scalar(scalar_name(name, LAYER_MEAN), float(value), int(step))
        if stats is not None:
            for (step, layer), group in stats.groupby(["step", "layer"], observed=True, sort=True):
                histogram = layer_histogram(group)
                if histogram is not None:
                    writer.add_histogram_raw(f"{PREFIX}/input/{layer}", global_step=int(step), **histogram)
    finally:
        writer.close()
    return logdir


def layer_histogram(rows: Any, bins: int = HISTOGRAM_BINS) -> dict[str, Any] | None:
    """The arguments of ``SummaryWriter.add_histogram_raw`` for one layer at one step.

    ``rows`` are the layer's ``run.stats()`` rows at that step, one per channel.
    Channels without a finite value are left out; None when none is left.
    """
    quantile_columns = [c for c in rows.columns if c.startswith("q")]
    levels = np.array([0.0, *(float(c[1:]) for c in quantile_columns), 1.0])
    knots = rows[["min", *quantile_columns, "max"]].to_numpy(np.float64)
    count = rows["count"].to_numpy(np.float64)
    mean, var = rows["mean"].to_numpy(np.float64), rows["var"].to_numpy(np.float64)
    keep = (count > 0) & np.isfinite(knots).all(axis=1) & np.isfinite(mean) & np.isfinite(var)
    if not keep.any():
        return None
    knots, count, mean, var = knots[keep], count[keep], mean[keep], var[keep]
    knots = np.maximum.accumulate(knots, axis=1)  # float32 quantiles may undercut the float64 min by a rounding
    low, high = float(knots[:, 0].min()), float(knots[:, -1].max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    cdf = _cdf(knots, levels, edges)
    cdf[:, 0], cdf[:, -1] = 0.0, 1.0  # every value lies within [low, high]
    bucket_counts = (np.diff(cdf, axis=1) * count[:, None]).sum(axis=0)
    return {
        "min": low,
        "max": high,
        "num": float(count.sum()),
        "sum": float((count * mean).sum()),
        "sum_squares": float((count * (var + mean**2)).sum()),
        "bucket_limits": edges[1:].tolist(),
        "bucket_counts": bucket_counts.tolist(),
    }


def _cdf(knots: np.ndarray, levels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each channel's piecewise-linear CDF (knots at ``levels``) at ``edges``: ``(channels, edges)``."""
    below = (knots[:, :, None] <= edges[None, None, :]).sum(axis=1)  # knots at or below each edge
    inside = (below > 0) & (below < knots.shape[1])
    hi = np.clip(below, 1, knots.shape[1] - 1)
    k0 = np.take_along_axis(knots, hi - 1, axis=1)
    k1 = np.take_along_axis(knots, hi, axis=1)
    l0, l1 = levels[hi - 1], levels[hi]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(k1 > k0, (edges[None, :] - k0) / (k1 - k0), 0.0)
    return np.where(inside, l0 + frac * (l1 - l0), np.where(below == 0, 0.0, 1.0))
