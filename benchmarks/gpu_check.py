"""covshift on a GPU: the same summaries as the CPU, no host sync per step, and what recording costs.

1. Summaries of the same tensors on the device and on the CPU agree (float32,
   and bfloat16 activations as autocast produces them).
2. A ResNet training loop runs with covshift attached (every=1 and the
   defaults, input gradients) under ``torch.cuda.set_sync_debug_mode("error")`` on every step
   that does not flush: a host sync inside covshift would raise.
3. Step time with covshift (every=1, the defaults, every=1 with input
   gradients) against the plain step, side by side in one run, and the peak
   device memory it adds.

``--compile`` runs the loop through ``torch.compile(model, mode=--compile-mode)``
(covshift's hooks then run from inside the compiled graph) and says how many
steps each configuration recorded; ``--compile-mode reduce-overhead`` tries CUDA
graphs.

On a machine without CUDA, ``--device cpu`` runs the same checks (the sync check
is CUDA's own and is skipped), so CI keeps the script working:

    .venv/bin/python benchmarks/gpu_check.py                       # on a GPU: ResNet-50, batch 64
    .venv/bin/python benchmarks/gpu_check.py --device cpu --model resnet18 --batch-size 2 --image-size 32 --steps 3
    .venv/bin/python benchmarks/gpu_check.py --compile                  # the same, compiled
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import covshift
from covshift.summary.finalize import finalize
from covshift.summary.summarize import Summarizer


def same_summaries(device: torch.device) -> float:
    """Worst relative difference between device and CPU summaries of the same tensors."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape, dim in (((64, 256, 14, 14), 1), ((128, 2048), 1), ((8, 77, 512), -1)):
        x = torch.randn(shape, generator=gen) * 3 + 1
        for dtype in (torch.float32, torch.bfloat16):
            values = x.to(dtype)
            cpu = finalize([Summarizer().summarize(values, dim)])
            dev = finalize([Summarizer().summarize(values.to(device), dim)])
            for a, b in ((cpu.stats, dev.stats), (cpu.quantiles, dev.quantiles), (cpu.binmeans, dev.binmeans)):
                b = b.cpu().double()
                scale = a.double().abs().clamp_min(1e-6)
                worst = max(worst, float(((a.double() - b).abs() / scale).max()))
    return worst


def train(model, batches, optimizer, device, *, tracker_options=None, sync_check=False, forward=None, warm_up=0
          ) -> tuple[list[float], int, int, int]:
    """Per-step milliseconds, the peak device memory, the recorded training steps and the steps with input
    gradients recorded of a training loop,
    optionally with covshift; ``forward`` (default: the model) runs the batches, the first ``warm_up`` of
    them untimed and unchecked (a compiled forward compiles there)."""
    forward = model if forward is None else forward
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    tracker = None if tracker_options is None else covshift.attach(model, optimizer=optimizer, **tracker_options)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index, (x, y) in enumerate(batches):
        flushes = tracker is not None and len(tracker.run._pending) + 1 >= tracker.run.flush_every
        checking = sync_check and device.type == "cuda" and not flushes and index >= warm_up
        start = time.perf_counter()
        if checking:
            torch.cuda.set_sync_debug_mode("error")
        try:
            with autocast:
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            if checking:
                torch.cuda.set_sync_debug_mode("default")
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warm_up:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    recorded = {"train": 0, "grad": 0}
    if tracker is not None:
        sources = tracker.detach().sources()
        recorded = {source: int(sources.loc[source, "steps"]) if source in sources.index else 0 for source in recorded}
    return times, peak, recorded["train"], recorded["grad"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet50", choices=("resnet50", "resnet18"))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="steps per configuration (default 30)")
    parser.add_argument("--compile", action="store_true", help="train through torch.compile(model)")
    parser.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                        help="torch.compile's mode with --compile (default: default)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend with --compile (default: inductor; aot_eager for a quick check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {args.model}, batch {args.batch_size}, "
          f"{args.image_size}px, {args.steps} steps per configuration"
          + (f", torch.compile {args.compile_backend} mode {args.compile_mode}" if args.compile else ""))

    print(f"summaries on {device} vs CPU, worst relative difference: {same_summaries(device):.2e}")

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = [
        (torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device),
         torch.randint(0, 10, (args.batch_size,), device=device))
        for _ in range(args.steps)
    ]
    configs = {"plain": None, "every=1": {"every": 1, "flush_every": 10**6}, "defaults": {},
               "gradients": {"every": 1, "flush_every": 10**6, "gradients": True}}
    results = {}
    for name, options in configs.items():
        mode = {"mode": args.compile_mode} if args.compile_backend == "inductor" else {}
        forward = torch.compile(model, backend=args.compile_backend, **mode) if args.compile else model
        results[name] = train(model, batches[:2] + batches, optimizer, device, tracker_options=options,
                              sync_check=True, forward=forward, warm_up=2)
    plain_ms = statistics.median(results["plain"][0])
    for name, (times, peak, recorded, graded) in results.items():
        ratio = statistics.median(times) / plain_ms
        memory = f", peak memory +{(peak - results['plain'][1]) / 2**20:.0f} MiB" if device.type == "cuda" else ""
        steps = f", {recorded} steps recorded" if configs[name] is not None else ""
        steps += f", {graded} with input gradients" if configs[name] and configs[name].get("gradients") else ""
        print(f"  {name:<9} median step {statistics.median(times):8.2f} ms = {ratio:.3f}x plain{memory}{steps}")
    sync = "no host sync outside flushes" if device.type == "cuda" else "sync check skipped (CUDA only)"
    print(f"sync check: {sync}")


if __name__ == "__main__":
    main()
