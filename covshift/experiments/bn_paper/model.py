"""The networks of the BatchNorm paper's Figure 1: the sigmoid MLP plain, with BatchNorm, with noisy BatchNorm."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

VARIANTS = ("plain", "batchnorm", "noisy")

HIDDEN = 3


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by noise with non-zero mean and non-unit variance that changes every step.

    The distribution (Santurkar et al. 2018, §2.1, as implemented here): at each
    optimizer step ``t`` (call :meth:`resample`), every unit ``j`` draws a shift
    ``μ_tj ~ U(−mean_range, mean_range)`` and a scale ``s_tj ~ U(1, scale_max)``;
    during that step each example's activation is ``s_tj · BN(x)_j + μ_tj``. So the
    next layer's input distribution has a mean and spread that jump every step.
    In eval mode the noise is replaced by its expectation (scale ``(1 + scale_max) / 2``,
    shift 0). The draws come from the module's own generator (seeded), so the
    global RNG and the batch order are untouched.
    """

    def __init__(self, features: int, mean_range: float = 1.0, scale_max: float = 2.0, seed: int = 0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.mean_range, self.scale_max = mean_range, scale_max
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
        if self.training:
            return y * self.scale + self.shift
        return y * ((1 + self.scale_max) / 2)


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
        elif variant == "noisy":
            layers[f"bn{k}"] = NoisyBatchNorm(100, noise_mean, noise_scale, seed=seed * 100 + k)
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
