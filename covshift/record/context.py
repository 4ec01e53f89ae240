"""Where a hook is called from: this thread's forward, a probe, a compiler, a transform, a backward pass."""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from covshift.summary.summarize import Partial

#: ``torch.compiler.is_compiling`` where this torch has it. Inside code that
#: torch.compile traces, every hook returns at once: the check is a constant to
#: the compiler, so covshift adds no graph break and no recompilation.
is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


class Forward(threading.local):
    """What the current thread's forward is recording: per thread, so concurrent forwards never mix."""

    def __init__(self) -> None:
        self.active = False  # layer hooks record now
        self.step = -1  # the step this forward records into
        self.source = "train"
        self.partials: dict[tuple[str, str], list[Partial]] = defaultdict(list)

    def take(self) -> dict[tuple[str, str], list[Partial]]:
        """This forward's partials, leaving none behind; recording stops."""
        partials, self.partials = self.partials, defaultdict(list)
        self.active = False
        return partials


_probe = threading.local()


def probe_owner() -> object | None:
    """The tracker whose probe forward runs in this thread, if any: every other tracker ignores it."""
    return getattr(_probe, "owner", None)


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


def describe(value: Any) -> str:
    """A short description of a hook argument for warnings."""
    return "no tensor" if value is None else f"a {value.dtype} tensor"
