"""`attach()` and `Tracker`: hook a model, count steps, summarize layer inputs, run probes."""

from __future__ import annotations

import functools
import platform
import sys
import threading
from collections import defaultdict
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from covshift import schedule
from covshift.record import compiled, context, distributed, resume
from covshift.record.alerts import AlertMonitor
from covshift.record.backward import GRAD_SOURCE, InputGradients
from covshift.checks import MAX_STEP, check_int
from covshift.faults import Faults, gap_messages
from covshift.record.channels import LayerAxes, check_channel_dims
from covshift.record.duplicates import SameInputs
from covshift.record.layers import LayerSpec, select_layers
from covshift.record.probe import HALVES, Probe, make_probe, preserved
from covshift.record.settings import Settings, signature
from covshift.record.live import LiveLog
from covshift.record.steps import StepWriter
from covshift.store.run import Run
from covshift.summary.summarize import N_BINS, QUANTILE_LEVELS, Partial, Summarizer

T = TypeVar("T")


class Tracker:
    """Records per-channel summaries of selected layers' inputs while a model trains.

    Create it with :func:`attach`. Steps are optimizer steps when an optimizer is
    given (every training forward between two ``optimizer.step()`` calls is one
    record); else each training-mode forward of the model is one step (or, with
    ``step="manual"``, everything between two :meth:`step` calls). Eval-mode
    forwards and recomputations under activation checkpointing are not recorded.
    Use :meth:`detach`, or the tracker as a context manager, to remove every hook
    and flush what is buffered.

    A fault inside covshift never reaches the training loop: it is reported once
    as a :class:`~covshift.faults.CovshiftWarning` and covshift steps aside (a
    layer it cannot summarize is skipped; a failing store stops the recording).
    Forwards from several threads at once each record their own step.
    """

    __signature__ = signature("None")

    def __init__(self, model: nn.Module, layers: LayerSpec = None, **settings: Any) -> None:
        self.settings = config = Settings.of("Tracker", settings)
        every, sample_size, sketch_channels = config.every, config.sample_size, config.sketch_channels
        store, step, optimizer, outputs = config.store, config.step, config.optimizer, config.outputs
        channel_dim, flush_every, memory_budget = config.channel_dim, config.flush_every, config.memory_budget
        name, group, resuming = config.name, config.group, config.resume
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        self.schedule = schedule.parse(every)
        if step not in ("auto", "manual"):
            raise ValueError(f"step must be 'auto' or 'manual', got {step!r}")
        optimizer = context.unwrap_optimizer(optimizer)
        if optimizer is not None and not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if optimizer is not None and step == "manual":
            raise ValueError("give either optimizer= (steps follow optimizer.step()) or step='manual', not both")
        if not isinstance(resuming, bool):
            raise TypeError(f"resume must be True or False, got {resuming!r}")
        if resuming and store is None:
            raise ValueError("resume=True needs store=: the directory of the run to go on with")
        self.model = model
        self.layers = select_layers(context.unwrap_compiled(model), layers)
        check_channel_dims(channel_dim, self.layers)
        self.manual = step == "manual"
        self.optimizer = optimizer
        self._per_forward = optimizer is None and not self.manual  # each training forward is a step
        self._axes = LayerAxes(channel_dim)
        self._same = SameInputs(self.layers, active=layers is None)
        self._summarizer = Summarizer(sample_size)
        config = {
            "every": every if isinstance(every, (int, str)) else str(self.schedule),
            "schedule": self.schedule.describe(),
            "layers": list(self.layers),
            "sample_size": sample_size,
            "sketch_channels": sketch_channels,
            "step": "optimizer" if optimizer is not None else step,
            "outputs": outputs,
            "gradients": self.settings.gradients,
            "quantile_levels": list(QUANTILE_LEVELS),
            "n_bins": N_BINS,
        }
        # -- torch.distributed: records merged across ranks, written by rank 0 alone (covshift/distributed.py)
        self._ranks = distributed.detect(group)
        if self._ranks is not None:
            config["distributed"] = self._ranks.describe()
        # --
        meta = {
            "name": name,
            "model": type(context.unwrap_compiled(model)).__name__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "versions": _versions(),
        }
        if self._ranks is not None and not self._ranks.is_writer:  # a run with no directory: it writes nothing
            self.run: Run = distributed.NonWriterRun(
                meta, rank=self._ranks.rank, size=self._ranks.size, store=store,
                flush_every=flush_every, memory_budget=memory_budget, sketch_channels=sketch_channels,
            )
        else:
            stored = resume.stored_meta(store) if resuming else None
            if stored is not None:  # refused before a file is touched or a hook installed
                resume.check(store, stored, meta, self.layers)
            self.run = Run(store, meta, flush_every=flush_every, memory_budget=memory_budget,
                           sketch_channels=sketch_channels, resume=resuming)
        self._lock = threading.RLock()  # steps, the open merged step and the run
        self._forward = context.Forward()
        # Index of the current step: in per-forward mode the last forward's (-1 before
        # the first); in merged modes (manual, optimizer) the open step's.
        self._step = -1 if self._per_forward else 0
        self._recording = not self._per_forward  # merged modes: the open step is recorded
        self._step_partials: dict[tuple[str, str], list[Partial]] = defaultdict(list)  # merged steps
        self._probe: Probe | None = None
        self._probed = -1  # the last step whose probe ran
        self._kinds: dict[str, tuple[str, int | None]] = {}  # record name -> (layer type, channel dim)
        self._called: set[str] = set()  # layers whose hook ran on a recorded step
        self._unrecordable: dict[str, str] = {}  # layers called with nothing to summarize, and what they got
        self._forwards = "none"  # training forwards seen: "none", "eval" (only eval-mode ones), "train"
        self._openers: dict[str, None] = {}  # per-forward mode: modules whose calls opened steps ("": the model)
        self._root_runs = False  # the model's own forward ran in training mode: its children's calls are inside it
        # Set and read only by hooks being traced: dynamo tracks the attribute through the trace, so a child's
        # start and end hooks traced inside the model's own forward see it set and relay nothing (when the graph
        # runs, the model's own start and end keep the forward's depth); the model's end hook clears it, and so
        # does each step (a trace that stopped midway).
        self._in_traced_model = False
        self._traced_model_trains = False  # and whether that model is in training mode (its layers may not be)
        self._autocast: context.Autocast | None = None  # of the latest training forward: probes run under it
        self._faults = Faults()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._relay_keys: list[int] = []  # the hooks' eager code, as compiled forwards call it (compiled.py)
        self._measurements: list[Any] = []  # added with add(): closed at detach()
        self._gradients = InputGradients(self._summarizer.summarize, self._take_gradient, self._faults) \
            if self.settings.gradients else None
        # per-forward mode: input gradients arrive after their forward's step was written; they are written
        # as their own record of that step when the next forward starts (or at detach)
        self._held_gradients: dict[int, dict[tuple[str, str], list[Partial]]] = {}
        on_alert = self.settings.on_alert
        alerts = on_alert if isinstance(on_alert, AlertMonitor) or on_alert is None else AlertMonitor(on_alert)
        live = LiveLog(self.settings.tensorboard) if self.settings.tensorboard is not None else None
        if live is not None and alerts is None:
            alerts = AlertMonitor(lambda alert: None)  # the live log shows what the monitor measures
        self._steps = StepWriter(self, alerts, live)
        if resuming:
            self._go_on()
        try:
            self._install(outputs)
        except BaseException:
            self._remove_hooks()
            raise
        compiled.attached(model)  # code compiled before has no hooks: compiled again, with them

    # -- public ------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """Index of the current training step (-1 before the first)."""
        return self._step

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def duplicates(self) -> dict[str, str]:
        """Selected-by-default blocks whose input is the very tensor one of their selected submodules
        receives (ConvNeXt's ``CNBlock`` and its first convolution), each mapped to that submodule:
        the input is recorded once, under the submodule's name (:mod:`covshift.record.duplicates`)."""
        return dict(self._same.found)

    @property
    def joinable(self) -> distributed.JoinableSteps:
        """For uneven numbers of batches per rank: ``with Join([ddp_model, tracker.joinable]): ...``.

        A rank that runs out of batches then closes one empty step per iteration
        the others still run, so every rank takes part in every recorded step's
        exchange. Needs ``optimizer=`` and one forward of the DDP model per
        optimizer step; list the tracker after the model.
        """
        if self._ranks is None or self.optimizer is None:
            raise RuntimeError(
                "tracker.joinable is for torch.distributed jobs attached with optimizer=opt "
                f"({'no process group was found' if self._ranks is None else 'this tracker has no optimizer'})"
            )
        return distributed.JoinableSteps(self._ranks, lambda: self._on_optimizer_step(self.optimizer, (), {}))

    def step(self) -> None:
        """End the current step (``step="manual"`` only): its micro-batches form one record."""
        if not self.manual:
            how = "they follow optimizer.step()" if self.optimizer is not None else "they are counted automatically"
            raise RuntimeError(f"tracker.step() is for attach(..., step='manual'); {how}")
        self._on_optimizer_step(None, (), {})

    def set_step(self, index: int) -> None:
        """Number the step in progress (or the next one) ``index``: to resume a run, or to match a
        framework's step counter. Records already taken in an open step move with it."""
        check_int("index", index, minimum=0, maximum=MAX_STEP)
        self.run.resume_at(index)  # a resumed run: its stored steps from here on are replaced
        with self._lock:
            if self._per_forward:
                self._step = index - 1
            else:
                self._set_open_step(index)

    def _go_on(self) -> None:
        """Resuming: number steps on from the stored run's last training step (every rank alike)."""
        start = None
        if not isinstance(self.run, distributed.NonWriterRun):
            self._steps.described.update(layer["name"] for layer in self.run.meta["layers"])
            sources = self.run.sources()
            last = sources.loc["train", "last step"] if "train" in sources.index else sources["last step"].max()
            start = 0 if len(sources) == 0 else int(last) + 1
        if self._ranks is not None:
            start = self._ranks.broadcast(start)
        self.set_step(start)

    def probe(self, *args: Any, every: int | str | schedule.Schedule | None = None, **kwargs: Any) -> Tracker:
        """Summarize a fixed batch at the recorded steps (or on a schedule of its own), apart from training.

        At the start of each such step the model runs ``model(*args, **kwargs)``
        on each half of the batch (every batched tensor, also inside tuples, lists
        and dicts, is split along dim 0), under ``no_grad`` in its training mode
        and under the ``torch.autocast`` state of the training forwards (so probe
        and training records have the same precision); records are stored as
        sources ``probe_a``, ``probe_b`` and their union ``probe``. The start of
        a step is its first training forward, or, when steps follow updates, the
        update that opens it (under the autocast state of the last training
        forward). Every buffer (BatchNorm running statistics included) and the
        random number generators are put back exactly as they were. Where steps follow updates, the step the last update opens
        holds the probe of the final weights and no training records: one probe step more than training.

        The probe runs once here, recording nothing, so that a batch the model
        cannot take is refused now rather than stopping the recording later.

        For a forward that needs more than its inputs (a detection model in
        training mode wants targets too), pass one function instead:
        ``probe(fn)`` calls ``fn(0)`` and ``fn(1)``, each running the model on
        its half of a fixed batch.

        Args:
            args, kwargs: the model's arguments, or a single function of the half.
            every: None to probe at the steps that record training (``attach``'s
                ``every``); else an int N (every N-th step), ``"log"`` or a
                :class:`~covshift.schedule.Schedule`.

        Raises:
            ValueError: the batch is not one (no batched tensor, halves of no
                example), or the model's forward on it raised (chained).
        """
        probe = make_probe(args, kwargs, self.schedule if every is None else schedule.parse(every))
        probe.try_on(context.unwrap_compiled(self.model))  # probes run eagerly: no graph compiled for them
        self._probe = probe
        return self

    def add(self, measurement: T) -> T:
        """Run a measurement beside the records with this tracker, and return it.

        ``measurement`` is a :class:`~covshift.science.null_floor.NullFloor` or a
        :class:`~covshift.science.gradient_ics.GradientICS` made on this tracker's model
        (and optimizer): it then numbers its steps as the tracker does, stores its rows in
        this run (:meth:`~covshift.store.run.Run.table`, where the report finds them), says
        what goes wrong as a :class:`~covshift.faults.CovshiftWarning`, and is closed by
        :meth:`detach`.
        """
        measurement.bind(self)
        self._measurements.append(measurement)
        return measurement

    def warn_once(self, key: str, message: str) -> None:
        """Say ``message`` once as a :class:`~covshift.faults.CovshiftWarning` (for measurements added with :meth:`add`)."""
        self._faults.warn_once(key, message)

    def flush(self) -> None:
        """Write every buffered record to the run's directory."""
        self.run.flush()

    def detach(self) -> Run:
        """Remove every hook, write what is buffered and return the run. Safe to call twice.

        In a ``torch.distributed`` job, ranks other than rank 0 of the group get a
        :class:`~covshift.distributed.NonWriterRun`: a run with no directory,
        whose reading methods raise an error saying the records are on rank 0.

        Warns once about what the user would otherwise not see: fewer than two
        recorded training steps, and selected layers that were never called.
        """
        was_attached = self.attached
        try:
            with self._lock:
                if not self._per_forward:
                    self._close_merged_step()
                else:
                    self._write_held_gradients()
                with self._faults.guard("writing the last records", self.run.directory):
                    self.run.flush()
        finally:
            self._remove_hooks()
            for measurement in self._measurements:
                measurement.close()
            if self._steps.live is not None:
                self._steps.live.close()
        if was_attached and (self._ranks is None or (self._ranks.is_writer and not self._ranks.broken)):
            for key, message in gap_messages(
                layers=[name for name in self.layers if name not in self._same.found],
                called=self._called,
                recorded=self._steps.train_steps,
                first_recorded=self._steps.first_train_step,
                steps=self._step + 1,
                schedule=self.schedule,
                forwards="train" if self._called else self._forwards,
                model=type(self.model).__name__,
                stopped=self._faults.stop_reason,
                unrecordable=self._unrecordable,
                openers=list(self._openers),
                compiled_recorded=compiled.SUPPORTED,
            ):
                self._faults.warn_once(key, message, stacklevel=3)
            missing = self._gradients.without_gradient() if self._gradients is not None else []
            if missing:
                self._faults.warn_once("no-gradient", (
                    f"no input gradient was recorded for {', '.join(map(repr, missing))}: their input did not "
                    "require grad (the data itself, the input of frozen layers, or a no_grad forward)"), stacklevel=3)
        return self.run

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None and self._ranks is not None:
            self._ranks.abandon()  # leaving with an error: the other ranks are elsewhere, exchange nothing more
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Tracker({len(self.layers)} layers, {self.schedule}, step={self._step}, {state})"

    # -- hooks -------------------------------------------------------------------
    def _install(self, outputs: bool) -> None:
        outer = self._outer_modules()
        for name, module in self.layers.items():  # a watched child that is a layer: one pre-hook does both
            start = functools.partial(self._on_call_start, name) if name and name in outer else None
            self._handles.append(
                module.register_forward_pre_hook(self._input_hook(name, module, start), with_kwargs=True)
            )
            if outputs:
                self._handles.append(module.register_forward_hook(self._output_hook(name, module)))
        for name, module in outer.items():  # ends after the layers' hooks: a step ends after its outputs
            if not name or name not in self.layers:
                self._handles.append(module.register_forward_pre_hook(self._start_hook(name, module), prepend=True))
            self._handles.append(module.register_forward_hook(self._end_hook(name, module), always_call=True))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_post_hook(self._on_optimizer_step))

    def _outer_modules(self) -> dict[str, nn.Module]:
        """The model (``""``), and its direct children that hold selected layers: a training step that
        calls a child itself (Lightning's ``self.net(x)``) runs a forward that starts and ends a step too."""
        root = context.unwrap_compiled(self.model)
        children = {
            name: child for name, child in root.named_children()
            if any(layer == name or layer.startswith(f"{name}.") for layer in self.layers)
        }
        return {"": self.model, **children}

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        compiled.remove_targets(self._relay_keys)
        self._relay_keys.clear()

    def _relay_key(self, target: compiled.Target) -> int:
        """The key under which a compiled forward calls ``target``, a hook's eager code, at run time."""
        key = compiled.add_target(target)
        self._relay_keys.append(key)
        return key

    def _start_hook(self, opener: str, outer: nn.Module):
        """The pre-hook of the model or of a watched child: a call of it may begin a forward."""
        key = self._relay_key(lambda x: self._on_call_start(opener, outer, () if x is None else (x,)))

        def hook(module: nn.Module, args: tuple) -> None:
            if context.is_compiling():  # a child's call needs no tensor: none is handed over for it
                if not opener:
                    self._in_traced_model = not context.is_exporting()
                    self._traced_model_trains = module.training
                elif self._in_traced_model:
                    return
                compiled.traced(key, None if opener else context.first_tensor(args, {}))
                return
            self._on_call_start(opener, module, args)

        return hook

    def _end_hook(self, opener: str, outer: nn.Module):
        """The forward hook of the model or of a watched child: the end of a call that began a forward."""
        key = self._relay_key(lambda x: self._on_call_end(opener, outer, (), True))

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if context.is_compiling():
                if not (opener and self._in_traced_model):
                    compiled.traced(key)
                if not opener:
                    self._in_traced_model = False
                return
            self._on_call_end(opener, module, args, output)

        return hook

    @property
    def _counting(self) -> bool:
        """Whether steps are still counted and closed: while recording, and after a fault in a
        distributed job too, where the other ranks wait for this rank's exchanges."""
        return not self._faults.stopped or self._ranks is not None

    def _on_call_start(self, opener: str, module: nn.Module, args: tuple) -> None:
        """A call of the model or of a watched child begins; the outermost one in this thread is a forward.

        Once the model's own forward has run in training mode, its children's calls are left alone:
        they run inside it (a cheap return, as they run on every forward of a ``Sequential``)."""
        if (opener and self._root_runs) or context.probe_owner() is not None:
            return
        forward = self._forward
        forward.depth += 1
        if forward.depth == 1 and self._counting:
            self._begin_forward(opener, module, args)

    def _on_call_end(self, opener: str, module: nn.Module, args: tuple, output: Any) -> None:
        """Called also when the forward raised (``always_call``): the depth stays right either way."""
        if (opener and self._root_runs) or context.probe_owner() is not None:
            return
        forward = self._forward
        forward.depth = max(forward.depth - 1, 0)
        if forward.depth or not self._per_forward:
            return
        raised = output is None and sys.exc_info()[1] is not None
        partials = forward.take()  # a forward that raised is dropped
        if not raised and module.training and self._counting and not context.in_backward():
            with self._lock:
                self._steps.write(forward.step, partials)

    def _begin_forward(self, opener: str, module: nn.Module, args: tuple) -> None:
        """An outermost training forward starts: in per-forward mode a step; the step's probe if due."""
        forward = self._forward
        forward.take()
        if not module.training or context.in_backward():
            if self._forwards == "none" and not context.in_backward():
                self._forwards = "eval"
            return
        first = context.first_tensor(args, {})
        if first is not None and context.holds_no_values(first):
            self._faults.warn_once("no values", context.NO_VALUES)
            return
        self._forwards = "train"
        compiled.watch_compiler(self.model)
        if not opener:
            self._root_runs = True  # its children's calls run inside it from now on
        with self._faults.guard("starting a step", self.run.directory):
            self._autocast = context.autocast_state(args, module)
            with self._lock:
                if self._per_forward:
                    self._write_held_gradients()
                    self._step += 1
                    if self._gradients is not None:  # the last forward's backward is over
                        self._gradients.forget_before(self._step)
                    self._openers.setdefault(opener)
                forward.step = self._step
            with self._faults.guard("running the probe", self.run.directory):
                self._maybe_probe(forward.step)
            forward.active = self._per_forward and self._scheduled(self.schedule, forward.step)

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer | None, args: tuple, kwargs: dict) -> None:
        """End the open step and open the next (an update, or ``tracker.step()``)."""
        compiled.watch_compiler(self.model)
        self._in_traced_model = False
        with self._lock:
            try:
                self._close_merged_step()
            finally:  # interrupted (Ctrl-C inside the store): the next step still gets a number of its own
                self._set_open_step(self._step + 1)
                if self._gradients is not None:
                    self._gradients.forget_before(self._step)
        if self.model.training:
            with self._faults.guard("running the probe", self.run.directory):
                self._maybe_probe(self._step)  # the step opens now, whether or not the model's own forward runs

    def _set_open_step(self, index: int) -> None:
        """Merged modes: the step now open is ``index`` (lock held)."""
        self._step = index
        self._recording = self._scheduled(self.schedule, index)

    def _scheduled(self, plan: schedule.Schedule, step: int) -> bool:
        """Whether ``plan`` records ``step``. A schedule may be the user's own code: one that raises
        stops recording with a warning instead of raising into the forward or the update."""
        with self._faults.guard("asking the schedule", self.run.directory):
            return plan.records(step)
        return False

    def _records_now(self, module: nn.Module) -> bool:
        """Whether a layer call records: inside a recorded forward (per-forward mode, probes), or in
        merged modes any training-mode call on a recorded step that is not a recomputation."""
        if self._forward.active:
            return True
        return self._recording and module.training and not context.in_backward()

    def _input_hook(self, name: str, module: nn.Module, start: Callable[[nn.Module, tuple], None] | None):
        def on_input(mod: nn.Module, args: tuple, kwargs: dict, start: Callable | None) -> None:
            if start is not None:
                start(mod, args)
            if self._records_now(mod):
                self._observe(name, name, module, context.first_tensor(args, kwargs))
            elif self._gradients is not None and self._gradients.awaiting and context.in_backward():
                self._watch_recomputed(name, module, context.first_tensor(args, kwargs))
            if self._per_forward and compiled.gradient_follows() and not context.in_backward():
                self._gradients.forwarded(self._step, name)

        key = self._relay_key(lambda x: on_input(module, () if x is None else (x,), {}, start))
        # inside the model's traced forward a child's start is left out, as its end is (_end_hook)
        inside_key = key if start is None else self._relay_key(lambda x: on_input(module, () if x is None else (x,), {}, None))
        gradient_key = self._relay_key(functools.partial(self._gradient_arrived, name)) \
            if self._gradients is not None else None

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if context.is_compiling():  # traced: at run time the compiled graph calls this hook's eager code
                x = context.first_tensor(args, kwargs)
                relay_key = inside_key if self._in_traced_model else key
                training = self._traced_model_trains if self._in_traced_model else mod.training
                if gradient_key is not None and compiled.gradient_flows(training, x):
                    compiled.traced_with_gradient(relay_key, gradient_key, x)  # and relays x's gradient
                else:
                    compiled.traced(relay_key, x)
                return
            on_input(mod, args, kwargs, start)

        return hook

    def _output_hook(self, name: str, module: nn.Module):
        key = self._relay_key(lambda x: hook(module, (), x))

        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if context.is_compiling():
                compiled.traced(key, context.first_tensor((output,), {}))
                return
            if self._records_now(mod):
                self._observe(f"{name}:output", name, module, context.first_tensor((output,), {}))

        return hook

    def _observe(self, name: str, layer: str, module: nn.Module, x: torch.Tensor | None) -> None:
        """Summarize ``x`` as record ``name`` of ``layer`` (``name`` is ``layer`` or ``layer:output``)."""
        owner = context.probe_owner()
        if name in self._faults.skipped or self._faults.stopped or (owner is not None and owner is not self):
            return
        self._called.add(layer)
        if x is not None and context.holds_no_values(x):
            self._faults.warn_once("no values", context.NO_VALUES)
            return
        if name in self._same.found:  # its input is recorded under a submodule's name
            return
        if x is None or not x.is_floating_point():
            self._unrecordable.setdefault(layer, f"received {context.describe(x)}")
            self._faults.warn_once(
                name,
                f"layer {name!r} ({type(module).__name__}) received {context.describe(x)}; "
                "only floating-point tensors are summarized, so it is not recorded",
            )
            return
        if context.is_transformed(x):
            self._unrecordable.setdefault(layer, "ran under a torch.func transform")
            self._faults.warn_once(
                "torch.func",
                f"layer {name!r} ran under a torch.func transform (grad, vmap, ...); covshift does "
                "not record forwards inside torch.func transforms, only ordinary ones",
            )
            return
        try:
            if name == layer:
                self._same.see(self._forward, layer, x, self._steps.described)
            axis = self._axes.resolve(layer, module, x.shape)
            partial = self._summarizer.summarize(x, axis.dim)
            if partial is not None and name not in self._kinds:
                self._kinds[name] = (type(module).__name__, axis.dim)
                if name == layer:  # an input: its channels should be the layer's declared size
                    mismatch = self._axes.declared_mismatch(name, module, x.shape, axis.dim)
                    if mismatch is not None:
                        self._faults.warn_once(f"{name}:channels", mismatch)
                    self._axes.doubt(layer, module, x.shape, axis)
        except Exception as err:  # noqa: BLE001 - a fault of covshift's must not reach the user's forward
            self._unrecordable.setdefault(layer, f"could not be summarized: {err}")
            self._faults.skip(name, f"layer {name!r} ({type(module).__name__}) could not be summarized: {err}")
            return
        if partial is None:  # an empty input is no record
            return
        key = (self._forward.source, name)
        if self._gradients is not None and name == layer and self._forward.source == "train":
            self._watch_gradient(layer, x, axis.dim)
        if self._per_forward or self._forward.source != "train":
            self._forward.partials[key].append(partial)
        else:
            with self._lock:
                self._step_partials[key].append(partial)

    def _watch_gradient(self, layer: str, x: torch.Tensor, channel_dim: int | None) -> None:
        """A recorded training input: its gradient is summarized when the backward pass computes it."""
        step = self._forward.step if self._per_forward else self._step
        if self._per_forward:
            with self._lock:  # written when the next forward starts, on every rank alike
                self._held_gradients.setdefault(step, {})
        if not compiled.relayed():
            self._gradients.watch(step, layer, x, channel_dim)
        elif compiled.gradient_follows():  # the compiled backward relays it (_gradient_arrived)
            self._gradients.expect(step, layer, channel_dim)
        elif compiled.GRADIENTS_SUPPORTED:
            self._gradients.ungraded(layer)
        else:
            self._faults.warn_once("compiled-gradients", (
                f"input gradients of forwards inside torch.compile are not recorded with torch {torch.__version__} "
                "(its dynamo cannot trace a hook on an intermediate tensor, or its custom operators cannot be declared "
                "side effects); the compiled forwards' inputs are recorded"))

    def _watch_recomputed(self, name: str, module: nn.Module, x: torch.Tensor | None) -> None:
        """A recomputation during backward of a forward that ran without grad (reentrant checkpoint); a
        compiled one's gradient is hooked in its graph."""
        if compiled.relayed() or x is None or not x.is_floating_point() or name in self._faults.skipped:
            return
        with self._faults.guard("watching an input gradient", self.run.directory):
            step = self._forward.step if self._per_forward else self._step
            self._gradients.watch_recomputed(step, name, x, self._axes.resolve(name, module, x.shape).dim)

    def _gradient_arrived(self, layer: str, grad: torch.Tensor) -> None:
        """From a compiled backward pass (perhaps on autograd's device thread): ``layer``'s input gradient, kept
        for the step now open, or in per-forward mode for the step of the one forward awaiting it (none where
        several forwards of the layer await theirs: which is which cannot be told)."""
        step = self._gradients.awaited_forward(layer) if self._per_forward else self._step
        if step is not None:
            self._gradients.arrived(step, layer, grad)

    def _take_gradient(self, step: int, layer: str, partial: Partial) -> None:
        """From the backward pass: ``layer``'s input gradient at ``step``, kept with that step's records."""
        key = (GRAD_SOURCE, layer)
        with self._lock:
            if self._per_forward:
                self._held_gradients.setdefault(step, {}).setdefault(key, []).append(partial)
            elif step == self._step:
                self._step_partials[key].append(partial)

    def _write_held_gradients(self) -> None:
        """Per-forward mode: write the input gradients of finished forwards as records of their steps (lock held)."""
        held, self._held_gradients = self._held_gradients, {}
        for step in sorted(held):
            self._steps.write(step, held[step])

    # -- steps and probes --------------------------------------------------------
    def _close_merged_step(self) -> None:
        """Write the open step: every training forward since the last step ended (lock held)."""
        partials, self._step_partials = self._step_partials, defaultdict(list)
        if self._counting:
            self._steps.write(self._step, partials)

    def _rank_settings(self) -> dict:
        """How this rank records, compared across ranks at their first exchange (anything that changes what a
        merged row means)."""
        def described(plan: schedule.Schedule) -> Any:
            try:
                return plan.describe()
            except Exception:  # noqa: BLE001 - a user's schedule: its name will do
                return str(plan)

        config = self.settings
        return {
            "every": described(self.schedule), "layers": list(self.layers), "sample_size": config.sample_size,
            "sketch_channels": config.sketch_channels, "outputs": config.outputs, "channel_dim": repr(config.channel_dim),
            "step": "optimizer" if self.optimizer is not None else config.step,
            "probe": None if self._probe is None else described(self._probe.schedule),
        }

    def _maybe_probe(self, step: int) -> None:
        """Run the probe at the start of ``step`` if it is a probe step and its probe has not run yet."""
        if self._probe is None or self._faults.stopped or not self._scheduled(self._probe.schedule, step) or self._probed == step:
            return
        self._probed = step
        self._run_probe()

    def _run_probe(self) -> None:
        """Run the probe's halves as sources ``probe_a``/``probe_b``, then pool them as ``probe``."""
        forward = self._forward
        context.set_probe_owner(self)
        forward.active = True
        try:
            model = context.unwrap_compiled(self.model)  # eagerly, inside a compiled forward too
            with preserved(model), context.autocast_as(self._autocast):
                for source in self._probe.run_halves(model):
                    forward.source = source
        finally:
            context.set_probe_owner(None)
            forward.active, forward.source = False, "train"
        partials = forward.partials
        first, second = HALVES
        for (source, name), parts in list(partials.items()):
            if source == first:
                partials[("probe", name)] = parts + partials.get((second, name), [])
        if not self._per_forward:  # merged modes: the probe's records join the open step
            with self._lock:
                for key, parts in forward.take().items():
                    self._step_partials[key].extend(parts)


def _versions() -> dict[str, str]:
    from covshift import __version__

    return {"covshift": __version__, "torch": torch.__version__, "python": platform.python_version()}
