"""A noise floor you can trust: the null distribution of a drift metric under pure sampling noise.

:func:`covshift.noise_floor` compares one fixed split of the probe batch (its two
halves) at each probe step: one draw of the sampling noise, the same number at
every step on the data layer, and an estimate that can sit far from the typical
noise when a layer has few channels. This module instead draws ``splits`` random
pairs of disjoint subsets of the probe batch (each of ``size`` examples, by
default the training batch size the drift compares), computes the metric
between the two subsets of each pair with the same summaries and code as
:func:`covshift.drift`, and keeps the distribution: its mean, median and 95th
percentile per (step, layer, metric).

A layer whose drift is pure sampling noise reads ``value / null_mean ≈ 1`` and
exceeds ``null_q95`` at about 5% of its steps; :func:`drift_to_null` gives both.
On the input layer (the data itself) that is a calibration check, tested in
``tests/test_noise_floor.py``.

Record the null during training with :class:`NullFloor` (an optimizer post-hook
every N steps, like the probe) or at a point you choose with
:meth:`NullFloor.measure`; it appends ``null_floor.jsonl`` to the run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from covshift.record import context
from covshift.checks import check_choice, check_int
from covshift.record.layers import channel_axis, select_layers
from covshift.record.probe import preserved
from covshift.science.measurement import Measurement
from covshift.store.files import read_jsonl
from covshift.metrics.api import beside_floor, drift, drift_between
from covshift.metrics.arrays import read_arrays
from covshift.metrics.engine import AGGREGATES
from covshift.metrics.registry import resolve
from covshift.summary.finalize import finalize
from covshift.summary.summarize import (
    BINMEAN_COLUMNS,
    DEFAULT_SAMPLE_SIZE,
    QUANTILE_COLUMNS,
    STAT_NAMES,
    Summarizer,
)

NULL_FILE = "null_floor.jsonl"
DEFAULT_SPLITS = 100
#: Quantiles of the null kept per (step, layer, metric).
NULL_COLUMNS = ("null_mean", "null_q50", "null_q95")


def null_distribution(
    inputs: dict[str, torch.Tensor],
    channel_dims: dict[str, int | None],
    metric: str | Sequence[str] = "all",
    splits: int = DEFAULT_SPLITS,
    size: int | None = None,
    normalize: bool = True,
    agg: str = "mean",
    seed: int = 0,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
) -> pd.DataFrame:
    """The metric between two disjoint random subsets of a batch, for ``splits`` random splits.

    Args:
        inputs: each layer's input on the batch, examples along dim 0.
        channel_dims: each layer's channel axis (as the tracker records it).
        metric: as in :func:`covshift.drift`.
        splits: random splits drawn.
        size: examples in each subset (default: half the batch); at most half of it.
        normalize, agg: as in :func:`covshift.drift`.
        seed: seed of the splits.
        sample_size: values per channel the quantiles come from (the tracker's default).

    Returns:
        Tidy rows ``split, layer, metric, value`` (channels aggregated with ``agg``).
    """
    metrics = resolve(metric)
    check_int("splits", splits)
    check_choice("agg", agg, AGGREGATES)
    n = {int(x.shape[0]) for x in inputs.values()}
    if len(n) != 1:
        raise ValueError(f"every layer's input must hold the same examples along dim 0, got batch sizes {sorted(n)}")
    n_examples = n.pop()
    size = n_examples // 2 if size is None else size
    check_int("size", size)
    if 2 * size > n_examples:
        raise ValueError(f"size={size} needs a batch of at least {2 * size} examples, got {n_examples}")
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(splits):
        order = torch.randperm(n_examples, generator=generator)
        a, b = order[:size], order[size : 2 * size]
        pairs.append(({layer: x[a] for layer, x in inputs.items()}, {layer: x[b] for layer, x in inputs.items()}))
    return null_of_pairs(pairs, channel_dims, metrics, normalize, agg, sample_size)


def null_of_pairs(
    pairs: Sequence[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    channel_dims: dict[str, int | None],
    metrics: tuple,
    normalize: bool,
    agg: str,
    sample_size: int,
) -> pd.DataFrame:
    """The metrics between the two layer inputs of each pair (two disjoint subsets of one batch), per split."""
    summarizer = Summarizer(sample_size)
    rows: dict[str, list] = {"step": [], "layer": [], "channel": []}
    partials_a, partials_b = [], []
    layers = list(pairs[0][0])
    for split, (inputs_a, inputs_b) in enumerate(pairs):
        for layer in layers:
            part_a = summarizer.summarize(inputs_a[layer], channel_dims[layer])
            part_b = summarizer.summarize(inputs_b[layer], channel_dims[layer])
            channels = len(part_a.count)
            rows["step"] += [split] * channels
            rows["layer"] += [layer] * channels
            rows["channel"] += list(range(channels))
            partials_a.append(part_a)
            partials_b.append(part_b)
    frame_a, frame_b = (_stats_frame(rows, finalize(p), layers) for p in (partials_a, partials_b))
    half_a, order = read_arrays(frame_a, "train", metrics)
    half_b, _ = read_arrays(frame_b, "train", metrics)
    between = drift_between(half_a, half_b, order, metrics, "random splits", normalize=normalize, agg=agg)
    return between.rename(columns={"step": "split"})[["split", "layer", "metric", "value"]]


def null_quantiles(null: pd.DataFrame) -> pd.DataFrame:
    """Per layer and metric: ``null_mean, null_q50, null_q95`` and ``splits`` of a :func:`null_distribution`."""
    grouped = null.groupby([null["layer"].astype(str), "metric"], sort=False)["value"]
    out = pd.DataFrame({
        "null_mean": grouped.mean(),
        "null_q50": grouped.quantile(0.5),
        "null_q95": grouped.quantile(0.95),
        "splits": grouped.count(),
    })
    return out.reset_index()


def _stats_frame(rows: dict[str, list], record: Any, layers: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["layer"] = pd.Categorical(frame["layer"], categories=layers)
    stats = record.stats.numpy()
    for i, name in enumerate(STAT_NAMES):
        frame[name] = stats[:, i]
    frame[list(QUANTILE_COLUMNS)] = record.quantiles.numpy()
    frame[list(BINMEAN_COLUMNS)] = record.binmeans.numpy()
    return frame


class NullFloor(Measurement):
    """Record the null distribution of every metric on a probe batch, every ``every`` optimizer steps.

    The probe runs once per measured step through ``model`` in its current mode,
    with buffers and RNG put back afterwards and covshift trackers ignoring the
    pass; each selected layer's input is kept and split ``splits`` times at random.

    Args:
        model: the network.
        probe: the probe batch (a tensor, or a tuple of positional inputs), examples on dim 0.
        optimizer: measure after every ``every``-th ``optimizer.step()`` (steps 0, every, …);
            None: only when :meth:`measure` is called.
        every: as above.
        directory: where to append ``null_floor.jsonl`` when measuring alone; added to a tracker
            (``tracker.add(NullFloor(...))``, the way to use it) the rows go into its run.
        layers: as in ``covshift.attach`` (default: every default layer).
        size: examples per subset: the training batch size the drift compares (default: half the probe).
        splits, metric, agg, normalize: as in :func:`null_distribution`.

    Added to a tracker with :meth:`covshift.Tracker.add`, it numbers its steps as the
    tracker does (resumes included) and stores its rows in the tracker's run.
    """

    table = "null_floor"

    def __init__(
        self,
        model: nn.Module,
        probe: torch.Tensor | tuple,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 100,
        directory: str | Path | None = None,
        layers: Any = None,
        size: int | None = None,
        splits: int = DEFAULT_SPLITS,
        metric: str | Sequence[str] = "all",
        agg: str = "mean",
        normalize: bool = True,
    ) -> None:
        check_int("every", every)
        check_int("splits", splits)
        super().__init__(model, optimizer, directory)
        self.every, self.splits, self.size = every, splits, size
        self.probe = probe if isinstance(probe, tuple) else (probe,)
        self.layers = select_layers(model, layers)
        self.metric, self.agg, self.normalize = tuple(m.name for m in resolve(metric)), agg, normalize
        self.rows: list[dict[str, Any]] = []
        self._handles = [optimizer.register_step_pre_hook(self._note_step),
                         optimizer.register_step_post_hook(self._after_step)] if optimizer is not None else []
        self._failed = False

    def measure(self, step: int) -> pd.DataFrame:
        """Record the null of each layer at ``step`` and return the new rows.

        Each of ``splits`` random pairs of disjoint subsets of the probe (``size`` examples each) is
        forwarded **subset by subset**, as training batches are: a normalization layer (BatchNorm)
        then normalizes each with its own statistics, as it does a training batch, and the null is
        that of two training batches. Buffers and RNG are put back after each forward.
        """
        batch = self.probe[0].shape[0]
        size = batch // 2 if self.size is None else self.size
        check_int("size", size)
        if 2 * size > batch:
            raise ValueError(f"size={size} needs a probe of at least {2 * size} examples, got {batch}")
        generator = torch.Generator().manual_seed(step)
        dims: dict[str, int | None] = {}
        pairs = []
        for _ in range(self.splits):
            order = torch.randperm(batch, generator=generator)
            pairs.append(tuple(self._layer_inputs(order[part], dims)
                               for part in (slice(0, size), slice(size, 2 * size))))
        null = null_of_pairs(pairs, dims, resolve(list(self.metric)), self.normalize, self.agg, DEFAULT_SAMPLE_SIZE)
        quantiles = null_quantiles(null)
        quantiles.insert(0, "step", step)
        quantiles["size"] = size
        rows = [_plain(row) for row in quantiles.to_dict("records")]
        self.rows.extend(rows)
        self._store(rows)
        return quantiles

    def _layer_inputs(self, rows: torch.Tensor, dims: dict[str, int | None]) -> dict[str, torch.Tensor]:
        """Each selected layer's input when the model runs on the probe's ``rows`` alone (state put back)."""
        inputs: dict[str, torch.Tensor] = {}

        def hook_for(name: str, module: nn.Module):
            def hook(mod: nn.Module, args: tuple) -> None:
                x = context.first_tensor(args, {})
                if x is not None and name not in inputs and x.is_floating_point():
                    inputs[name] = x.detach().cpu()
                    dims[name] = channel_axis(module, x.shape)
            return hook

        handles = [module.register_forward_pre_hook(hook_for(name, module)) for name, module in self.layers.items()]
        owner = context.probe_owner()
        context.set_probe_owner(self)
        try:
            with preserved(self.model):
                self.model(*(part[rows] for part in self.probe))
        finally:
            context.set_probe_owner(owner)
            for handle in handles:
                handle.remove()
        return inputs

    def frame(self) -> pd.DataFrame:
        """Every recorded row: ``step, layer, metric, null_mean, null_q50, null_q95, splits, size``."""
        return pd.DataFrame(self.rows)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> NullFloor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        step = self._count_step()
        if self._failed or step % self.every:
            return
        try:
            self.measure(step)
        except Exception as err:  # noqa: BLE001 - never raise into the user's step
            self._failed = True
            self._warn("failed", f"the null noise floor failed at step {step} and is off (training is unaffected): "
                                 f"{type(err).__name__}: {err}")


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def load_null_floor(directory: str | Path) -> pd.DataFrame:
    """The null floor rows a run directory holds (see :class:`NullFloor`); a cut last line is dropped."""
    path = Path(directory) / NULL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: record one with covshift.noise.NullFloor(..., directory=...)")
    return pd.DataFrame(read_jsonl(path, ValueError))


def drift_to_null(
    run: Any,
    null: pd.DataFrame,
    metric: str | Sequence[str] = "wasserstein",
    reference: str | int = "initial",
    normalize: bool = True,
    agg: str = "mean",
    source: str = "train",
) -> pd.DataFrame:
    """Layer drift beside the null distribution at the nearest null step.

    Adds ``null_mean, null_q50, null_q95``, ``ratio = value / null_mean`` (≈ 1 for pure
    sampling noise), ``ratio_q95 = value / null_q95`` and ``exceeds = value > null_q95``
    (true at about 5% of steps for pure noise). ``null`` is a :class:`NullFloor` frame or
    :func:`load_null_floor`; its metric, agg and normalize must match these.
    """
    layer_drift = drift(run, metric, reference, normalize, "layer", agg, source)
    floor = null[["step", "layer", "metric", *NULL_COLUMNS]].rename(columns={"step": "null_step"})
    joined = beside_floor(layer_drift, floor, "null_step")
    with np.errstate(divide="ignore", invalid="ignore"):
        joined["ratio"] = joined["value"] / joined["null_mean"]
        joined["ratio_q95"] = joined["value"] / joined["null_q95"]
    joined["exceeds"] = joined["value"] > joined["null_q95"]
    return joined
