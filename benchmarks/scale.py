"""A torchvision ResNet-50 run of 100,000 steps with the defaults: size, time and memory.

Builds the run through the real recording path: ``covshift.attach(resnet50,
step="manual")`` with the default schedule and settings, ``tracker.step()``
for each of the 100,000 steps, and a forward only on the steps the schedule
records (there is no training between them, only a small random change of the
weights, so the layer inputs drift). Inputs are small (``--image`` pixels):
spatial size does not change a layer's channel count, which sets the store's
size. Then, each in a fresh process that reports its own peak RSS:

- ``covshift.drift(run, metric="all")``,
- ``covshift report RUN -o OUT``,
- ``covshift stats RUN --layer NAME``.

``--compare-steps N`` also records the first N steps at full detail
(``sketch_channels=None``) beside the compact default, from the same forwards,
and compares their layer-level drift against the null noise floor
(:func:`covshift.noise.null_distribution`, 95th percentile, on a batch of the
training batch size).

    .venv/bin/python benchmarks/scale.py                      # the targets
    .venv/bin/python benchmarks/scale.py --compare-steps 200  # compact vs full detail
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision

import covshift
from covshift.science import null_floor as noise

TARGET_BYTES = 2**30
TARGET_SECONDS = 120
TARGET_RSS = 4 * 2**30
TARGET_STATS_SECONDS = 2


def current_rss() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def perturb(model: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    """A small random change of every weight, in proportion to its spread: drift without training."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1:
                noise_ = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise_ * scale * float(parameter.std()))


def record(directory: Path, steps: int, batch: int, image: int, full: Path | None, compare_steps: int) -> dict:
    """Record ``steps`` steps of ResNet-50 with the defaults (and the first ``compare_steps`` at full detail)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().train()
    tracker = covshift.attach(model, step="manual", store=directory, name="resnet50-100k")
    twin = covshift.attach(model, step="manual", store=full, sketch_channels=None, name="full") if full else None
    generator = torch.Generator().manual_seed(1)
    started, forwards, rss = time.perf_counter(), 0, {}
    for step in range(steps):
        if tracker.schedule.records(step):
            perturb(model, generator, 0.02)
            with torch.no_grad():
                model(torch.randn(batch, 3, image, image, generator=generator))
            forwards += 1
        tracker.step()
        if twin is not None:
            twin.step()
            if step + 1 == compare_steps:
                twin.detach()
                twin = None
        if step + 1 in (1_000, 10_000, 100_000, steps):
            rss[step + 1] = current_rss()
    run = tracker.detach()
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in directory.iterdir())
    layers = run.layers
    return {"seconds": seconds, "forwards": forwards, "bytes": size, "rss": rss,
            "layers": len(layers), "channels": int(layers["channels"].sum()), "model": model}


def measured(code: str) -> tuple[float, int, str]:
    """Run ``code`` in a fresh Python; its wall time, peak RSS and output."""
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's resident size at the fork.
    wrapped = (f"{code}\nimport re, sys\nhwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
               "print('RSS', int(hwm.group(1)) * 1024, file=sys.stderr)")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    rss = int(done.stderr.strip().splitlines()[-1].split()[1])
    return seconds, rss, done.stdout


def compare(compact: Path, full: Path, model: torch.nn.Module, batch: int, image: int) -> None:
    """Layer-level drift of the compact run against the full-detail one, in units of the null floor."""
    a = covshift.drift(covshift.load(compact), metric="all")
    b = covshift.drift(covshift.load(full), metric="all")
    steps = sorted(set(b["step"]))
    a = a[a["step"].isin(steps)]
    key = ["step", "layer", "metric"]
    joined = a.assign(layer=a["layer"].astype(str)).merge(b.assign(layer=b["layer"].astype(str)), on=key,
                                                          suffixes=("_compact", "_full"))
    # The null floor: two disjoint random halves of batches the size of the recorded ones, 50 splits.
    layers = covshift.load(full).layers.set_index("layer")
    dims = {name: (None if pd.isna(dim) else int(dim)) for name, dim in layers["channel_dim"].items()}
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if name in dims:
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach().clone())))
    with torch.no_grad():
        model(torch.randn(2 * batch, 3, image, image, generator=torch.Generator().manual_seed(2)))
    for hook in hooks:
        hook.remove()
    null = noise.null_quantiles(noise.null_distribution(inputs, dims, "all", splits=50, size=batch))
    joined = joined.merge(null, on=["layer", "metric"])
    joined["diff"] = (joined["value_compact"] - joined["value_full"]).abs()
    joined["diff_to_floor"] = joined["diff"] / joined["null_q95"]
    print(f"compact (default) vs full detail, {len(steps)} recorded steps of the first {max(steps) + 1}, "
          f"{joined['layer'].nunique()} layers; |difference| / 95th percentile of the null floor:")
    table = joined.groupby("metric")["diff_to_floor"].agg(
        median="median", p95=lambda v: np.nanquantile(v, 0.95), max="max",
        within=lambda v: float((v <= 1).mean()))
    print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    exact = joined[joined["metric"].isin(["mean_shift", "std_ratio", "gaussian_w2"])]
    print(f"moment metrics: max |difference| {exact['diff'].max():.3g} (every channel kept in both)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="training steps (default %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="examples per recorded forward (default %(default)s)")
    parser.add_argument("--image", type=int, default=64, help="input height and width (default %(default)s)")
    parser.add_argument("--compare-steps", type=int, default=0,
                        help="also record the first N steps at full detail and compare (default: no)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run here (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp) / "run"
        full = Path(tmp) / "full" if args.compare_steps else None
        print(f"ResNet-50 (torchvision, random init), {args.steps:,} steps, defaults, "
              f"batch {args.batch} at {args.image}x{args.image}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        made = record(directory, args.steps, args.batch, args.image, full, args.compare_steps)
        print(f"recorded: {made['forwards']} recorded steps x {made['layers']} layers, {made['channels']:,} channels "
              f"per step, in {made['seconds']:.0f} s")
        print(f"store: {made['bytes'] / 2**20:.0f} MiB on disk (target <= {TARGET_BYTES / 2**20:.0f} MiB); "
              f"{made['bytes'] / made['forwards'] / 2**20:.2f} MiB per recorded step")
        print("recording RSS after steps: " + ", ".join(f"{k:,}: {v / 2**20:.0f} MiB" for k, v in made["rss"].items()))
        layers = covshift.load(directory).layers
        widest = str(layers.loc[layers["channels"].idxmax(), "layer"])
        results = {}
        for label, code, limit in (
            ("drift(run, metric='all')", f"import covshift\nd = covshift.drift(covshift.load({str(directory)!r}), metric='all')\nprint(len(d))", TARGET_SECONDS),
            ("covshift report", f"from covshift.cli import main\nmain(['report', {str(directory)!r}, '-o', {str(Path(tmp) / 'report')!r}])", TARGET_SECONDS),
            (f"covshift stats --layer {widest}", f"from covshift.cli import main\nmain(['stats', {str(directory)!r}, '--layer', {widest!r}])", TARGET_STATS_SECONDS),
        ):
            seconds, rss, _ = measured(code)
            results[label] = (seconds, rss)
            print(f"{label}: {seconds:.1f} s (target <= {limit} s), peak RSS {rss / 2**30:.2f} GiB "
                  f"(target <= {TARGET_RSS / 2**30:.0f} GiB)")
        if full is not None:
            compare(directory, full, made["model"], args.batch, args.image)
        met = (made["bytes"] <= TARGET_BYTES
               and all(s <= TARGET_SECONDS and r <= TARGET_RSS for s, r in list(results.values())[:2])
               and list(results.values())[2][0] <= TARGET_STATS_SECONDS)
        print(json.dumps({"targets_met": met}))


if __name__ == "__main__":
    main()
