"""The settings of a :class:`~covshift.record.tracker.Tracker`: every keyword of :func:`covshift.attach`, declared once."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch

from covshift import schedule
from covshift.record.alerts import AlertMonitor
from covshift.record.layers import ChannelDim
from covshift.store.writer import DEFAULT_FLUSH_EVERY, DEFAULT_MEMORY_BUDGET, DEFAULT_SKETCH_CHANNELS
from covshift.summary.summarize import DEFAULT_SAMPLE_SIZE

#: Record on a log-spaced schedule by default (:mod:`covshift.schedule`): every step
#: at first, then 40 per decade, so drift curves get their points where drift is
#: fastest and a long run's store grows with the logarithm of its length.
DEFAULT_EVERY = "log"


@dataclass(frozen=True)
class Settings:
    """How a :class:`Tracker` records: every keyword argument of :func:`attach`, declared once here
    with its default (documented in :func:`attach`)."""

    every: int | str | schedule.Schedule = DEFAULT_EVERY
    sample_size: int = DEFAULT_SAMPLE_SIZE
    sketch_channels: int | None = DEFAULT_SKETCH_CHANNELS
    store: str | Path | None = None
    resume: bool = False
    step: Literal["auto", "manual"] = "auto"
    optimizer: torch.optim.Optimizer | None = None
    outputs: bool = False
    channel_dim: ChannelDim | dict[str, ChannelDim] = "auto"
    flush_every: int = DEFAULT_FLUSH_EVERY
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    name: str | None = None
    group: Any = None
    gradients: bool = False
    on_alert: Callable[[Any], object] | str | AlertMonitor | None = None
    tensorboard: str | Path | None = None

    @classmethod
    def of(cls, caller: str, options: dict[str, Any]) -> Settings:
        """``Settings(**options)``, with an unknown name refused as ``caller`` would refuse it."""
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in known]
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}; "
                            f"it takes model, layers and {', '.join(known)}")
        return cls(**options)


def signature(returns: str) -> inspect.Signature:
    """``(model, layers=None, *, <every Settings field>)``: what :func:`attach` and :class:`Tracker` show."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Signature(
        [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="nn.Module"),
         inspect.Parameter("layers", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation="LayerSpec"),
         *(inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type) for f in dataclasses.fields(Settings))],
        return_annotation=returns,
    )


