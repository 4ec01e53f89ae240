"""Where a hook is called from: this thread's forward, a probe, a compiler, a transform, a backward pass."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch._subclasses.fake_tensor import is_fake

from covshift.summary.summarize import Partial

#: ``torch.compiler.is_compiling`` where this torch has it: a hook being traced
#: relays its tensor to its eager code at run time (:mod:`covshift.record.compiled`).
is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
#: ``torch.compiler.is_exporting``: ``torch.export`` gets a graph without covshift in it.
is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


class Forward(threading.local):
    """What the current thread's forward is recording: per thread, so concurrent forwards never mix."""

    def __init__(self) -> None:
        self.active = False  # layer hooks record now
        self.step = -1  # the step this forward records into
        self.source = "train"
        self.partials: dict[tuple[str, str], list[Partial]] = defaultdict(list)
        self.depth = 0  # calls of the model or its watched children open in this thread
        self.inputs: dict[str, weakref.ref] = {}  # this forward's inputs of layers that contain others

    def take(self) -> dict[tuple[str, str], list[Partial]]:
        """This forward's partials, leaving none behind; recording stops."""
        partials, self.partials = self.partials, defaultdict(list)
        self.active = False
        self.inputs = {}
        return partials


class _ProbeOwner(threading.local):
    owner: object | None = None  # a class default: reading it never raises, so it costs little in every hook


_probe = _ProbeOwner()


def probe_owner() -> object | None:
    """The tracker whose probe forward runs in this thread, if any: every other tracker ignores it."""
    return _probe.owner


def set_probe_owner(tracker: object | None) -> None:
    _probe.owner = tracker


def in_backward() -> bool:
    """Whether autograd is running a backward pass here: a forward now is a recomputation
    (activation checkpointing), not new data."""
    return torch._C._current_graph_task_id() != -1


_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def is_transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is wrapped by a torch.func transform (its values are not plain memory)."""
    return _is_functorch_wrapped is not None and _is_functorch_wrapped(x)


def holds_no_values(x: torch.Tensor) -> bool:
    """Whether ``x`` has no data to summarize: a tensor on the meta device (shape inference) or a fake
    tensor (tracing, ``FakeTensorMode``)."""
    return x.is_meta or (type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter and is_fake(x))


#: What covshift says, once, when a forward's tensors hold no values.
NO_VALUES = ("a forward on tensors that hold no values (on the meta device, or fake tensors as in shape "
             "inference or tracing) is not recorded and counts no step; real forwards are recorded as before")


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor among the arguments, looking one level into tuples and lists."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item
    return None


def unwrap_compiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped, so layer names carry no ``_orig_mod.`` prefix."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, torch.nn.Module) else model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside a framework's wrapper (Lightning's LightningOptimizer,
    accelerate's AcceleratedOptimizer): its ``step()`` runs only on real updates."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class Autocast(NamedTuple):
    """The ``torch.autocast`` state of one device type, as a forward saw it."""

    device_type: str
    enabled: bool
    dtype: torch.dtype


def autocast_state(args: tuple, model: torch.nn.Module) -> Autocast:
    """The autocast state, now, of the device type of the forward's first tensor argument (else of
    the model's first parameter, else the CPU)."""
    x = first_tensor(args, {})
    if x is None:
        x = next(model.parameters(), None)
    return autocast_now(x.device.type if x is not None else "cpu")


def autocast_now(device_type: str) -> Autocast:
    """The autocast state of ``device_type`` now."""
    if _new_autocast_api:
        return Autocast(device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    if device_type == "cpu":  # torch < 2.4
        return Autocast("cpu", torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype())
    return Autocast(device_type, torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype())


_new_autocast_api = hasattr(torch, "get_autocast_dtype")


@contextlib.contextmanager
def autocast_as(state: Autocast | None) -> Iterator[None]:
    """Run under the autocast state a training forward had (None: as things are)."""
    if state is None or autocast_now(state.device_type) == state:
        yield
        return
    with torch.autocast(state.device_type, dtype=state.dtype, enabled=state.enabled):
        yield


def describe(value: Any) -> str:
    """A short description of a hook argument for warnings."""
    return "no tensor" if value is None else f"a {value.dtype} tensor"
