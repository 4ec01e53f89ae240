"""`attach()`: start recording a model, the one call a training loop needs."""

from __future__ import annotations

from typing import Any

from torch import nn

from covshift.record.layers import LayerSpec
from covshift.record.settings import Settings, signature
from covshift.record.tracker import Tracker


def attach(model: nn.Module, layers: LayerSpec = None, **settings: Any) -> Tracker:
    """Start recording the input distributions of ``model``'s layers.

    Args:
        model: any ``torch.nn.Module``; left exactly as found by ``detach()``.
        layers: None for every layer with parameters of its own (parametrized ones
            included) or normalization layer, a block that hands its own input to a
            selected submodule recorded once, under the submodule's name
            (``tracker.duplicates``); else names or glob patterns (``"features.*"``),
            module types, a list of those, or a predicate ``(name, module) -> bool``.
        every: which training steps record: ``"log"`` (default: steps 0–22, then
            40 per decade, 168 records in 100,000 steps; see :mod:`covshift.schedule`),
            an int N (steps 0, N, 2N, …) or a :class:`~covshift.schedule.Schedule`.
        sample_size: values per channel the quantiles come from (exact at or above
            the channel's value count); moments and extrema always use every value.
        sketch_channels: channels per layer that keep quantiles and bin means
            (evenly spaced, first and last included; None: all); moments, extrema
            and the zero fraction are kept for every channel. Wide layers cost
            far less to store and report this way (docs/performance.md).
        store: a new (or empty) directory to stream the run to (crash-safe); None
            keeps it in a temporary directory until ``run.save()``. A directory
            holding anything else is refused.
        resume: go on with the run in ``store`` (training resumed from a
            checkpoint): its model, layers and recording settings must match
            (else ValueError, before any hook is installed); recording continues
            after its last training step, or at the step given to
            ``tracker.set_step()``, and the steps it stored from there on (recorded
            after the checkpoint, before the crash) are replaced with the first
            flush, in the records, the curves and the side tables. A new or empty
            ``store`` starts a run.
        step: ``"auto"`` (each training-mode forward is a step) or ``"manual"``
            (call ``tracker.step()``, e.g. after gradient accumulation).
        optimizer: steps follow this optimizer's ``step()`` (PyTorch's step hooks):
            every training forward between two updates is one record, so
            gradient accumulation and several forwards per update are right.
        outputs: also record each layer's output, as layer ``"<name>:output"``.
        channel_dim: ``"auto"`` (the axis that holds the count a layer declares, else
            the size of its per-channel parameters, else its first submodule's count;
            failing those dim 1 of images and the last dim of sequences, with a warning
            naming the layer: :mod:`covshift.record.channels`), an int, None to
            summarize each layer as a whole, or a dict per layer name.
        flush_every: write to disk at least every this many recorded steps.
        memory_budget: bytes of buffered records (332 per channel per step) that trigger a write.
        name: label for reports (default: the store directory's name).
        gradients: also record each layer's input gradient ∂loss/∂(input) at the recorded
            training steps, summarized per channel like the input, as source ``"grad"``
            (``run.stats(source="grad")``, ``covshift.drift(run, source="grad")``).
        on_alert: watch the run while it trains (:mod:`covshift.record.alerts`): at each recorded step a
            layer whose drift jumps above its floor, whose scale blows up, whose channels die or whose
            input turns non-finite gives one :class:`~covshift.Alert` per episode, stored in the run
            (``run.alerts()``) and handed to this function; ``"warn"`` warns instead, ``"raise"``
            stops training with an :class:`~covshift.record.alerts.AlertError`; an
            :class:`~covshift.record.alerts.AlertMonitor` sets the thresholds too.
        tensorboard: a log directory: at each recorded step, each layer's live measures (W1 drift step
            to step, σ, max |x|, dead channels, non-finite values) and the new alerts are written there
            for TensorBoard while training runs (:mod:`covshift.record.live`; needs tensorboard).
        group: in a ``torch.distributed`` job, the process group whose ranks record
            into one run (None: the default group when one is initialized with more
            than one process; ``False``: each rank records on its own). Rank 0 of
            the group merges every rank's records and writes the run; every rank
            must attach alike and take the same steps (see "Several processes" in
            docs/guide.md).

    Returns:
        The :class:`Tracker`; its ``run`` holds the records.

    Raises:
        ValueError: a layer name or pattern matches nothing (the message lists
            the valid names), or a setting is out of range.
        covshift.distributed.DistributedError: later, from a recorded step's
            ``optimizer.step()`` (or forward), when exchanging records with the
            other ranks fails: a rank died or the ranks are out of step.

    >>> import torch, covshift
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> with covshift.attach(model) as tracker:
    ...     _ = model(torch.randn(8, 4))
    >>> tracker.run.stats()[["step", "layer", "channel", "count"]].tail(2)
       step layer  channel  count
    5     0     2        1      8
    6     0     2        2      8
    """
    return Tracker(model, layers, **Settings.of("attach", settings).__dict__)


attach.__signature__ = signature("Tracker")  # type: ignore[attr-defined]
