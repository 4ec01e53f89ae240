"""`attach()` and `Tracker`: hook a model, count steps, summarize layer inputs, run probes."""

from __future__ import annotations

import platform
import warnings
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from covshift.checks import check_int
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


class Tracker:
    """Records per-channel summaries of selected layers' inputs while a model trains.

    Create it with :func:`attach`. Each training-mode forward of the model is one
    step (or, with ``step="manual"``, everything between two :meth:`step` calls).
    Eval-mode forwards are not recorded. Use :meth:`detach`, or the tracker as a
    context manager, to remove every hook and flush what is buffered.
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
        self._step = -1  # index of the current (or last) step
        self._open = False  # a step has begun and not yet been written
        self._active = False  # layer hooks record now
        self._source = "train"
        self._probing = False
        self._probe_batch: tuple | None = None
        self._probe_every = DEFAULT_PROBE_EVERY
        self._partials: dict[tuple[str, str], list[Partial]] = defaultdict(list)
        self._kinds: dict[str, tuple[str, int | None]] = {}  # record name -> (layer type, channel dim)
        self._described: set[str] = set()
        self._warned: set[str] = set()
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
        self._close_step()
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
        """Remove every hook, write what is buffered and return the run. Safe to call twice."""
        try:
            if self.manual:
                self._close_step()
            self._discard_step()
            self.run.flush()
        finally:
            self._remove_hooks()
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
        if self._probing:
            return
        if not module.training:
            self._active = False
            return
        if not self.manual:
            self._discard_step()  # a forward that raised never reached its end
            self._step += 1
        elif self._step < 0:
            self._step = 0
        if not self._open:
            self._open = True
            if self._probe_batch is not None and self._step % self._probe_every == 0:
                self._run_probe()
        self._active = self._step % self.every == 0

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._probing:
            return
        self._active = False
        if not self.manual and module.training:
            self._close_step()

    def _input_hook(self, name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._active:
                self._observe(name, name, module, _first_tensor(args, kwargs))

        return hook

    def _output_hook(self, name: str, module: nn.Module):
        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if self._active:
                self._observe(f"{name}:output", name, module, _first_tensor((output,), {}))

        return hook

    def _observe(self, name: str, layer: str, module: nn.Module, x: torch.Tensor | None) -> None:
        """Summarize ``x`` as record ``name`` of ``layer`` (``name`` is ``layer`` or ``layer:output``)."""
        if x is None or not x.is_floating_point():
            if name not in self._warned:
                self._warned.add(name)
                what = "no tensor" if x is None else f"a {x.dtype} tensor"
                warnings.warn(
                    f"covshift: layer {name!r} ({type(module).__name__}) received {what}; "
                    "only floating-point tensors are summarized, so it is not recorded",
                    stacklevel=3,
                )
            return
        dim = self._channel_dim(layer, module, x.ndim)
        self._kinds[name] = (type(module).__name__, dim)
        self._partials[(self._source, name)].append(self._summarizer.summarize(x, dim))

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
    def _close_step(self) -> None:
        self._open = False
        partials, self._partials = self._partials, defaultdict(list)
        merged = {key: _merge_calls(key[1], parts) for key, parts in partials.items()}
        for (source, name), partial in merged.items():
            if name not in self._described:
                self._described.add(name)
                kind, dim = self._kinds[name]
                self.run.add_layer(name, kind, partial.count.shape[0], dim)
            self.run.append(self._step, source, name, partial)
        self.run.end_step()

    def _discard_step(self) -> None:
        if self._open and not self.manual:
            self._partials.clear()
            self._open = False

    def _run_probe(self) -> None:
        saved_buffers = [(buffer, buffer.clone()) for buffer in self.model.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        size = next(a.shape[0] for a in self._probe_batch if isinstance(a, torch.Tensor) and a.ndim > 0)
        half = size // 2
        self._probing, self._active = True, True
        try:
            with torch.no_grad():
                for source, part in (("probe_a", slice(0, half)), ("probe_b", slice(half, size))):
                    self._source = source
                    self.model(*(_take(a, part) for a in self._probe_batch))
        finally:
            for buffer, value in saved_buffers:
                buffer.copy_(value)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self._probing, self._active, self._source = False, False, "train"
        for (source, name), parts in list(self._partials.items()):
            if source == "probe_a":
                self._partials[("probe", name)] = parts + self._partials.get(("probe_b", name), [])


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


def _merge_calls(name: str, parts: list[Partial]) -> Partial:
    """One record of a layer called several times in a step (weight sharing): their channels must agree."""
    channels = sorted({part.count.shape[0] for part in parts})
    if len(channels) > 1:
        raise ValueError(
            f"layer {name!r} saw inputs with {channels} channels in one step; its calls are merged "
            "into one record, so they need the same channel count (set channel_dim for it)"
        )
    return merge(parts)


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


def _take(value: Any, part: slice) -> Any:
    return value[part] if isinstance(value, torch.Tensor) and value.ndim > 0 else value


def _versions() -> dict[str, str]:
    from covshift import __version__

    return {"covshift": __version__, "torch": torch.__version__, "python": platform.python_version()}
