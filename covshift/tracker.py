"""`attach()` and `Tracker`: hook a model, count steps, summarize layer inputs, run probes."""

from __future__ import annotations

import contextlib
import platform
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from covshift.checks import check_int
from covshift.faults import CovshiftWarning
from covshift.layers import LayerSpec, channel_axis, select_layers
from covshift.run import DEFAULT_FLUSH_EVERY, DEFAULT_MEMORY_BUDGET, Run
from covshift.summary import (
    DEFAULT_SAMPLE_SIZE,
    N_BINS,
    QUANTILE_LEVELS,
    Partial,
    Summarizer,
    merge,
)

ChannelDim = Literal["auto"] | int | None
DEFAULT_PROBE_EVERY = 10
#: Record one training step in this many by default: drift curves need hundreds of
#: points, not every step, and non-recording steps cost almost nothing.
DEFAULT_EVERY = 10

#: ``torch.compiler.is_compiling`` where this torch has it. Inside code that
#: torch.compile traces, every hook returns at once: the check is a constant to
#: the compiler, so covshift adds no graph break and no recompilation.
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


class _Forward(threading.local):
    """What the current thread's forward is recording: per thread, so concurrent forwards never mix."""

    def __init__(self) -> None:
        self.active = False  # layer hooks record now
        self.step = -1  # the step this forward records into
        self.source = "train"
        self.partials: dict[tuple[str, str], list[Partial]] = defaultdict(list)


#: The tracker whose probe forward runs in this thread, if any: every other
#: tracker on the model ignores that forward entirely.
_probe = threading.local()


def _probe_owner() -> Tracker | None:
    return getattr(_probe, "owner", None)


class Tracker:
    """Records per-channel summaries of selected layers' inputs while a model trains.

    Create it with :func:`attach`. Each training-mode forward of the model is one
    step (or, with ``step="manual"``, everything between two :meth:`step` calls).
    Eval-mode forwards are not recorded. Use :meth:`detach`, or the tracker as a
    context manager, to remove every hook and flush what is buffered.

    A fault inside covshift never reaches the training loop: it is reported once
    as a :class:`~covshift.faults.CovshiftWarning` and covshift steps aside (a
    layer it cannot summarize is skipped; a failing store stops the recording).
    Forwards from several threads at once each record their own step.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = None,
        *,
        every: int = DEFAULT_EVERY,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        store: str | Path | None = None,
        step: Literal["auto", "manual"] = "auto",
        outputs: bool = False,
        channel_dim: ChannelDim | dict[str, ChannelDim] = "auto",
        flush_every: int = DEFAULT_FLUSH_EVERY,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        check_int("every", every)
        if step not in ("auto", "manual"):
            raise ValueError(f"step must be 'auto' or 'manual', got {step!r}")
        self.model = model
        self.layers = select_layers(model, layers)
        _check_channel_dims(channel_dim, self.layers)
        self.every = every
        self.manual = step == "manual"
        self._channel_dims = channel_dim
        self._summarizer = Summarizer(sample_size)
        config = {
            "every": every,
            "sample_size": sample_size,
            "step": step,
            "outputs": outputs,
            "quantile_levels": list(QUANTILE_LEVELS),
            "n_bins": N_BINS,
        }
        self.run = Run(
            store,
            {
                "name": name,
                "model": type(model).__name__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "config": config,
                "versions": _versions(),
            },
            flush_every=flush_every,
            memory_budget=memory_budget,
        )
        self._lock = threading.RLock()  # steps, the open manual step and the run
        self._forward = _Forward()
        self._step = -1  # index of the current (or last) step
        self._open = False  # manual steps: a step has begun and not yet been written
        self._manual_partials: dict[tuple[str, str], list[Partial]] = defaultdict(list)
        self._probe_batch: tuple | None = None
        self._probe_every = DEFAULT_PROBE_EVERY
        self._kinds: dict[str, tuple[str, int | None]] = {}  # record name -> (layer type, channel dim)
        self._described: set[str] = set()
        self._warned: set[str] = set()
        self._skipped: set[str] = set()  # layers that faulted: no longer recorded
        self._stopped = False  # a fault outside any one layer: nothing more is recorded
        self._train_steps: set[int] = set()  # steps with training records
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            self._install(outputs)
        except BaseException:
            self._remove_hooks()
            raise

    # -- public ------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """Index of the current training step (-1 before the first)."""
        return self._step

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def step(self) -> None:
        """End the current step (``step="manual"`` only): its micro-batches form one record."""
        if not self.manual:
            raise RuntimeError("tracker.step() is for attach(..., step='manual'); steps are counted automatically")
        with self._lock:
            self._close_manual_step()
            self._step += 1

    def probe(self, batch: Any, every: int = DEFAULT_PROBE_EVERY) -> Tracker:
        """Summarize a fixed ``batch`` every ``every`` steps, apart from training.

        At the start of each such step the model runs the batch, split in two
        halves along dim 0, under ``no_grad`` in its training mode; records are
        stored as sources ``probe_a``, ``probe_b`` and their union ``probe``. Every
        buffer (BatchNorm running statistics included) and the random number
        generators are put back exactly as they were.

        Args:
            batch: a tensor, or a tuple of positional arguments for the model.
            every: probe once every this many steps.
        """
        check_int("every", every)
        args = batch if isinstance(batch, tuple) else (batch,)
        sizes = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.ndim > 0}
        if not sizes:
            raise ValueError("probe batch must contain a tensor with a batch dimension (dim 0)")
        if len(sizes) > 1:
            raise ValueError(f"probe tensors disagree on the batch size (dim 0): {sorted(sizes)}")
        if min(sizes) < 2:
            raise ValueError("probe batch needs at least 2 examples: it is split in halves for the noise floor")
        self._probe_batch = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        self._probe_every = every
        return self

    def flush(self) -> None:
        """Write every buffered record to the run's directory."""
        self.run.flush()

    def detach(self) -> Run:
        """Remove every hook, write what is buffered and return the run. Safe to call twice.

        Warns when fewer than two training steps were recorded: drift needs two.
        """
        was_attached = self.attached
        try:
            with self._lock:
                if self.manual:
                    self._close_manual_step()
                with self._guard("writing the last records"):
                    self.run.flush()
        finally:
            self._remove_hooks()
        if was_attached:
            self._warn_if_short()
        return self.run

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Tracker({len(self.layers)} layers, every={self.every}, step={self._step}, {state})"

    # -- hooks -------------------------------------------------------------------
    def _install(self, outputs: bool) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward_start, prepend=True))
        self._handles.append(self.model.register_forward_hook(self._on_forward_end))
        for name, module in self.layers.items():
            self._handles.append(
                module.register_forward_pre_hook(self._input_hook(name, module), with_kwargs=True)
            )
            if outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(name, module)))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_forward_start(self, module: nn.Module, args: tuple) -> None:
        if _is_compiling() or _probe_owner() is not None or self._stopped:
            return
        forward = self._forward
        forward.active = False
        forward.partials = defaultdict(list)  # a forward that raised never reached its end
        if not module.training:
            return
        with self._guard("starting a step"):
            with self._lock:
                if not self.manual:
                    self._step += 1
                elif self._step < 0:
                    self._step = 0
                first = not (self.manual and self._open)
                self._open = True
                forward.step = self._step
            if first and self._probe_batch is not None and forward.step % self._probe_every == 0:
                self._run_probe()
            forward.active = forward.step % self.every == 0

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if _is_compiling() or _probe_owner() is not None:
            return
        forward = self._forward
        partials, forward.partials = forward.partials, defaultdict(list)
        forward.active = False
        if not module.training or self._stopped:
            return
        with self._lock:
            if self.manual:
                for key, parts in partials.items():
                    self._manual_partials[key].extend(parts)
            else:
                self._write_step(forward.step, partials)

    def _input_hook(self, name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if not _is_compiling() and self._forward.active:
                self._observe(name, name, module, _first_tensor(args, kwargs))

        return hook

    def _output_hook(self, name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if not _is_compiling() and self._forward.active:
                self._observe(f"{name}:output", name, module, _first_tensor((output,), {}))

        return hook

    def _observe(self, name: str, layer: str, module: nn.Module, x: torch.Tensor | None) -> None:
        """Summarize ``x`` as record ``name`` of ``layer`` (``name`` is ``layer`` or ``layer:output``)."""
        owner = _probe_owner()
        if name in self._skipped or (owner is not None and owner is not self):
            return
        if x is None or not x.is_floating_point():
            what = "no tensor" if x is None else f"a {x.dtype} tensor"
            self._warn_once(
                name,
                f"layer {name!r} ({type(module).__name__}) received {what}; "
                "only floating-point tensors are summarized, so it is not recorded",
            )
            return
        if _is_transformed(x):
            self._warn_once(
                "torch.func",
                f"layer {name!r} ran under a torch.func transform (grad, vmap, ...); covshift does "
                "not record forwards inside torch.func transforms, only ordinary ones",
            )
            return
        try:
            dim = self._channel_dim(layer, module, x.ndim)
            partial = self._summarizer.summarize(x, dim)
        except Exception as err:  # noqa: BLE001 - a fault of covshift's must not reach the user's forward
            self._skip(name, f"layer {name!r} ({type(module).__name__}) could not be summarized: {err}")
            return
        if partial is not None:  # an empty input is no record
            self._kinds[name] = (type(module).__name__, dim)
            forward = self._forward
            forward.partials[(forward.source, name)].append(partial)

    def _channel_dim(self, layer: str, module: nn.Module, ndim: int) -> int | None:
        spec = self._channel_dims
        if isinstance(spec, dict):
            spec = spec.get(layer, "auto")
        if spec == "auto":
            return channel_axis(module, ndim)
        if spec is not None and not -ndim <= spec < ndim:
            raise ValueError(f"channel_dim={spec} is out of range for the {ndim}-d input of layer {layer!r}")
        return spec

    # -- steps and probes --------------------------------------------------------
    def _close_manual_step(self) -> None:
        """Write the open manual step: every forward since the last :meth:`step` call (lock held)."""
        partials, self._manual_partials = self._manual_partials, defaultdict(list)
        self._open = False
        if not self._stopped:
            self._write_step(self._step, partials)

    def _write_step(self, step: int, partials: dict[tuple[str, str], list[Partial]]) -> None:
        """Hand one step's records to the run, the calls of each layer merged (lock held)."""
        merged = {}
        for (source, name), parts in partials.items():
            channels = sorted({part.count.shape[0] for part in parts})
            if len(channels) > 1:
                self._skip(
                    name,
                    f"layer {name!r} saw inputs with {channels} channels in one step; its calls are merged "
                    "into one record, so they need the same channel count (set channel_dim for it)",
                )
            elif name not in self._skipped:
                merged[(source, name)] = merge(parts)
        if not merged:
            return
        with self._guard("storing a step"):
            for (source, name), partial in merged.items():
                if name not in self._described:
                    self._described.add(name)
                    kind, dim = self._kinds[name]
                    self.run.add_layer(name, kind, partial.count.shape[0], dim)
                self.run.append(step, source, name, partial)
                if source == "train":
                    self._train_steps.add(step)
            self.run.end_step()

    def _run_probe(self) -> None:
        saved_buffers = [(buffer, buffer.clone()) for buffer in self.model.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        size = next(a.shape[0] for a in self._probe_batch if isinstance(a, torch.Tensor) and a.ndim > 0)
        half = size // 2
        forward = self._forward
        _probe.owner, forward.active = self, True
        try:
            with torch.no_grad():
                for source, part in (("probe_a", slice(0, half)), ("probe_b", slice(half, size))):
                    forward.source = source
                    self.model(*(_take(a, part) for a in self._probe_batch))
        finally:
            for buffer, value in saved_buffers:
                buffer.copy_(value)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            _probe.owner, forward.active, forward.source = None, False, "train"
        partials = forward.partials
        for (source, name), parts in list(partials.items()):
            if source == "probe_a":
                partials[("probe", name)] = parts + partials.get(("probe_b", name), [])

    # -- faults ------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self, doing: str) -> Iterator[None]:
        """Turn a fault while ``doing`` into one warning; recording stops, training goes on."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - a fault of covshift's must not reach the user's loop
            self._stopped = True
            self._forward.active = False
            self._warn_once(
                "stopped",
                f"{doing} failed ({type(err).__name__}: {err}); covshift stops recording here and "
                f"training goes on. Steps written before are kept in {self.run.directory}",
            )

    def _skip(self, name: str, message: str) -> None:
        """Stop recording record ``name`` after a fault of its own, saying so once."""
        self._skipped.add(name)
        self._warn_once(name, f"{message}; it is no longer recorded")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"covshift: {message}", CovshiftWarning, stacklevel=2)

    def _warn_if_short(self) -> None:
        """Say why a run cannot show drift: no training step, or only one, was recorded."""
        recorded = len(self._train_steps)
        if recorded == 0:
            warnings.warn(
                "covshift: no training step was recorded. Steps are training-mode forwards of the "
                "model it was attached to: a model in eval mode, a loop that calls a submodule "
                "directly, or a forward inside torch.compile or torch.func records nothing",
                CovshiftWarning,
                stacklevel=3,
            )
        elif recorded == 1:
            advice = "train longer" if self.every == 1 else f"record more often (every={self.every} now) or train longer"
            warnings.warn(
                f"covshift: only 1 training step was recorded (step {min(self._train_steps)} of "
                f"{self._step + 1}): drift needs at least 2. To see drift, {advice}",
                CovshiftWarning,
                stacklevel=3,
            )


def attach(
    model: nn.Module,
    layers: LayerSpec = None,
    *,
    every: int = DEFAULT_EVERY,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    store: str | Path | None = None,
    step: Literal["auto", "manual"] = "auto",
    outputs: bool = False,
    channel_dim: ChannelDim | dict[str, ChannelDim] = "auto",
    flush_every: int = DEFAULT_FLUSH_EVERY,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    name: str | None = None,
) -> Tracker:
    """Start recording the input distributions of ``model``'s layers.

    Args:
        model: any ``torch.nn.Module``; left exactly as found by ``detach()``.
        layers: None for every layer with parameters of its own or normalization
            layer; else names or glob patterns (``"features.*"``), module types, a
            list of those, or a predicate ``(name, module) -> bool``.
        every: record one training step in ``every`` (steps 0, every, 2·every, …).
        sample_size: values per channel the quantiles come from (exact at or above
            the channel's value count); moments and extrema always use every value.
        store: a new directory to stream the run to (crash-safe); None keeps it in
            a temporary directory until ``run.save()``.
        step: ``"auto"`` (each training-mode forward is a step) or ``"manual"``
            (call ``tracker.step()``, e.g. after gradient accumulation).
        outputs: also record each layer's output, as layer ``"<name>:output"``.
        channel_dim: ``"auto"`` (dim 1 for conv/norm inputs, last dim otherwise),
            an int, None to summarize each layer as a whole, or a dict per layer name.
        flush_every: write to disk at least every this many recorded steps.
        memory_budget: bytes of buffered records (332 per channel per step) that trigger a write.
        name: label for reports (default: the store directory's name).

    Returns:
        The :class:`Tracker`; its ``run`` holds the records.

    Raises:
        ValueError: a layer name or pattern matches nothing (the message lists
            the valid names), or a setting is out of range.

    >>> import torch, covshift
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> with covshift.attach(model) as tracker:
    ...     _ = model(torch.randn(8, 4))
    >>> tracker.run.stats()[["step", "layer", "channel", "count"]].tail(2)
       step layer  channel  count
    5     0     2        1      8
    6     0     2        2      8
    """
    return Tracker(
        model,
        layers,
        every=every,
        sample_size=sample_size,
        store=store,
        step=step,
        outputs=outputs,
        channel_dim=channel_dim,
        flush_every=flush_every,
        memory_budget=memory_budget,
        name=name,
    )


def _check_channel_dims(spec: object, layers: dict[str, nn.Module]) -> None:
    """``channel_dim`` is "auto", None, an int, or a dict of those keyed by selected layer names."""
    specs = spec.values() if isinstance(spec, dict) else [spec]
    for value in specs:
        if not (value == "auto" or value is None or (isinstance(value, int) and not isinstance(value, bool))):
            raise ValueError(f"channel_dim must be 'auto', None or an int (or a dict of them), got {value!r}")
    unknown = sorted(set(spec) - set(layers)) if isinstance(spec, dict) else []
    if unknown:
        raise ValueError(f"channel_dim names layers that are not recorded: {unknown}; recorded: {list(layers)}")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor among the arguments, looking one level into tuples and lists."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item
    return None


def _is_transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is wrapped by a torch.func transform (its values are not plain memory)."""
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.is_functorch_wrapped_tensor(x)


def _take(value: Any, part: slice) -> Any:
    return value[part] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


def _versions() -> dict[str, str]:
    from covshift import __version__

    return {"covshift": __version__, "torch": torch.__version__, "python": platform.python_version()}
