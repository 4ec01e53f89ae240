"""Probe batches: a fixed input run in two halves, leaving the model exactly as it was."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from covshift.record import context
from covshift.schedule import Schedule

#: Sources of the two halves of a probe, in the order they run.
HALVES = ("probe_a", "probe_b")
#: The probe owner while a probe is tried: every tracker's hooks ignore the trial.
_TRIAL = object()


@dataclass(frozen=True)
class Probe:
    """What to run at a probe step: the model on halves of fixed arguments, or a function of the half."""

    args: tuple
    kwargs: dict
    fn: Callable[[int], Any] | None
    schedule: Schedule

    def run_halves(self, model: nn.Module) -> Iterator[str]:
        """Run each half in turn, yielding its source name just before it runs."""
        if self.fn is not None:
            for part, source in enumerate(HALVES):
                yield source
                self.fn(part)
            return
        size = _batch_sizes((self.args, self.kwargs)).pop()
        for source, part in zip(HALVES, (slice(0, size // 2), slice(size // 2, size))):
            yield source
            model(*_take(self.args, part), **_take(self.kwargs, part))

    def try_on(self, model: nn.Module) -> None:
        """Run both halves once, recording nothing and leaving the model as it was, so that a probe
        the model cannot take is refused when it is given, not when a step runs it.

        Raises:
            ValueError: the model's forward (or the probe function) raised; the error is chained.
        """
        owner = context.probe_owner()
        context.set_probe_owner(_TRIAL)  # every tracker's hooks ignore a trial
        try:
            with preserved(model):
                for _ in self.run_halves(model):
                    pass
        except Exception as err:
            raise ValueError(
                f"probe: the model's forward on the probe batch raised {type(err).__name__}: {err}; give the "
                "arguments the model's forward takes (or probe(fn), a function of the half that runs it)"
            ) from err
        finally:
            context.set_probe_owner(owner)


def make_probe(args: tuple, kwargs: dict, schedule: Schedule) -> Probe:
    """Check and hold a probe's inputs: tensors are detached, and batched ones agree on dim 0.

    A single callable argument is a probe function: it is called as ``fn(0)`` and
    ``fn(1)`` and runs the model's forward on that half of its fixed batch itself.
    """
    if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], torch.Tensor):
        return Probe((), {}, args[0], schedule)
    args, kwargs = _detached(args), _detached(kwargs)
    sizes = _batch_sizes((args, kwargs))
    if not sizes:
        raise ValueError(
            "probe batch must contain a tensor with a batch dimension (dim 0); for a model whose "
            "forward needs more than its inputs (e.g. detection targets), pass a function: probe(fn)"
        )
    if len(sizes) > 1:
        raise ValueError(f"probe tensors disagree on the batch size (dim 0): {sorted(sizes)}")
    if min(sizes) < 2:
        raise ValueError("probe batch needs at least 2 examples: it is split in halves for the noise floor")
    return Probe(args, kwargs, None, schedule)


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` and the random number generators back as they were."""
    saved_buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, value in saved_buffers:
                buffer.copy_(value)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return _rebuilt(value, [_detached(item) for item in value])
    if isinstance(value, dict):
        return {key: _detached(item) for key, item in value.items()}
    return value


def _batch_sizes(value: Any) -> set[int]:
    """Sizes of dim 0 of every batched tensor in nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return {value.shape[0]} if value.ndim > 0 else set()
    if isinstance(value, (tuple, list)):
        return set().union(*(_batch_sizes(item) for item in value))
    if isinstance(value, dict):
        return set().union(*(_batch_sizes(item) for item in value.values()))
    return set()


def _take(value: Any, part: slice) -> Any:
    """``value`` with every batched tensor in it cut to ``part`` along dim 0."""
    if isinstance(value, torch.Tensor):
        return value[part] if value.ndim > 0 else value
    if isinstance(value, (tuple, list)):
        return _rebuilt(value, [_take(item, part) for item in value])
    if isinstance(value, dict):
        return {key: _take(item, part) for key, item in value.items()}
    return value


def _rebuilt(sequence: tuple | list, items: list) -> tuple | list:
    """A sequence of ``sequence``'s type (named tuples included) holding ``items``."""
    if isinstance(sequence, tuple) and hasattr(sequence, "_fields"):
        return type(sequence)(*items)
    return type(sequence)(items)
