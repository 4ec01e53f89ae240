"""Watching a run while it trains: alerts when a layer's input distribution moves more than it should.

At each recorded step, :class:`AlertMonitor` reads the step's finalized records
(no second pass over any activation) and checks every layer for four kinds of
trouble:

- ``"drift"``: the step-to-step W1 drift (÷ the previous step's σ, mean over the
  sketched channels) exceeds ``factor`` times the layer's **floor**: the drift
  between the probe's two halves at the newest probe step when the run has a probe,
  else the median step-to-step drift of the layer's own first ``warmup`` recorded
  steps (a floor calibrated on the run itself, not on pure sampling noise);
- ``"scale"``: the layer's σ (mean over channels) or its largest |value| grew
  ``scale_factor`` times above its median over the warm-up steps;
- ``"dead"``: at least ``dead_fraction`` of the layer's channels are dead (zero on
  99% of their values, as after a ReLU that never fires) or constant, where fewer were
  at the layer's first recorded step (no warm-up: units die early at a high rate);
- ``"nonfinite"``: NaN or ±Inf reached the layer's input (no warm-up for this one).

Each (layer, kind) alerts once per **episode**: the episode ends after
``cooldown`` recorded steps without the condition, so a run in trouble gives a
handful of alerts, not thousands. The thresholds' defaults come from
``benchmarks/early_warning.py`` (docs/results.md, "Early warning").
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from covshift.columns import STAT_NAMES
from covshift.faults import CovshiftWarning

ALERT_KINDS = ("drift", "scale", "dead", "nonfinite")
DEFAULT_FACTOR = 8.0
DEFAULT_SCALE_FACTOR = 10.0
DEFAULT_DEAD_FRACTION = 0.5
DEFAULT_WARMUP = 10
DEFAULT_COOLDOWN = 5
_COLUMN = {name: i for i, name in enumerate(STAT_NAMES)}


@dataclass(frozen=True)
class Alert:
    """One alert: at ``step``, ``layer``'s ``metric`` reached ``value``, ``ratio`` times its ``floor``."""

    step: int
    layer: str
    kind: str  # one of ALERT_KINDS
    metric: str
    value: float
    floor: float
    ratio: float

    def __str__(self) -> str:
        return (f"step {self.step}, layer {self.layer!r}: {self.kind} — {self.metric} {self.value:.4g}, "
                f"{self.ratio:.3g}× its floor {self.floor:.4g}")

    def as_row(self) -> dict:
        return asdict(self)


class AlertError(RuntimeError):
    """Raised into training by ``on_alert="raise"``: a recorded step crossed an alert threshold."""

    def __init__(self, alert: Alert) -> None:
        super().__init__(f"covshift alert: {alert}")
        self.alert = alert


@dataclass
class _Layer:
    """What the monitor remembers of one layer between recorded steps."""

    seen: int = 0
    previous: tuple[np.ndarray, np.ndarray] | None = None  # the last step's (σ per channel, bin means)
    drifts: list[float] = field(default_factory=list)  # step-to-step drift during the warm-up
    scales: list[float] = field(default_factory=list)  # σ during the warm-up
    peaks: list[float] = field(default_factory=list)  # max |x| during the warm-up
    dead: list[float] = field(default_factory=list)  # fraction of dead channels during the warm-up
    probe_floor: float | None = None


class AlertMonitor:
    """Checks each recorded step's records and hands every new alert to ``on_alert``.

    Args:
        on_alert: a function of an :class:`Alert`, ``"warn"`` (one :class:`~covshift.faults.CovshiftWarning`
            per episode) or ``"raise"`` (an :class:`AlertError` into training).
        factor: drift alerts at this many times the floor.
        scale_factor: scale alerts at this many times the warm-up's σ or max |x|.
        dead_fraction: dead alerts when at least this fraction of a layer's channels is dead.
        warmup: recorded steps per layer that set its baselines (no drift or scale alert before).
        cooldown: recorded steps without the condition that end an episode.
    """

    def __init__(
        self,
        on_alert: Callable[[Alert], object] | str,
        *,
        factor: float = DEFAULT_FACTOR,
        scale_factor: float = DEFAULT_SCALE_FACTOR,
        dead_fraction: float = DEFAULT_DEAD_FRACTION,
        warmup: int = DEFAULT_WARMUP,
        cooldown: int = DEFAULT_COOLDOWN,
    ) -> None:
        if not (callable(on_alert) or on_alert in ("warn", "raise")):
            raise ValueError(f"on_alert must be a function of a covshift.Alert, 'warn' or 'raise', got {on_alert!r}")
        for name, value in (("factor", factor), ("scale_factor", scale_factor)):
            if not (isinstance(value, (int, float)) and value > 1):
                raise ValueError(f"{name} must be a number above 1, got {value!r}")
        if not 0 < dead_fraction <= 1:
            raise ValueError(f"dead_fraction must be in (0, 1], got {dead_fraction!r}")
        for name, value in (("warmup", warmup), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int of at least 1, got {value!r}")
        self.on_alert = on_alert
        self.factor, self.scale_factor, self.dead_fraction = float(factor), float(scale_factor), dead_fraction
        self.warmup, self.cooldown = warmup, cooldown
        self._layers: dict[str, _Layer] = {}
        #: What the newest step measured, per layer: ``drift`` (W1 step to step), ``scale`` (σ), ``max_abs``,
        #: ``dead`` (fraction of dead channels), ``nonfinite`` (count); read by the live log.
        self.values: dict[str, dict[str, float]] = {}
        self._quiet: dict[tuple[str, str], int] = {}  # open episodes: (layer, kind) -> recorded steps without it

    def observe(self, keys: list[tuple[int, str, str, int]], stats: torch.Tensor, binmeans: torch.Tensor,
                sketched: torch.Tensor | None) -> list[Alert]:
        """The new alerts of one finalized step (its record's ``keys``, ``stats``, ``binmeans``, ``sketched``)."""
        self.values = {}
        stats_np = stats.detach().cpu().numpy()
        bins_np = binmeans.detach().cpu().numpy()
        mask = np.ones(len(stats_np), bool) if sketched is None else sketched.detach().cpu().numpy()
        sketch_row = np.cumsum(mask) - 1
        rows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None, np.ndarray]] = {}
        start = 0
        for _, source, layer, channels in keys:
            part = slice(start, start + channels)
            kept = mask[part]
            rows[(source, layer)] = (stats_np[part], bins_np[sketch_row[part][kept]] if kept.any() else None, kept)
            start += channels
        step = keys[0][0]
        for (source, layer), (layer_stats, layer_bins, kept) in rows.items():
            if source == "probe_a" and ("probe_b", layer) in rows:
                other_stats, other_bins, other_kept = rows[("probe_b", layer)]
                self._state(layer).probe_floor = _w1(layer_bins, kept, other_bins, other_kept, other_stats)
        found = []
        for (source, layer), (layer_stats, layer_bins, kept) in rows.items():
            if source == "train" and not layer.endswith(":output"):
                found += self._check(step, layer, layer_stats, layer_bins, kept)
        return found

    def _state(self, layer: str) -> _Layer:
        return self._layers.setdefault(layer, _Layer())

    def _check(self, step: int, layer: str, stats: np.ndarray, bins: np.ndarray | None, kept: np.ndarray) -> list[Alert]:
        state = self._state(layer)
        with np.errstate(invalid="ignore"):
            sd = np.sqrt(np.maximum(stats[:, _COLUMN["var"]], 0.0))
        scale = _finite_mean(sd)
        extremes = np.abs(stats[:, [_COLUMN["min"], _COLUMN["max"]]])
        extremes = extremes[np.isfinite(extremes)]
        peak = float(extremes.max()) if len(extremes) else math.nan
        dead = float(np.mean((stats[:, _COLUMN["zero_frac"]] >= 0.99) | (stats[:, _COLUMN["var"]] <= 0)))
        nonfinite = float(stats[:, _COLUMN["nonfinite"]].sum())
        drift = math.nan
        if state.previous is not None and bins is not None:
            previous_sd, previous_bins = state.previous
            drift = _w1(bins, kept, previous_bins, np.ones(len(previous_bins), bool), None, previous_sd)
        state.previous = (sd[kept], bins) if bins is not None else None
        self.values[layer] = {"drift": drift, "scale": scale, "max_abs": peak, "dead": dead, "nonfinite": nonfinite}
        conditions: dict[str, tuple[str, float, float] | None] = {
            "nonfinite": ("non-finite values", nonfinite, 0.0) if nonfinite > 0 else None}
        at_first = state.dead[0] if state.dead else dead  # units die early at a high rate: no warm-up for this one
        conditions["dead"] = ("dead channel fraction", dead, at_first) \
            if dead >= self.dead_fraction and at_first < self.dead_fraction else None
        if state.seen < self.warmup:
            state.seen += 1
            if math.isfinite(drift):
                state.drifts.append(drift)
            state.scales.append(scale)
            state.peaks.append(peak)
            state.dead.append(dead)
        else:
            floor = state.probe_floor if state.probe_floor else _median(state.drifts)
            conditions["drift"] = ("W1 step to step", drift, floor) \
                if floor and math.isfinite(drift) and drift > self.factor * floor else None
            base_scale, base_peak = _median(state.scales), _median(state.peaks)
            if base_scale and scale > self.scale_factor * base_scale:
                conditions["scale"] = ("σ", scale, base_scale)
            elif base_peak and peak > self.scale_factor * base_peak:
                conditions["scale"] = ("max |x|", peak, base_peak)
            else:
                conditions["scale"] = None
        return [alert for kind, found in conditions.items() if (alert := self._episode(step, layer, kind, found))]

    def _episode(self, step: int, layer: str, kind: str, found: tuple[str, float, float] | None) -> Alert | None:
        """An alert when ``found`` opens an episode of (layer, kind); None while one is open or nothing is found."""
        key = (layer, kind)
        if found is None:
            if key in self._quiet:
                self._quiet[key] += 1
                if self._quiet[key] >= self.cooldown:
                    del self._quiet[key]
            return None
        opened = key not in self._quiet
        self._quiet[key] = 0
        if not opened:
            return None
        metric, value, floor = found
        ratio = value / floor if floor else math.inf
        return Alert(int(step), layer, kind, metric, float(value), float(floor), float(ratio))

    def deliver(self, alert: Alert) -> None:
        """Hand ``alert`` to the user: their function, one warning, or an :class:`AlertError`."""
        if self.on_alert == "raise":
            raise AlertError(alert)
        if self.on_alert == "warn":
            warnings.warn(f"covshift alert: {alert}", CovshiftWarning, stacklevel=5)
        else:
            self.on_alert(alert)


def _w1(bins: np.ndarray | None, kept: np.ndarray, ref_bins: np.ndarray | None, ref_kept: np.ndarray,
        ref_stats: np.ndarray | None, ref_sd: np.ndarray | None = None) -> float:
    """Mean over channels of W1 ÷ the reference's σ, from equal-mass bin means (NaN when not comparable)."""
    if bins is None or ref_bins is None or len(bins) != len(ref_bins):
        return math.nan
    if ref_sd is None:
        ref_sd = np.sqrt(np.maximum(ref_stats[ref_kept, _COLUMN["var"]], 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        w1 = np.abs(bins - ref_bins).mean(axis=1) / ref_sd
    w1 = w1[np.isfinite(w1)]
    return float(w1.mean()) if len(w1) else math.nan


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.nan


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else 0.0
