"""Gradient ICS (Santurkar et al. 2018, Definition 2.1): how much a layer's gradient moves
because the layers before it were updated.

For layer ``i`` at optimizer step ``t``, on the batch ``(x, y)`` that step trained on::

    G  = ∇_{W_i} L(W_1^t, …, W_k^t; x, y)
    G' = ∇_{W_i} L(W_1^{t+1}, …, W_{i-1}^{t+1}, W_i^t, …, W_k^t; x, y)

and the internal covariate shift of layer ``i`` is ``‖G − G'‖₂`` (with ``cos∠(G, G')``).
``W^{t+1}`` are the weights the user's own optimizer step produced: covshift saves
the weights before the step (an optimizer step pre-hook) and, after it (a post-hook),
runs one forward and backward per measured layer through
:func:`torch.func.functional_call` with new weights before layer ``i`` and old ones
from ``i`` on. ``G`` is computed the same way with all old weights, rather than read
from ``p.grad``, so that gradient clipping, accumulation, AMP loss scaling or a
dropout mask of the user's forward cannot make ``G`` and ``G'`` differ for reasons
that are not ICS: every pass of one measurement replays the same RNG state.

Nothing of the user's training changes: no second optimizer step, the optimizer's
state is not touched, the passes read copies of the buffers (BatchNorm running
statistics do not move), ``p.grad`` is never written (``torch.autograd.grad``),
the RNG state is put back, and covshift trackers on the same model ignore the
passes. A failure warns once and switches measurement off; it never raises
into ``optimizer.step()``.

"Layers" are the modules that own parameters directly, in registration order
(``model.named_modules()``), which is taken as the forward order; a layer's
``W_i`` is all its own parameters together (weight and bias). The first layer has
no earlier layer: its ICS is zero by definition and is recorded without a pass.

Cost: ``k + 1`` forward/backward passes per measured step for ``k`` layers (see
``benchmarks/gradient_ics.py`` and ``docs/performance.md``); off unless you create
a :class:`GradientICS`.

>>> import torch, covshift.gradients as cg
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
>>> with cg.GradientICS(model, opt, torch.nn.functional.cross_entropy, every=1) as ics:
...     for _ in range(3):
...         opt.zero_grad()
...         torch.nn.functional.cross_entropy(model(x), y).backward()
...         ics.batch(x, y)  # the batch this step trains on
...         opt.step()
>>> frame = ics.frame()
>>> list(frame.columns)
['step', 'layer', 'grad_norm', 'ics_norm', 'relative', 'cosine']
>>> frame.groupby("layer", sort=False)["step"].count().to_dict()
{'0': 3, '2': 3}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from covshift.checks import check_int
from covshift.faults import CovshiftWarning
from covshift.record import context
from covshift.science.measurement import Measurement
from covshift.store.files import read_jsonl

#: The file a measurement appends to, in the run directory (or any directory) it is given.
GRADIENTS_FILE = "gradients.jsonl"
COLUMNS = ("step", "layer", "grad_norm", "ics_norm", "relative", "cosine")


class GradientICSWarning(CovshiftWarning):
    """Gradient ICS measurement failed and was switched off; training goes on untouched."""


class GradientICS(Measurement):
    """Measure gradient ICS every ``every`` optimizer steps of ``optimizer``.

    Args:
        model: the network ``optimizer`` trains.
        optimizer: a ``torch.optim.Optimizer`` (it needs ``register_step_pre_hook``).
        loss_fn: ``loss_fn(output, target) -> scalar loss``, the loss the training uses.
        every: measure steps ``0, every, 2·every, …`` (counted as optimizer steps from 0).
        directory: where to append ``gradients.jsonl`` when measuring alone (``None``: rows in
            memory only); added to a tracker (``tracker.add(GradientICS(...))``, the way to use
            it) the rows go into its run and its steps are the tracker's.
        layers: names of the layers to measure (default: every module owning parameters).

    Before each ``optimizer.step()`` of a measured step, hand over that step's batch
    with :meth:`batch`; a measured step without one is skipped (with one warning).
    """

    table = "gradients"
    warning = GradientICSWarning

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., torch.Tensor],
        every: int = 100,
        directory: str | Path | None = None,
        layers: Sequence[str] | None = None,
    ) -> None:
        check_int("every", every)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer with step hooks (torch >= 2.0), got {type(optimizer).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(output, target), got {type(loss_fn).__name__}")
        super().__init__(model, optimizer, directory)
        self.loss_fn, self.every = loss_fn, every
        owned = {name: [(f"{name}.{p}" if name else p) for p, _ in module.named_parameters(recurse=False)]
                 for name, module in model.named_modules()}
        owned = {name: params for name, params in owned.items() if params}
        if layers is not None:
            unknown = [name for name in layers if name not in owned]
            if unknown:
                raise ValueError(f"layers {unknown} own no parameters of the model; layers with parameters: {list(owned)}")
        #: Every layer with parameters, in order (earlier layers count even when not measured).
        self._all_layers = list(owned.items())
        self.layers = list(layers) if layers is not None else list(owned)
        self.rows: list[dict[str, Any]] = []
        self._batch: tuple[Any, Any] | None = None
        self._old: dict[str, torch.Tensor] | None = None
        self._stopped = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    # -- public ------------------------------------------------------------------
    def batch(self, inputs: Any, target: Any) -> None:
        """The batch the coming optimizer step trains on: ``model(inputs)`` (``model(*inputs)``
        for a tuple) and ``loss_fn(output, target)``. Only references are kept."""
        self._batch = (inputs, target)

    def frame(self) -> Any:
        """The measurements as a tidy DataFrame: ``step, layer, grad_norm, ics_norm, relative, cosine``."""
        return gradient_frame(self.rows)

    def close(self) -> None:
        """Remove the optimizer hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._old = self._batch = None

    def __enter__(self) -> GradientICS:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GradientICS(every={self.every}, layers={len(self.layers)}, rows={len(self.rows)})"

    # -- hooks -------------------------------------------------------------------
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        self._old = None
        self._note_step()
        step = self._taking
        if self._stopped or step % self.every:
            return
        if self._batch is None:
            self._warn("no-batch", f"gradient ICS skipped step {step}: call ics.batch(inputs, target) before "
                                   "optimizer.step() on measured steps")
            return
        try:
            self._old = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        except Exception as err:  # noqa: BLE001 - never raise into the user's step
            self._fail(err)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        step = self._count_step()
        old, batch = self._old, self._batch
        self._old = self._batch = None
        if old is None or batch is None or self._stopped:
            return
        try:
            rows = self._measure(step, old, batch)
        except Exception as err:  # noqa: BLE001 - never raise into the user's step
            self._fail(err)
            return
        self.rows.extend(rows)
        try:
            self._store(rows)
        except OSError as err:
            self._fail(err)

    # -- the measurement ---------------------------------------------------------
    def _measure(self, step: int, old: dict[str, torch.Tensor], batch: tuple[Any, Any]) -> list[dict[str, Any]]:
        new = {name: p.detach() for name, p in self.model.named_parameters()}
        buffers = {name: b.detach() for name, b in self.model.named_buffers()}
        devices = sorted({t.device.index or 0 for t in new.values() if t.device.type == "cuda"})
        owner = context.probe_owner()
        context.set_probe_owner(self)  # covshift trackers ignore these forwards
        try:
            with torch.random.fork_rng(devices=devices):
                rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
                g = self._gradients(old, old, buffers, batch, rng, self.layers)
                rows, earlier = [], set()
                for name, params in self._all_layers:
                    if name in self.layers:
                        if not earlier:  # no earlier layer: G' = G
                            g_prime = g[name]
                        else:
                            mixed = {p: (new[p] if p in earlier else old[p]) for p in old}
                            g_prime = self._gradients(mixed, old, buffers, batch, rng, [name])[name]
                        rows.append(_row(step, name, g[name], g_prime))
                    earlier.update(params)
        finally:
            context.set_probe_owner(owner)
        return rows

    def _gradients(
        self,
        params: dict[str, torch.Tensor],
        old: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        batch: tuple[Any, Any],
        rng: tuple[torch.Tensor, list[torch.Tensor]],
        layers: list[str],
    ) -> dict[str, torch.Tensor]:
        """Each of ``layers``' flattened gradient at ``params``, on ``batch``, from the RNG state ``rng``."""
        torch.set_rng_state(rng[0])
        for device, state in enumerate(rng[1]):
            torch.cuda.set_rng_state(state, device)
        owned = dict(self._all_layers)
        wanted = [p for layer in layers for p in owned[layer]]
        leaves = {p: params[p].clone().requires_grad_(True) for p in wanted}
        values: dict[str, torch.Tensor] = {p: t for p, t in params.items()}
        values.update(leaves)
        values.update({name: b.clone() for name, b in buffers.items()})  # running stats move on copies
        inputs, target = batch
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        with torch.enable_grad():
            output = torch.func.functional_call(self.model, values, args, strict=False, tie_weights=True)
            loss = self.loss_fn(output, target)
            grads = torch.autograd.grad(loss, [leaves[p] for p in wanted], allow_unused=True)
        by_param = {p: (g if g is not None else torch.zeros_like(leaves[p])) for p, g in zip(wanted, grads)}
        return {layer: torch.cat([by_param[p].detach().reshape(-1).double() for p in owned[layer]])
                for layer in layers}

    def _fail(self, err: BaseException) -> None:
        self._stopped = True
        self._warn("failed", f"gradient ICS failed at step {self.step} and is off for the rest of training "
                             f"(training is unaffected): {type(err).__name__}: {err}")


def _row(step: int, layer: str, g: torch.Tensor, g_prime: torch.Tensor) -> dict[str, Any]:
    grad_norm = float(torch.linalg.vector_norm(g))
    ics = float(torch.linalg.vector_norm(g - g_prime))
    denom = float(torch.linalg.vector_norm(g) * torch.linalg.vector_norm(g_prime))
    cosine = float(torch.dot(g, g_prime)) / denom if denom > 0 else math.nan
    return {"step": step, "layer": layer, "grad_norm": grad_norm, "ics_norm": ics,
            "relative": ics / grad_norm if grad_norm > 0 else math.nan, "cosine": cosine}


def gradient_frame(rows: Any) -> Any:
    """Gradient ICS rows (dicts, or a run's ``gradients`` table) as :meth:`GradientICS.frame` gives them."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["step"] = frame["step"].astype("int64")
    layers = list(dict.fromkeys(frame["layer"]))
    frame["layer"] = pd.Categorical(frame["layer"], categories=layers)
    return frame


def load_gradient_ics(directory: str | Path) -> Any:
    """The gradient ICS a run directory holds, as :meth:`GradientICS.frame` gives it.

    A last line cut short by a crash is dropped; a missing file is an error that says how to record one.
    """
    path = Path(directory) / GRADIENTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: record gradient ICS with "
                                f"covshift.science.gradient_ics.GradientICS(..., directory={str(directory)!r})")
    return gradient_frame(read_jsonl(path, ValueError))
