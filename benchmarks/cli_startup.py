"""Start-up time of the command: ``python -m covshift --help``, median of several runs.

Usage: python benchmarks/cli_startup.py [--repeat N] [-- ARGS ...]   (default ARGS: --help)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def time_command(args: list[str], repeat: int) -> list[float]:
    """Wall-clock seconds of ``repeat`` runs of ``python -m covshift ARGS`` (after one warm-up run)."""
    command = [sys.executable, "-m", "covshift", *args]
    subprocess.run(command, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("args", nargs="*", default=["--help"])
    options = parser.parse_args()
    times = time_command(options.args, options.repeat)
    print(f"python -m covshift {' '.join(options.args)}: median {statistics.median(times):.3f} s "
          f"over {len(times)} runs (min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
