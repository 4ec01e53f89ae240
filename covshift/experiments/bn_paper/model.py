"""The networks of the BatchNorm paper's Figure 1: the sigmoid MLP plain, with BatchNorm, with noisy BatchNorm."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

VARIANTS = ("plain", "batchnorm", "noisy", "noisy_iid")

#: How each noisy variant draws its noise (:class:`NoisyBatchNorm`'s ``per``).
NOISE_PER = {"noisy": "step", "noisy_iid": "sample"}

HIDDEN = 3


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by noise with non-zero mean and non-unit variance that changes every step.

    At each optimizer step ``t`` (call :meth:`resample`), every unit ``j`` draws
    ``μ_tj ~ U(−mean_range, mean_range)`` and ``s_tj ~ U(1, scale_max)``. Then, by ``per``:

    - ``"step"``: every example's activation is ``s_tj · BN(x)_j + μ_tj`` during step ``t``:
      one scale and shift per unit for the whole batch, so the next layer's input
      distribution jumps from step to step but is not noisier within a batch.
    - ``"sample"`` (Santurkar et al. 2018, §2.1: "we perturb each activation for each
      sample in the batch using i.i.d. noise sampled from a non-zero mean and non-unit
      variance distribution", the distribution changing at each step): each activation of
      each example gets its own noise, ``BN(x)_ij + ε_ij`` with ``ε_ij ~ N(μ_tj, s_tj²)``
      drawn independently for every example ``i`` and unit ``j``. (The paper's text does not
      give the noise's family; a Gaussian with the step's mean and standard deviation is
      this experiment's choice.)

    In eval mode the noise is replaced by its expectation: ``BN(x) · (1 + scale_max) / 2``
    for ``"step"`` (shift 0), ``BN(x)`` for ``"sample"``. The per-step draws come from the
    module's own generator (seeded), the per-sample noise from the global RNG (as dropout's
    does: gradient ICS replays it, so ``G`` and ``G'`` see the same noise; the probe and the
    null floor put it back).
    """

    def __init__(self, features: int, mean_range: float = 1.0, scale_max: float = 2.0, seed: int = 0,
                 per: str = "step") -> None:
        super().__init__()
        if per not in ("step", "sample"):
            raise ValueError(f"per must be 'step' or 'sample', got {per!r}")
        self.bn = nn.BatchNorm1d(features)
        self.mean_range, self.scale_max, self.per = mean_range, scale_max, per
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("shift", torch.zeros(features), persistent=False)
        self.register_buffer("scale", torch.ones(features), persistent=False)
        self.resample()

    def resample(self) -> None:
        """Draw this step's shift and scale per unit."""
        n = len(self.shift)
        with torch.no_grad():
            self.shift.copy_((torch.rand(n, generator=self.generator) * 2 - 1) * self.mean_range)
            self.scale.copy_(1 + torch.rand(n, generator=self.generator) * (self.scale_max - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        if not self.training:
            return y * ((1 + self.scale_max) / 2) if self.per == "step" else y
        if self.per == "step":
            return y * self.scale + self.shift
        # the global RNG, which covshift's probe, null floor and gradient ICS passes replay or restore
        return y + torch.randn_like(y) * self.scale + self.shift


def mlp(variant: str, seed: int = 0, noise_mean: float = 1.0, noise_scale: float = 2.0) -> nn.Sequential:
    """The Figure 1 network: ``fc1, [bn1], sig1, …, fc3, [bn3], sig3, out``; weights from ``seed``.

    The linear layers get the same initial weights in every variant (the seed is
    reset before each is built), so the variants differ only in normalization.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = 784
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, HIDDEN + 1):
        linear = nn.Linear(width, 100)
        _init(linear, gen)
        layers[f"fc{k}"] = linear
        if variant == "batchnorm":
            layers[f"bn{k}"] = nn.BatchNorm1d(100)
        elif variant in NOISE_PER:
            layers[f"bn{k}"] = NoisyBatchNorm(100, noise_mean, noise_scale, seed=seed * 100 + k,
                                              per=NOISE_PER[variant])
        layers[f"sig{k}"] = nn.Sigmoid()
        width = 100
    out = nn.Linear(100, 10)
    _init(out, gen)
    layers["out"] = out
    return nn.Sequential(layers)


def _init(linear: nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear init, drawn from ``gen``."""
    bound = 1 / math.sqrt(linear.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        linear.bias.uniform_(-bound, bound, generator=gen)
