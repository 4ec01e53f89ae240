"""Noisy BatchNorm (Santurkar et al. 2018, §2.1) beside plain and BatchNorm networks.

The bn-paper MLP (:mod:`covshift.experiments.bn_paper`) trained four ways: without
BN, with BN, and with BN followed by :class:`~covshift.experiments.bn_paper.NoisyBatchNorm`
whose per-unit mean ``μ ~ U(−a, a)`` and scale ``s ~ U(1, b)`` are redrawn at every
optimizer step (``--noise-mean a``, ``--noise-scale b``; defaults 1 and 2): ``noisy``
scales and shifts the whole batch by them, ``noisy_iid`` adds to every activation of
every example its own noise ``~ N(μ, s²)`` (Santurkar et al.'s i.i.d. noise). Santurkar
et al. found that such a network's layer inputs drift far more than with plain BN yet it
trains about as well; results.md states what this run found.

Command line ``covshift experiment noisy-bn``.
"""

from __future__ import annotations

from pathlib import Path

from covshift.experiments.bn_paper import VARIANTS, Config, NoisyBatchNorm
from covshift.experiments.bn_paper import run_experiment as _run

__all__ = ["VARIANTS", "Config", "NoisyBatchNorm", "run_experiment"]


def run_experiment(config: Config | None = None, **settings: object) -> Path:
    """:func:`covshift.experiments.bn_paper.run_experiment` with the three variants (and out ``runs/noisy-bn``)."""
    if config is None:
        settings.setdefault("variants", VARIANTS)
        settings.setdefault("out", "runs/noisy-bn")
    return _run(config, **settings)
