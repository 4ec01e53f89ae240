"""Several processes (``torch.distributed``): one run for the whole job, the union over ranks.

Each rank's hooks summarize its own slice of the batch as usual. When a step
that records closes (a recorded step's optimizer step, ``tracker.step()``, or
the end of a recorded forward), every rank takes part in one exchange:

1. ``all_gather_object`` of the step's layout: one small tuple per record
   (source, name, channels, sample width, dtype, layer type, channel dim), so
   ranks may have called different layers, or a layer a different number of
   times, in that step;
2. ``gather`` to rank 0 of the step's partials packed into one flat byte
   tensor, padded to the longest rank's length: per channel, count, nonfinite
   (int64), mean, m2, min, max (float64) and the rank's value sample in its own
   dtype (float32 unless the input was float64).

A rank's sample is capped at ``ceil(sample_size / ranks)`` values per channel,
so the pooled sample is no larger than one process's and a recorded step costs
each rank at most ``48 + 4 * ceil(sample_size / ranks)`` bytes per channel (a
layout tuple per record besides). Below the cap every value is sent: when
``sample_size`` covers the channel's values in the whole job, quantiles are
exact, as in one process. Rank 0
merges the ranks' partials exactly as the core merges the calls of one step
(:func:`covshift.summary.merge`: counts, moments by Chan's rule and extrema
exact, samples pooled) and alone writes the run. The other ranks write
nothing, anywhere: their ``tracker.run`` is a :class:`NonWriterRun`, a
:class:`~covshift.run.Run` with no directory.

Nothing is communicated on steps that do not record. The collectives run under
the process group's own timeout; when one fails (a rank died, left the loop, or
is at another step) covshift raises :class:`DistributedError` on that rank
instead of waiting, and takes part in no further exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable, JoinHook

from covshift.store.run import Run
from covshift.store.writer import DEFAULT_FLUSH_EVERY, DEFAULT_MEMORY_BUDGET, DEFAULT_SKETCH_CHANNELS, check_settings
from covshift.summary.summarize import Partial

#: Fields per channel besides the sample: count, nonfinite, mean, m2, min, max (8 bytes each).
_MOMENTS = 6
#: Sample dtypes by name (the summarizer keeps float64 and turns everything else into float32).
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DistributedError(RuntimeError):
    """An exchange of records between ranks failed: the job's ranks are no longer in step."""


class RanksDisagree(Exception):
    """The ranks recorded differently (settings at the first exchange, or step numbers at any): every rank
    finds it at the same exchange, and none takes part in another."""


def detect(group: Any = None) -> Ranks | None:
    """The ranks to merge records across, or None for a single process.

    Args:
        group: None for the default process group when ``torch.distributed`` is
            initialized with more than one process; a ``ProcessGroup`` to merge
            across that group; ``False`` to record each rank on its own.

    Raises:
        ValueError: ``group`` is given but ``torch.distributed`` is not initialized.
    """
    if group is False:
        return None
    initialized = dist.is_available() and dist.is_initialized()
    if group is None:
        if not initialized or dist.get_world_size() < 2:
            return None
        group = dist.group.WORLD
    elif not initialized:
        raise ValueError(
            f"attach(group={group!r}) needs torch.distributed initialized (init_process_group) first"
        )
    return Ranks(group)


class Ranks:
    """The ranks of one process group that record into one run; rank 0 of the group writes it."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.writer = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
        backend = str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.broken = False  # an exchange failed, or this rank left with an error: no more collectives
        self.checked = False  # the ranks' settings were compared (at the first exchange)

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the run (rank 0 of the group)."""
        return self.rank == 0

    def describe(self) -> dict:
        """What ``meta.json`` says about the job."""
        return {"world_size": self.size, "backend": str(dist.get_backend(self.group))}

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (the step a resumed run goes on at)."""
        objects = [value]
        dist.broadcast_object_list(objects, src=self.writer, group=self.group)
        return objects[0]

    def abandon(self) -> None:
        """This rank leaves with an error: it takes part in no more exchanges (the others will fail theirs)."""
        self.broken = True

    def gather(
        self,
        step: int,
        merged: dict[tuple[str, str], Partial],
        kinds: dict[str, tuple[str, int | None]],
        cap: int,
        settings: dict | None = None,
    ) -> dict[tuple[str, str], list[Partial]]:
        """Every rank's records of ``step``, one partial per rank that took each, on rank 0; an empty dict on the
        others. The caller merges them (:func:`covshift.summary.merge`) as it merges the calls of one step.

        Every rank of the group must call this for the same steps, in the same
        order. ``kinds`` (record name -> layer type, channel dim) gains the
        records only other ranks took. ``cap``: the sample values per channel of
        one record in all ranks together (``sample_size``); each rank sends at
        most ``ceil(cap / ranks)`` of them.

        Every exchange carries ``step``, and the first one ``settings`` (how the
        rank records: schedule, layers, sample size, sketch …), so ranks that
        record different steps or differently find it together, before any of
        their records is merged.

        Raises:
            DistributedError: a collective failed or timed out (the cause is chained).
            RanksDisagree: the ranks' steps or settings differ; it is raised on every rank at this same
                exchange, and the ranks exchange nothing more.
        """
        if self.broken:
            return {}
        share = -(-cap // self.size)
        local = {key: _capped(partial, share) for key, partial in merged.items()}
        layout = [
            (source, name, p.count.shape[0], p.sample.shape[1], str(p.sample.dtype).removeprefix("torch."),
             *kinds.get(name, ("?", None)))
            for (source, name), p in local.items()
        ]
        length = sum(_nbytes(channels, width, dtype) for _, _, channels, width, dtype, *_ in layout)
        layouts: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(layouts, (step, None if self.checked else settings, layout), group=self.group)
            problem = _disagreement([header[:2] for header in layouts], check_settings=not self.checked)
            if problem is not None:
                self.broken = True  # every rank found the same: none waits for another exchange
                raise RanksDisagree(problem)
            self.checked = True
            layouts = [rank_layout for *_, rank_layout in layouts]
            longest = max(sum(_nbytes(c, w, d) for _, _, c, w, d, *_ in rank_layout) for rank_layout in layouts)
            if longest == 0:  # no rank took a record: every rank knows it, nothing more to send
                return {}
            flat = torch.zeros(longest, dtype=torch.uint8, device=self.device)
            if length:
                flat[:length] = _pack(local.values(), self.device)
            received = [torch.empty_like(flat) for _ in range(self.size)] if self.is_writer else None
            dist.gather(flat, received, dst=self.writer, group=self.group)
        except RanksDisagree:
            raise
        except Exception as err:  # noqa: BLE001 - any backend failure: say what covshift was doing
            self.broken = True
            raise DistributedError(
                f"covshift: exchanging the records of step {step} between the {self.size} ranks failed on rank "
                f"{self.rank} ({type(err).__name__}: {err}). A rank has died or left the training loop, or "
                "the ranks are not at the same recorded step: every rank must attach() alike, take the same "
                "optimizer steps (or training forwards) and detach()"
            ) from err
        if not self.is_writer:
            return {}
        pooled: dict[tuple[str, str], list[Partial]] = {}
        for rank_layout, data in zip(layouts, received):
            offset = 0
            for source, name, channels, width, dtype, kind, dim in rank_layout:
                size = _nbytes(channels, width, dtype)
                pooled.setdefault((source, name), []).append(
                    _unpack(data[offset : offset + size], channels, width, _DTYPES[dtype])
                )
                offset += size
                if kind != "?":
                    kinds.setdefault(name, (kind, dim))
        return pooled


class NonWriterRun(Run):
    """``tracker.run`` (and what ``detach()`` returns) on the ranks that do not write the run.

    A :class:`~covshift.run.Run` with no directory (``directory`` is None): it
    creates no file, ``flush()`` and ``log()`` do nothing (rank 0 logs the
    job's curves), ``meta`` holds the configuration, and reading the records
    (``stats()``, ``sources()``, ``layers``, ``curves()``, ``save()``) raises a RuntimeError
    that says they are on rank 0 of the process group.

    >>> run = NonWriterRun({"name": "job"}, rank=1, size=2)
    >>> run, run.directory
    (Run(no directory: rank 1 of 2 writes nothing, rank 0 writes the run), None)
    """

    def __init__(
        self,
        meta: dict,
        *,
        rank: int,
        size: int,
        store: str | Path | None = None,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        sketch_channels: int | None = DEFAULT_SKETCH_CHANNELS,
    ) -> None:
        check_settings(flush_every=flush_every, memory_budget=memory_budget, sketch_channels=sketch_channels)
        self.directory = None  # type: ignore[assignment]
        self.flush_every, self.memory_budget = flush_every, memory_budget
        self._meta = {**meta, "layers": []}
        self._rank, self._size = rank, size
        self._store = store

    def flush(self) -> None:
        """Nothing to write."""

    def resume_at(self, step: int) -> None:
        """Nothing stored here: rank 0 replaces the steps of the run it resumed."""

    def log(self, step: int, **values: float) -> None:
        """Nothing is stored: rank 0 logs the job's curves (so a loop may call this on every rank)."""

    def append_table(self, name: str, rows: list[dict]) -> None:
        """Nothing is stored: measurements beside the records are rank 0's to keep."""

    def table(self, name: str) -> Any:
        raise self._elsewhere()

    def notices(self) -> Any:
        raise self._elsewhere()

    def add_layer(self, name: str, type_name: str, channels: int, channel_dim: int | None) -> None:
        raise self._elsewhere()

    def append(self, step: int, source: str, layer: str, partial: Partial) -> None:
        raise self._elsewhere()

    def end_step(self) -> None:
        raise self._elsewhere()

    @property
    def name(self) -> str:
        return self._meta.get("name") or f"rank {self._rank} of {self._size}"

    @property
    def layers(self) -> Any:
        raise self._elsewhere()

    def stats(self, source: str | None = None, **filters: Any) -> Any:
        raise self._elsewhere()

    def sources(self) -> Any:
        raise self._elsewhere()

    def curves(self) -> Any:
        raise self._elsewhere()

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        raise self._elsewhere()

    def __repr__(self) -> str:
        return f"Run(no directory: rank {self._rank} of {self._size} writes nothing, rank 0 writes the run)"

    def _repr_html_(self) -> str:
        return repr(self)

    def _elsewhere(self) -> RuntimeError:
        where = f" to {self._store}" if self._store is not None else ""
        return RuntimeError(
            f"covshift: rank {self._rank} of {self._size} holds no records: rank 0 of the process group merges "
            f"every rank's records and writes the run{where}; read it there "
            "(e.g. under `if torch.distributed.get_rank() == 0:`)"
        )


class JoinableSteps(Joinable):
    """Lets ``torch.distributed.algorithms.Join`` close covshift's steps on ranks that ran out of batches.

    Inside ``Join([ddp_model, tracker.joinable])`` a rank whose loader is
    exhausted keeps shadowing the others' collectives: for each iteration they
    still run (one forward of the DDP model), this closes one step on the joined
    rank, with no records, so it takes part in the recorded steps' exchanges.
    Hence one DDP forward per optimizer step, and the tracker after the model.
    """

    def __init__(self, ranks: Ranks, close_step: Callable[[], None]) -> None:
        super().__init__()
        self._ranks = ranks
        self._close_step = close_step

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _ShadowSteps(self._close_step)

    @property
    def join_device(self) -> torch.device:
        return self._ranks.device

    @property
    def join_process_group(self) -> Any:
        return self._ranks.group


class _ShadowSteps(JoinHook):
    def __init__(self, close_step: Callable[[], None]) -> None:
        self._close_step = close_step

    def main_hook(self) -> None:
        self._close_step()


def _disagreement(headers: list[tuple[int, dict | None]], *, check_settings: bool) -> str | None:
    """What differs between the ranks' ``(step, settings)`` headers of one exchange, in words; None: nothing."""
    steps = [step for step, _ in headers]
    if len(set(steps)) > 1:
        where = ", ".join(f"step {step} on rank {rank}" for rank, step in enumerate(steps))
        return (f"the ranks closed different steps at the same exchange ({where}): they count steps differently "
                "(set_step() on some ranks, or a schedule of their own that differs)")
    if not check_settings:
        return None
    settings = [config or {} for _, config in headers]
    differing = [key for key in sorted(set().union(*settings)) if len({repr(s.get(key)) for s in settings}) > 1]
    if not differing:
        return None
    return "they attached differently: " + "; ".join(
        f"{key}: " + ", ".join(f"rank {rank} {s.get(key)!r}" for rank, s in enumerate(settings)) for key in differing
    )


def _capped(partial: Partial, cap: int) -> Partial:
    """``partial`` with at most ``cap`` sample values per channel (evenly spaced, so each call keeps its share)."""
    width = partial.sample.shape[1]
    if width <= cap:
        return partial
    keep = torch.linspace(0, width - 1, cap, dtype=torch.float64).round().long().to(partial.sample.device)
    return Partial(
        count=partial.count, mean=partial.mean, m2=partial.m2, min=partial.min, max=partial.max,
        nonfinite=partial.nonfinite, sample=partial.sample[:, keep],
    )


def _nbytes(channels: int, width: int, dtype: str) -> int:
    """Bytes one packed partial takes: six 8-byte fields per channel, then the sample in its own dtype."""
    return channels * (_MOMENTS * 8 + width * _DTYPES[dtype].itemsize)


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(-1)


def _pack(partials: Any, device: torch.device) -> torch.Tensor:
    """Partials as one flat byte tensor: per partial its per-channel fields (count, nonfinite as int64; mean,
    m2, min, max as float64: exact), then its sample, row-major, in the sample's own dtype."""
    pieces = []
    for p in partials:
        pieces.append(_bytes(torch.stack([p.count, p.nonfinite]).long()))
        pieces.append(_bytes(torch.stack([p.mean.double(), p.m2.double(), p.min.double(), p.max.double()])))
        pieces.append(_bytes(p.sample))
    return torch.cat([piece.to(device) for piece in pieces])


def _unpack(data: torch.Tensor, channels: int, width: int, dtype: torch.dtype) -> Partial:
    """The inverse of :func:`_pack` for one partial (``data``: its bytes)."""
    data = data.clone()  # a fresh, aligned storage to view as wider types
    ints = data[: 16 * channels].view(torch.int64).view(2, channels)
    floats = data[16 * channels : 48 * channels].view(torch.float64).view(4, channels)
    sample = data[48 * channels :].view(dtype).view(channels, width)
    return Partial(
        count=ints[0], nonfinite=ints[1], mean=floats[0], m2=floats[1],
        min=floats[2].to(dtype), max=floats[3].to(dtype), sample=sample,
    )
