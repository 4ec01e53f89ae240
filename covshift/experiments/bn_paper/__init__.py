"""The BatchNorm paper's Figure 1 (Ioffe & Szegedy 2015), measured three ways.

The setting of Figure 1: a 784-100-100-100-10 MLP with sigmoid nonlinearities on
MNIST, batch 60, 50,000 steps, with and without BatchNorm before each sigmoid.
The figure shows (a) test accuracy against steps and (b, c) the 15th, 50th and
85th percentiles of the input of one sigmoid of the last hidden layer over
training. Here covshift records, for each network:

- the inputs of every linear layer and every sigmoid (per-layer drift; the
  single units of the paper's view come from the last sigmoid's per-unit
  quantiles on a fixed probe batch);
- the null noise floor (:mod:`covshift.science.null_floor`) on the probe at the training batch size;
- gradient ICS (:mod:`covshift.science.gradient_ics`, Santurkar et al. 2018) of the linear layers.

The learning rate, momentum and initialization are not given in the paper's text
for Figure 1; the defaults here (SGD, lr 0.1, no momentum, PyTorch's default
init from ``--seed``) are this experiment's choices. The variants ``noisy`` and
``noisy_iid`` (BN followed by time-varying noise, per step or per activation and
sample, :class:`NoisyBatchNorm`) are the network of Santurkar et al. §2.1 in this
MLP; ``covshift experiment noisy-bn`` trains them beside the other two. With
``--seeds N`` every number is stated over seeds (:mod:`covshift.experiments.seeds`).

Python entry point :func:`run_experiment`; command line ``covshift experiment
bn-paper`` through :func:`add_arguments` and :func:`run_from_args`."""

from covshift.experiments.bn_paper.model import HIDDEN, VARIANTS, NoisyBatchNorm, mlp
from covshift.experiments.bn_paper.results import (
    FIGURE,
    GRADIENT_FIGURE,
    RESULTS_JSON,
    RESULTS_MD,
    collect_results,
    unit_percentiles,
    write_results,
)
from covshift.experiments.bn_paper.training import Config, add_arguments, run_experiment, run_from_args, train_model

__all__ = [
    "FIGURE", "GRADIENT_FIGURE", "HIDDEN", "RESULTS_JSON", "RESULTS_MD", "VARIANTS", "Config", "NoisyBatchNorm",
    "add_arguments", "collect_results", "mlp", "run_experiment", "run_from_args", "train_model", "unit_percentiles",
    "write_results",
]
