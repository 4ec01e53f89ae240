"""The metric registry: each drift metric declared once, with everything that shows it.

A :class:`Metric` holds its function (of a :class:`Pair` of compared records),
the stored inputs it reads, its label in figures and tables, its line in the
report's glossary and its conventional threshold. :func:`covshift.drift`, the
report, the ``covshift`` command and the TensorBoard export all read metrics
from here, so one :func:`register` call adds a metric to every one of them.

Packages can register metrics for the ``covshift`` command through the entry
point group ``covshift.metrics`` (each entry point a module, or a function of
no argument, that calls :func:`register`); they load on the first look-up.

>>> import numpy as np
>>> from covshift import metrics
>>> spread = metrics.register("spread_gap", lambda pair: np.abs(pair.sd - pair.ref_sd), scaled=True,
...                           label="spread gap", description="|σ − σ_ref|: how much the spread moved.")
>>> "spread_gap" in metrics.names()
True
>>> metrics.unregister("spread_gap")
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points

import numpy as np

from covshift.faults import CovshiftWarning

#: What a metric may read of each compared record: ``moments`` (mean and standard deviation,
#: every channel), ``binmeans`` (the 32 equal-mass bin means) and ``knots`` (min, quantiles, max);
#: the last two exist only for a layer's sketched channels (``attach(sketch_channels=)``).
INPUTS = ("moments", "binmeans", "knots")
ENTRY_POINT_GROUP = "covshift.metrics"


@dataclass
class Pair:
    """Compared records, row by row: a channel at a step (``mean``, ``sd`` …) and its reference (``ref_*``).

    ``binmeans``/``ref_binmeans`` are ``(N, 32)`` and ``knots``/``ref_knots`` ``(N, K)`` at
    ``levels`` ``(K,)`` (0 for the minimum … 1 for the maximum); each is None unless a metric
    of the call reads it. ``shared`` caches work that several metrics of one call share.
    """

    mean: np.ndarray
    sd: np.ndarray
    ref_mean: np.ndarray
    ref_sd: np.ndarray
    binmeans: np.ndarray | None = None
    ref_binmeans: np.ndarray | None = None
    knots: np.ndarray | None = None
    ref_knots: np.ndarray | None = None
    levels: np.ndarray | None = None
    requested: frozenset[str] = frozenset()
    shared: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One drift metric, declared once.

    Attributes:
        name: the name ``drift(metric=...)`` and ``--metric`` take.
        compute: ``compute(pair) -> (N,)`` values, one per compared record (NaN where undefined).
        reads: the inputs it reads, from :data:`INPUTS`.
        label: its short name in figures, tables and the glossary.
        description: its glossary line: what the number means.
        scaled: in the units of the layer input, so divided by the reference's σ when
            ``normalize=True`` (else scale-free).
        threshold: the conventional "drifted" value, or None (docs/metrics.md, "Thresholds").
    """

    name: str
    compute: Callable[[Pair], np.ndarray]
    reads: frozenset[str]
    label: str
    description: str
    scaled: bool = False
    threshold: float | None = None

    @property
    def sketched(self) -> bool:
        """Whether it reads quantiles or bin means, which only a layer's sketched channels keep."""
        return bool(self.reads & {"binmeans", "knots"})

    def axis_label(self, normalized: bool = True) -> str:
        """Its label with its unit, as the report draws it.

        >>> get("wasserstein").axis_label()
        'W1 (× σ_ref)'
        """
        return f"{self.label} (× σ_ref)" if self.scaled and normalized else self.label


_lock = threading.Lock()
_metrics: dict[str, Metric] = {}
_builtin: set[str] = set()
_plugins_loaded = False


def register(
    name: str,
    compute: Callable[[Pair], np.ndarray],
    *,
    reads: Collection[str] = ("moments",),
    label: str | None = None,
    description: str = "",
    scaled: bool = False,
    threshold: float | None = None,
    replace: bool = False,
) -> Metric:
    """Add a drift metric; it then appears in ``drift()``, the report, the command line and ``to_tensorboard``.

    Args:
        name: a new name (letters, digits, ``_``); ``replace=True`` to redefine a metric of yours.
        compute: ``compute(pair)``, a vectorized function of a :class:`Pair`, one value per row.
        reads: which of :data:`INPUTS` it reads (``"moments"`` are always there).
        label: its short name in figures and tables (default: ``name``).
        description: one line for the report's glossary.
        scaled: True if the value is in the input's units (divided by the reference σ when normalized).
        threshold: a conventional "drifted" value, stated in the glossary.

    Returns:
        The registered :class:`Metric`.

    Raises:
        ValueError: a bad name, an unknown input, or a name already taken (without ``replace``).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a metric name must be letters, digits and _, got {name!r}")
    if not callable(compute):
        raise TypeError(f"compute must be a function of a covshift.metrics.Pair, got {type(compute).__name__}")
    reads = frozenset(reads) | {"moments"}
    unknown = sorted(reads - set(INPUTS))
    if unknown:
        raise ValueError(f"reads takes inputs from {INPUTS}, got {unknown}")
    metric = Metric(name, compute, reads, label or name, description, bool(scaled), threshold)
    with _lock:
        if name in _builtin or (name in _metrics and not replace):
            raise ValueError(f"a drift metric named {name!r} is already registered"
                             + ("" if name in _builtin else "; pass replace=True to redefine it"))
        _metrics[name] = metric
    return metric


def declare_builtin(metric: Metric) -> None:
    """Register one of covshift's own metrics (:mod:`covshift.metrics.builtin`), which users cannot replace."""
    with _lock:
        _metrics[metric.name] = metric
        _builtin.add(metric.name)


def unregister(name: str) -> None:
    """Remove a metric added with :func:`register` (covshift's own cannot be removed)."""
    with _lock:
        if name in _builtin:
            raise ValueError(f"{name!r} is one of covshift's own metrics and cannot be removed")
        if name not in _metrics:
            raise ValueError(f"no registered metric is named {name!r}")
        del _metrics[name]


def names() -> tuple[str, ...]:
    """Every metric's name: covshift's own first, in the order ``metric="all"`` returns them."""
    _load_plugins()
    return tuple(_metrics)


def get(name: str) -> Metric:
    """The metric called ``name``.

    Raises:
        ValueError: no metric has that name (the message lists them).
    """
    _load_plugins()
    try:
        return _metrics[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown drift metric {name!r}; the metrics are {names()}") from None


def resolve(metric: str | Sequence[str]) -> tuple[Metric, ...]:
    """The metrics a ``metric=`` argument names: one name, a list of them, or ``"all"``.

    Raises:
        ValueError: an unknown name or an empty list.
    """
    if isinstance(metric, str):
        chosen = names() if metric == "all" else (metric,)
    else:
        chosen = tuple(metric) if isinstance(metric, Sequence) else ()
    unknown = [name for name in chosen if not isinstance(name, str) or name not in names()]
    if unknown or not chosen:
        raise ValueError(f"metric must be 'all' or names from {names()}, got {metric!r}")
    return tuple(get(name) for name in dict.fromkeys(chosen))


def _load_plugins() -> None:
    """Load the ``covshift.metrics`` entry points once; one that fails is skipped with a warning."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = point.load()
            if callable(loaded):
                loaded()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not stop covshift
            warnings.warn(f"the metric plugin {point.name!r} ({point.value}) failed to load and is skipped: "
                          f"{type(err).__name__}: {err}", CovshiftWarning, stacklevel=3)
