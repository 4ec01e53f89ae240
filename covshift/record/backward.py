"""The backward half: ∂loss/∂(layer input) of the recorded training forwards, summarized like the inputs.

At a recorded training forward the tracker hands each layer's input to
:meth:`InputGradients.watch`, which registers a tensor hook on it: when autograd
computes the gradient of the loss with respect to that input, the hook summarizes
it per channel (the same channel axis as the input) and hands the summary back to
the tracker as a record of source ``"grad"`` for the step of that forward. Nothing
runs at unrecorded steps (in compiled backward passes, a relay that returns after a
lookup), and nothing is synchronized with the device.

Activation checkpointing: a non-reentrant checkpoint keeps the original input in
the graph, so its hook fires; a reentrant one runs the original forward without
grad and recomputes it during backward, so the gradient is taken from the
recomputed input instead (once: :meth:`watch_recomputed`). Inputs that never
require grad (the data itself, inputs of frozen layers, ``no_grad`` forwards)
have no gradient; :meth:`without_gradient` names those layers.

Inside ``torch.compile`` the input a hook sees carries no autograd graph: the
compiled graph hooks the input itself and relays its gradient
(:func:`covshift.record.compiled.traced_with_gradient`) to :meth:`arrived`, for the
step then open (per-forward steps: the step of the one forward of the layer that
awaits its gradient, :meth:`awaited_forward`); :meth:`expect` says which layers
that step recorded.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch

from covshift.faults import Faults
from covshift.summary.summarize import Partial

#: The source of input-gradient records in a run.
GRAD_SOURCE = "grad"
_MISSING = object()

Summarize = Callable[[torch.Tensor, "int | None"], "Partial | None"]
Deliver = Callable[[int, str, Partial], None]


class InputGradients:
    """Hooks on the inputs of recorded training forwards whose gradients become ``"grad"`` records.

    Args:
        summarize: ``summarize(tensor, channel_dim)``, the tracker's summarizer.
        deliver: ``deliver(step, layer, partial)``, called from the backward pass with each summary.
        faults: the tracker's faults: a failing summary warns once and skips the layer.
    """

    def __init__(self, summarize: Summarize, deliver: Deliver, faults: Faults) -> None:
        self._summarize = summarize
        self._deliver = deliver
        self._faults = faults
        self._awaiting: Counter[tuple[int, str]] = Counter()  # forwards run without grad, to recompute with it
        self._hooked: set[str] = set()
        self._ungraded: set[str] = set()
        self._expected: dict[tuple[int, str], int | None] = {}  # compiled (step, layer): channel axis
        self._forwards: dict[str, list[int]] = {}  # compiled, per-forward steps: forwards awaiting a gradient
        self._lock = threading.Lock()  # forwards and backward passes may run in several threads

    def watch(self, step: int, layer: str, x: torch.Tensor, channel_dim: int | None) -> None:
        """At a recorded training forward: summarize ``x``'s gradient when the backward pass computes it."""
        if x.requires_grad:
            self._hook(step, layer, x, channel_dim)
        else:  # the data, a frozen input, no_grad, or the first pass of a reentrant checkpoint
            self._awaiting[(step, layer)] += 1
            self._ungraded.add(layer)

    def expect(self, step: int, layer: str, channel_dim: int | None) -> None:
        """At a recorded compiled forward whose input's gradient will be relayed: take it when it arrives."""
        with self._lock:
            self._hooked.add(layer)
            self._expected[(step, layer)] = channel_dim

    def ungraded(self, layer: str) -> None:
        """At a recorded compiled forward: ``layer``'s input will have no gradient."""
        self._ungraded.add(layer)

    def forwarded(self, step: int, layer: str) -> None:
        """Per-forward steps: a compiled forward of ``step`` ran ``layer``, whose input's gradient will come."""
        with self._lock:
            steps = self._forwards.setdefault(layer, [])
            if len(steps) >= 64:  # forwards without backward: their steps are only ever "several"
                del steps[:-1]
            steps.append(step)

    def awaited_forward(self, layer: str) -> int | None:
        """Per-forward steps: the step of the one compiled forward of ``layer`` that awaits its gradient. None
        where none does, or several do (which gradient is whose cannot be told: they are not recorded, once
        said, and the waiting starts afresh)."""
        with self._lock:
            steps = self._forwards.get(layer, [])
            several = len(set(steps)) > 1
            if several:
                del self._forwards[layer]
            step = steps.pop() if steps and not several else None  # a layer called twice: one per call
        if several:
            self._faults.warn_once("gradients-unmatched", (
                f"the input gradients of layer {layer!r} arrived while compiled forwards of several steps awaited "
                "theirs (several forwards before one backward, or a forward without backward): which is whose "
                "cannot be told inside torch.compile, so these are not recorded"))
        return step

    def arrived(self, step: int, layer: str, grad: torch.Tensor) -> None:
        """From a compiled backward: ``layer``'s input gradient during ``step``, kept if that step recorded it."""
        with self._lock:
            channel_dim = self._expected.get((step, layer), _MISSING)
        if channel_dim is not _MISSING:
            self._take(step, layer, channel_dim, grad)

    @property
    def awaiting(self) -> bool:
        """Whether a forward ran without grad that a recomputation (reentrant checkpoint) may stand for."""
        return bool(self._awaiting)

    def watch_recomputed(self, step: int, layer: str, x: torch.Tensor, channel_dim: int | None) -> None:
        """During backward: a recomputation of a forward that ran without grad takes its place, once."""
        key = (step, layer)
        if self._awaiting[key] > 0 and x.requires_grad:
            self._awaiting[key] -= 1
            if not self._awaiting[key]:
                del self._awaiting[key]
            self._hook(step, layer, x, channel_dim)

    def forget_before(self, step: int) -> None:
        """Drop what waits for recomputation, and the compiled gradients expected, in steps before ``step``
        (their backward is over)."""
        for key in [key for key in self._awaiting if key[0] < step]:
            del self._awaiting[key]
        with self._lock:
            for key in [key for key in self._expected if key[0] < step]:
                del self._expected[key]

    def without_gradient(self) -> list[str]:
        """Layers whose input never had a gradient to record."""
        return sorted(self._ungraded - self._hooked)

    def _hook(self, step: int, layer: str, x: torch.Tensor, channel_dim: int | None) -> None:
        self._hooked.add(layer)

        x.register_hook(lambda grad: self._take(step, layer, channel_dim, grad))

    def _take(self, step: int, layer: str, channel_dim: int | None, grad: torch.Tensor) -> None:
        if layer in self._faults.skipped or self._faults.stopped:
            return
        try:
            partial = self._summarize(grad.detach(), channel_dim)
            if partial is not None:
                self._deliver(step, layer, partial)
        except Exception as err:  # noqa: BLE001 - a fault of covshift's must not reach the user's backward
            self._faults.skip(layer, f"the input gradient of layer {layer!r} could not be summarized: {err}")
