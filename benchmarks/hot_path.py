"""Where recording time goes: the pieces of the hot path, on the reference CNN's layer inputs.

Takes the inputs of the 7 convolutions of the reference CNN (batch 128) and
times, warm, per training step (all 7 layers together; median of repeats):
the whole `Summarizer.summarize`, its pieces, the alternatives that were
measured and rejected, and `finalize` of one step's summaries (what covshift
runs when a recorded step ends), with the row sort on its own and the rank
bins that replace it for full rows.

    .venv/bin/python benchmarks/hot_path.py --repeats 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from covshift.experiments.models import reference_pair
from covshift.record.layers import select_layers
from covshift.summary.finalize import finalize
from covshift.summary.row_statistics import rank_bins, zero_count
from covshift.summary.summarize import Summarizer, _reduce, _sum_of_squares


def layer_inputs(batch_size: int) -> list[torch.Tensor]:
    """The input of every default layer of the plain reference CNN for one random batch."""
    model, _ = reference_pair(seed=0)
    inputs: list[torch.Tensor] = []
    handles = [
        module.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
        for module in select_layers(model).values()
    ]
    with torch.no_grad():
        model(torch.rand(batch_size, 1, 28, 28))
    for handle in handles:
        handle.remove()
    return inputs


def median_ms(repeats: int, work: Callable[[], object]) -> float:
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats of each piece (default 50)")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    xs = layer_inputs(args.batch_size)
    views = [x.view(x.shape[0], x.shape[1], -1) for x in xs]
    summarizer = Summarizer()
    partials = [summarizer.summarize(x, 1) for x in xs]
    partials_512 = [Summarizer(512).summarize(x, 1) for x in xs]
    sample = torch.cat([p.sample for p in partials])
    pieces: dict[str, Callable[[], object]] = {
        "Summarizer.summarize, all layers": lambda: [summarizer.summarize(x, 1) for x in xs],
        "  sums": lambda: [_reduce(v, torch.sum) for v in views],
        "  sums of squares (vector_norm, no squared copy)": lambda: [_sum_of_squares(v) for v in views],
        "  min and max": lambda: [(_reduce(v, torch.amin), _reduce(v, torch.amax)) for v in views],
        "  sample (torch.take at fixed positions)": lambda: [summarizer._sample(v) for v in views],
        "rejected: the four reductions over (0, 2, 3)": lambda: [
            (x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.amin((0, 2, 3)), x.amax((0, 2, 3))) for x in xs
        ],
        "rejected: the four, contiguous axis first always": lambda: [
            (v.sum(2).sum(0), (v * v).sum(2).sum(0), v.amin(2).amin(0), v.amax(2).amax(0)) for v in views
        ],
        "rejected: exact zero count (count_nonzero)": lambda: [torch.count_nonzero(x, (0, 2, 3)) for x in xs],
        "rejected: torch.aminmax over the spatial axis": lambda: [torch.aminmax(v, dim=2) for v in views],
        "finalize one step (sample_size 1024)": lambda: finalize(partials),
        "  its row sort alone (185 x 1024, numpy)": lambda: np.sort(sample.numpy(), axis=1),
        "  its rank bins instead (halves sorted, 5 merge stages)": lambda: rank_bins(sample.numpy().copy()),
        "  the same values sorted as rows of 512 (numpy)": lambda: np.sort(sample.numpy().reshape(-1, 512), axis=1),
        "  rejected: torch.sort of the rows": lambda: torch.sort(sample, dim=1),
        "  zero counts of the rows (uint64 words)": lambda: zero_count(sample.numpy()),
        "  zero counts of the rows (byte sum in int64)": lambda: (sample.numpy() == 0).view(np.uint8).sum(1, dtype=np.int64),
        "finalize one step (sample_size 512)": lambda: finalize(partials_512),
    }
    print(f"reference CNN layer inputs, batch {args.batch_size}: "
          + ", ".join("x".join(map(str, x.shape[1:])) for x in xs))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats")
    print(f"{'piece (per training step, all layers)':<52} {'ms':>8}")
    for name, work in pieces.items():
        ms = median_ms(args.repeats, work)
        print(f"{name:<52} {ms:>8.3f}")


if __name__ == "__main__":
    main()
