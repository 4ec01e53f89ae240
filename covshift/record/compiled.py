"""Recording inside ``torch.compile``: hooks the compiler traces hand their tensor to covshift at run time.

When ``torch.compile`` traces a model, it traces covshift's hooks too. A hook
that is being traced calls :func:`relay`, a custom operator
(``covshift::relay``) that the compiler keeps in the graph as an opaque call. At
run time the operator hands the tensor to the hook's eager code, which decides
there, from the tracker's state, whether the step is recorded, and summarizes
the tensor exactly as in an eager forward (the same statistics, the same
sample). So the compiled graph holds no Python branch on covshift's state: one
graph serves recorded and unrecorded steps, nothing is recompiled, and
``fullgraph=True`` holds (the operator is no graph break).

The operator declares that it writes a one-element token: an operator with no
output would otherwise be removed from the graph as dead code.

Input gradients (``gradients=True``): the tensor a compiled graph hands over
carries no autograd graph, so no hook can be put on it at run time. A traced
hook whose input will have a gradient puts one on it in the graph instead
(:func:`traced_with_gradient`, where this torch's dynamo traces ``register_hook``
on intermediate tensors): it fires on the whole gradient of the tensor, as in
eager, and relays it (``covshift::relay_gradient``) to covshift, which files it
under the step then open if that step recorded the layer's input.

Targets are looked up by an integer key baked into the graph; a detached
tracker's keys lead nowhere, so a graph compiled with covshift attached runs on
unharmed.

Code compiled for a module without hooks runs, by dynamo's default, for any
module of that class, hooks or not (``torch._dynamo.config.skip_nnmodule_hook_guards``):
code compiled before covshift attached, or for a twin of the model that has no
covshift (an EMA copy, a teacher), would run the model without covshift's hooks.
So once torch.compile is in use (:func:`watch_compiler`, at ``attach()`` and at each
step), dynamo is told to check for hooks, and the model's code compiled before
then is dropped: the next forward compiles again, hooks included.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import threading
import types
import warnings
from collections.abc import Callable

import torch

from covshift.faults import CovshiftWarning
from covshift.record import context

Target = Callable[..., None]

_targets: dict[int, Target] = {}
_keys = itertools.count()
_failed: set[int] = set()
_hooks_checked = False  # dynamo was told to check modules' hooks
_lock = threading.Lock()
#: The operator's token: written by nobody, declared written so that the call stays in the graph.
TOKEN = torch.zeros(1)


class _Inside(threading.local):
    # class defaults: reading them never raises
    depth = 0  # relayed calls running in this thread
    gradient_follows = False  # in a relay whose input's gradient will be relayed too


_inside = _Inside()


def add_target(target: Target) -> int:
    """Register ``target`` (a hook's eager code, called with the tensor or the gradient) and return the key a
    traced hook relays to."""
    with _lock:
        key = next(_keys)
        _targets[key] = target
    return key


def remove_targets(keys: list[int]) -> None:
    """Forget these keys: compiled graphs that still call them do nothing."""
    with _lock:
        for key in keys:
            _targets.pop(key, None)


def attached(model: torch.nn.Module) -> None:
    """At ``attach()``: drop ``model``'s forwards compiled without covshift's hooks (and have dynamo check
    hooks from now on, if torch.compile is in use)."""
    watch_compiler(model, attaching=True)


def watch_compiler(model: torch.nn.Module, attaching: bool = False) -> None:
    """At each step: once torch.compile is in use in this process, make dynamo check modules' hooks from
    now on and drop ``model``'s code compiled before (a flag check when done, and while nothing was
    compiled). Never raises: these are dynamo's private parts, and a step must not fail on them."""
    global _hooks_checked
    if "torch._dynamo" not in sys.modules or (_hooks_checked and not attaching):
        return
    try:
        if not _hooks_checked:
            _hooks_checked = True
            torch._dynamo.config.skip_nnmodule_hook_guards = False
        _forget_compiled_forwards(context.unwrap_compiled(model))
    except Exception as err:  # noqa: BLE001 - another torch's dynamo: compiled forwards may go unrecorded
        warnings.warn(f"covshift: could not prepare torch.compile's code for recording ({err!r}); forwards "
                      "compiled before attach() may go unrecorded", CovshiftWarning, stacklevel=3)


def _forget_compiled_forwards(model: torch.nn.Module) -> None:
    """Drop the compiled code of the forwards of ``model`` and its submodules, if any was compiled: it was
    traced without covshift's hooks, and would run on without them."""
    from torch._dynamo import external_utils
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list, remove_from_cache

    codes = {type(module).forward.__code__ for module in model.modules() if hasattr(type(module).forward, "__code__")}
    # torch.compile of a module whose forward is torch's own (nn.Sequential) compiles a wrapper shared by all
    wrap_inline = getattr(external_utils, "wrap_inline", None)
    codes.update(const for const in getattr(getattr(wrap_inline, "__code__", None), "co_consts", ())
                 if isinstance(const, types.CodeType))
    for code in codes:
        if _debug_get_cache_entry_list(code):
            remove_from_cache(code)


def relayed() -> bool:
    """Whether this thread runs a hook's eager code on behalf of a compiled forward."""
    return _inside.depth > 0


def gradient_follows() -> bool:
    """In a relayed hook: whether its tensor's gradient will be relayed too (:func:`traced_with_gradient`)."""
    return _inside.gradient_follows


def _run_target(key: int, *args: object) -> None:
    """The hook's eager code, with the real tensors."""
    target = _targets.get(key)
    if target is None:
        return
    _inside.depth += 1
    try:
        target(*args)
    except Exception as err:  # noqa: BLE001 - the hooks guard their own faults; this is the last line
        if key not in _failed:
            _failed.add(key)
            warnings.warn(f"covshift: a hook inside a compiled forward failed and is skipped: {err!r}",
                          CovshiftWarning, stacklevel=2)
    finally:
        _inside.depth -= 1


#: Whether this torch can record inside compiled code (``torch.library.custom_op``, torch 2.4 and later).
SUPPORTED = hasattr(torch.library, "custom_op")
#: Whether it can relay input gradients of compiled forwards too (dynamo traces hooks on intermediate
#: tensors, and an operator can be declared a side effect).
GRADIENTS_SUPPORTED = False


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def _ordered_effect(op: object) -> bool:
    """Declare ``op`` a side effect that the compiler keeps, in order; whether this torch could."""
    try:
        from torch._library.effects import EffectType

        op.register_effect(EffectType.ORDERED)
    except (ImportError, AttributeError):
        return False
    return True


if SUPPORTED:
    # flexible_layout: inductor hands over its tensor in the layout it has (channels-last, say), where it
    # would otherwise copy it to the eager layout at every call, recorded or not. cudagraph_unsafe: under
    # mode="reduce-overhead" inductor captures the graph's parts between relays as CUDA graphs (its graph
    # partitions) instead of giving up CUDA graphs for a graph that runs Python.
    _tags = tuple(getattr(torch.Tag, tag) for tag in ("flexible_layout", "cudagraph_unsafe") if hasattr(torch.Tag, tag))

    @torch.library.custom_op("covshift::relay", mutates_args=("token",), tags=_tags)
    def _relay(token: torch.Tensor, x: torch.Tensor | None, key: int) -> None:
        _run_target(key, x)

    @_relay.register_fake
    def _relay_fake(token: torch.Tensor, x: torch.Tensor | None, key: int) -> None:
        return None

    @torch.library.custom_op("covshift::relay_before_gradient", mutates_args=("token",), tags=_tags)
    def _relay_before_gradient(token: torch.Tensor, x: torch.Tensor, key: int) -> None:
        _inside.gradient_follows = True
        try:
            _run_target(key, x)
        finally:
            _inside.gradient_follows = False

    @_relay_before_gradient.register_fake
    def _relay_before_gradient_fake(token: torch.Tensor, x: torch.Tensor, key: int) -> None:
        return None

    @torch.library.custom_op("covshift::relay_gradient", mutates_args=(), tags=_tags)
    def _relay_gradient(grad: torch.Tensor, key: int) -> None:
        _run_target(key, grad)

    @_relay_gradient.register_fake
    def _relay_gradient_fake(grad: torch.Tensor, key: int) -> None:
        return None

    # The gradient's relay has no output and mutates nothing: declared a side effect so it stays in the graph
    # (a token it wrote would be saved for backward, and fail autograd's version check at the next forward).
    # Hooks on intermediate tensors are traced by dynamo's register_hook operator where it has one.
    GRADIENTS_SUPPORTED = _has_module("torch._higher_order_ops.register_hook") and _ordered_effect(_relay_gradient)


def gradient_flows(training: bool, x: torch.Tensor | None) -> bool:
    """In a hook being traced: whether ``x``, a layer input in a forward of a model in training mode
    (``training``), will have a gradient that :func:`traced_with_gradient` can relay."""
    return (GRADIENTS_SUPPORTED and training and x is not None and x.requires_grad
            and torch.is_grad_enabled() and not context.is_exporting())


def traced_with_gradient(key: int, gradient_key: int, x: torch.Tensor) -> None:
    """In a hook being traced, for an input that will have a gradient (:func:`gradient_flows`): relay ``x``
    to target ``key`` as :func:`traced` does, and hook ``x`` so that its gradient is relayed to
    ``gradient_key`` when the backward pass computes it."""
    _relay_before_gradient(TOKEN, x, key)

    def on_gradient(grad: torch.Tensor) -> None:
        _relay_gradient(grad, gradient_key)

    x.register_hook(on_gradient)


def traced(key: int, x: torch.Tensor | None = None) -> bool:
    """In a hook: whether it is being traced by torch.compile, in which case it has relayed ``x`` (the
    hook's tensor) to target ``key``, to be called with the real tensor when the graph runs. Nothing is
    relayed into ``torch.export``'s graphs, nor where this torch cannot (:data:`SUPPORTED`)."""
    if not context.is_compiling():
        return False
    if SUPPORTED and not context.is_exporting():
        _relay(TOKEN, x, key)
    return True
