"""The reference model pair: a small MNIST CNN, without and with BatchNorm.

Both networks share their module names: block ``k`` holds ``conv`` and ``relu``,
and in the BatchNorm network also ``bn`` between them. Corresponding convolutions
therefore have the same name (``block1.conv`` … ``classifier``) and, built from
the same seed, the same initial weights, so their inputs can be compared layer
by layer.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

#: (name, in channels, out channels, kernel size) of every convolution, in order.
CONVS: tuple[tuple[str, int, int, int], ...] = (
    ("block1", 1, 16, 3),
    ("block2", 16, 20, 3),
    ("transition", 20, 16, 1),
    ("block3", 16, 28, 3),
    ("block4", 28, 48, 3),
    ("block5", 48, 56, 3),
)
N_CLASSES = 10


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """A convolution with He (Kaiming) normal weights for ReLU networks and zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size)
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


def _block(in_channels: int, out_channels: int, kernel_size: int, batchnorm: bool) -> nn.Sequential:
    parts: OrderedDict[str, nn.Module] = OrderedDict(conv=_conv(in_channels, out_channels, kernel_size))
    if batchnorm:
        parts["bn"] = nn.BatchNorm2d(out_channels)
    parts["relu"] = nn.ReLU()
    return nn.Sequential(parts)


def reference_cnn(batchnorm: bool = False) -> nn.Sequential:
    """The reference CNN for 1×28×28 inputs, returning 10 logits.

    3×3 convolutions with 16 and 20 channels, 2×2 max pooling, a 1×1 transition
    to 16 channels, 3×3 convolutions with 28, 48 and 56 channels, a 3×3 classifier
    convolution to 10 channels and global average pooling; no fully connected layer.
    Convolutions start with He (Kaiming) normal weights and zero biases, so that
    the network without BatchNorm trains from the first epoch too. With ``batchnorm=True`` a
    ``BatchNorm2d`` sits between every convolution except the classifier and its ReLU.

    Args:
        batchnorm: insert the BatchNorm layers.

    >>> reference_cnn()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, cin, cout, k in CONVS:
        layers[name] = _block(cin, cout, k, batchnorm)
        if name == "block2":
            layers["pool"] = nn.MaxPool2d(2)
    layers["classifier"] = _conv(CONVS[-1][2], N_CLASSES, 3)
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    return nn.Sequential(layers)


def reference_pair(seed: int = 1) -> tuple[nn.Sequential, nn.Sequential]:
    """The plain and the BatchNorm reference CNN, with identical initial convolutions.

    Both are initialized from ``seed`` without touching the global random state.
    BatchNorm layers start at γ = 1, β = 0, so the networks compute the same
    convolutions at step 0 and differ only by normalization.

    Args:
        seed: seed of the initial weights.

    Returns:
        ``(plain, batchnorm)``.

    >>> plain, bn = reference_pair(seed=1)
    >>> sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in bn.parameters())
    (48898, 49266)
    >>> type(list(bn.modules())[3]).__name__, bn.block1.bn.num_features
    ('BatchNorm2d', 16)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        plain = reference_cnn(batchnorm=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batchnorm = reference_cnn(batchnorm=True)
    return plain, batchnorm
