"""Train a small MNIST CNN with and without BatchNorm and compare how much its layers' inputs drift.

The same experiment as ``covshift experiment mnist-bn``, with the same options::

    python examples/mnist_bn_vs_nobn.py --epochs 10 --out runs/mnist-bn
    python examples/mnist_bn_vs_nobn.py --dataset fashion-mnist --out runs/fashion
    python examples/mnist_bn_vs_nobn.py --data-dir ~/data --train-split "train[:10%]" --epochs 2

Both networks start from the same convolution weights and see the same batches;
covshift records the input of each convolution on the training batches and on
a fixed probe batch. Results land in ``--out``: ``results.md`` (accuracy per
epoch, the per-layer drift table and the verdict), ``results.json``, the two
runs (``covshift.load(out / "plain")``) and ``report/report.html``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covshift.experiments import mnist_bn


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mnist_bn.add_arguments(parser)
    try:
        return mnist_bn.run_from_args(parser.parse_args(argv))  # prints where the results are
    except (ValueError, OSError) as err:  # bad settings or data: one line, no traceback
        parser.error(str(err))


if __name__ == "__main__":
    main()
