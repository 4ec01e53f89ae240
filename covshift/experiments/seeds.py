"""An experiment run over several seeds, and what its seeds say together.

``covshift experiment mnist-bn --seeds N`` (and ``bn-paper``, ``noisy-bn``) runs the
experiment once per seed ``--seed``, ``--seed + 1``, … into ``OUT/seed-<seed>/`` and
then writes ``OUT/seeds.json`` and ``OUT/seeds.md``: for every number of the seeds'
``results.json`` ``headline`` (drift factors, gradient ICS ratios, accuracies), the
value of each seed, their median with the min–max and a percentile bootstrap
interval of the median (:func:`covshift.metrics.seeds.seed_spread`), and for
accuracies the mean and its standard error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from covshift.checks import check_int
from covshift.metrics.seeds import RESAMPLES, mean_and_error, seed_spread

SEEDS_JSON = "seeds.json"
SEEDS_MD = "seeds.md"
RESULTS_JSON = "results.json"
#: Options left out of the stated command: nothing measured changes with them, or it states them itself.
QUIET = ("progress", "variants", "seeds")


def seed_dir(out: Path, seed: int) -> Path:
    """Where the run of ``seed`` goes."""
    return out / f"seed-{seed}"


def run_seeds(run_one: Callable[[Any], Path], config: Any, seeds: int, experiment: str) -> Path:
    """Run ``run_one(config)`` for ``seeds`` seeds from ``config.seed`` on, each into its own folder; summarize.

    Args:
        run_one: the experiment's ``run_experiment`` (it writes ``results.json`` with a ``headline``).
        config: its config; ``seed`` and ``out`` are replaced per seed.
        seeds: how many seeds.
        experiment: the command's name (``mnist-bn``, ``bn-paper``, ``noisy-bn``), for the stated command.

    Returns:
        ``config.out``, holding ``seed-<seed>/`` folders, ``seeds.json`` and ``seeds.md``.

    Raises:
        FileExistsError: a seed's folder already holds runs (checked for every seed before any trains).
    """
    check_int("seeds", seeds)
    out = Path(config.out)
    chosen = range(config.seed, config.seed + seeds)
    taken = [seed_dir(out, seed) for seed in chosen if seed_dir(out, seed).exists()]
    if taken:
        raise FileExistsError(f"out={str(out)!r} already holds {taken[0]}; choose a new --out")
    for seed in chosen:
        run_one(dataclasses.replace(config, seed=seed, out=str(seed_dir(out, seed))))
    write_seeds(out, command_line(experiment, config, seeds))
    return out


def command_line(experiment: str, config: Any, seeds: int) -> str:
    """The ``covshift experiment`` command that reproduces ``config`` over ``seeds`` seeds (non-defaults only).

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     steps: int = 10
    ...     out: str = "runs/x"
    ...     download: bool = True
    >>> command_line("bn-paper", C(steps=5, download=False), 5)
    'covshift experiment bn-paper --steps 5 --no-download --seeds 5'
    """
    default = type(config)()
    words = ["covshift", "experiment", experiment]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in QUIET or value == getattr(default, field.name):
            continue
        option = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(option if value else "--no-" + field.name.replace("_", "-"))
        elif value is not None:
            words += [option, str(value)]
    return shlex.join([*words, "--seeds", str(seeds)])


def rewrite_seeds(out: Path, write_one: Callable[[Path], Any]) -> dict:
    """Recompute every seed's results with ``write_one(seed folder)`` and then ``seeds.md``, without training.

    The stated command is the one ``seeds.json`` already holds.

    Raises:
        FileNotFoundError: ``out`` holds no ``seeds.json`` of an earlier ``--seeds`` run.
    """
    if not (out / SEEDS_JSON).is_file():
        raise FileNotFoundError(f"{out / SEEDS_JSON} is missing: {out} holds no finished --seeds run")
    command = json.loads((out / SEEDS_JSON).read_text())["command"]
    for path in sorted(out.glob("seed-*/")):
        write_one(path)
    return write_seeds(out, command)


def write_seeds(out: Path, command: str) -> dict:
    """``seeds.json`` and ``seeds.md`` from the ``results.json`` of every ``seed-*`` folder of ``out``.

    Raises:
        FileNotFoundError: no seed folder holds a ``results.json``.
    """
    found = sorted((int(path.parent.name.split("-", 1)[1]), path) for path in out.glob("seed-*/" + RESULTS_JSON)
                   if path.parent.name.split("-", 1)[1].lstrip("-").isdigit())
    if not found:
        raise FileNotFoundError(f"no {out}/seed-*/{RESULTS_JSON}: run the experiment with --seeds N first")
    headlines = {seed: json.loads(path.read_text())["headline"] for seed, path in found}
    keys = list(dict.fromkeys(key for headline in headlines.values() for key in headline))
    values = {key: [_value(headlines[seed].get(key)) for seed in headlines] for key in keys}
    content = {
        "command": command,
        "seeds": list(headlines),
        "values": values,
        "spread": {key: seed_spread(v).as_dict() for key, v in values.items() if not key.startswith("test_acc")},
        "accuracy": {key: dict(zip(("mean", "se"), mean_and_error(v))) for key, v in values.items()
                     if key.startswith("test_acc")},
    }
    (out / SEEDS_JSON).write_text(json.dumps(content, indent=2))
    (out / SEEDS_MD).write_text(markdown(content))
    return content


def markdown(content: dict) -> str:
    """``seeds.md``: the command, then one row per number: each seed's value, median, min–max, interval."""
    seeds = content["seeds"]
    spread = content["spread"]
    first = next(iter(spread.values()), None)
    lines = ["# Over seeds", "", "```", content["command"], "```", "",
             f"Seeds {', '.join(map(str, seeds))}. Factors: the seeds' median, their min–max and a "
             f"{first['level'] if first else 0.95:.0%} percentile bootstrap interval of the median "
             f"({first['resamples'] if first else RESAMPLES:,} resamples of the seeds, generator seed "
             f"{first['seed'] if first else 0}). `drift:<measure>:<agg>:<base>/<other>` is base/other (above 1: "
             "other drifts less), `ics:<kind>:<base>/<other>` other/base (above 1: other's gradient ICS is higher).",
             "", "| number | " + " | ".join(f"seed {s}" for s in seeds) + " | median | min–max | bootstrap |",
             "| --- |" + " ---: |" * (len(seeds) + 3)]
    for key, s in spread.items():
        cells = [_fmt(v) for v in content["values"][key]]
        lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {_fmt(s['median'])} | {_fmt(s['min'])}–{_fmt(s['max'])}"
                     f" | {_fmt(s['low'])}–{_fmt(s['high'])} |")
    lines += ["", "| accuracy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± standard error |",
              "| --- |" + " ---: |" * (len(seeds) + 1)]
    for key, acc in content["accuracy"].items():
        cells = [_fmt(v, 4) for v in content["values"][key]]
        lines.append(f"| `{key}` | " + " | ".join(cells) + f" | {acc['mean']:.4f} ± {acc['se']:.4f} |")
    return "\n".join(lines) + "\n"


def _value(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}g}"
