"""Which axis of a layer's input holds its channels, for layers that declare no channel count.

A module that declares none (no ``in_channels``, ``normalized_shape`` …) is summarized along the
axis its per-channel parameters fit, else the axis its first submodule that declares a count
fits, else by convention with one warning naming it and the ``channel_dim=`` override."""

import warnings

import torch
from torch import nn

import covshift
from covshift.faults import CovshiftWarning
from covshift.record.layers import channel_axis


def covshift_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, CovshiftWarning)]


def recorded(model, x, steps=2, **options):
    """``(tracker, run.layers indexed by layer, CovshiftWarning messages)`` after ``steps`` forwards."""
    model.train()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with covshift.attach(model, every=1, **options) as tracker:
            for _ in range(steps):
                model(x)
    return tracker, tracker.run.layers.set_index("layer"), covshift_warnings(record)


class Scale(nn.Module):
    """Per-channel scale of an NCHW input, stored as ``(C,)`` (poolformer's ``Scale``)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return x * self.scale.view(-1, 1, 1)


class Block(nn.Module):
    """A residual block owning a ``(C, 1, 1)`` layer scale whose first child gets its very input
    (torchvision's ``CNBlock``)."""

    def __init__(self, channels):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.ones(channels, 1, 1))
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x):
        return x + self.layer_scale * self.conv(x)


class SplitBlock(Block):
    """Its first child gets half of its input's channels, not the input itself."""

    def __init__(self, channels):
        super().__init__(channels)
        self.conv = nn.Conv2d(channels // 2, channels // 2, 1)

    def forward(self, x):
        half = x.shape[1] // 2
        return x + self.layer_scale * torch.cat([self.conv(x[:, :half]), x[:, half:]], 1)


class ScalarAct(nn.Module):
    """An activation with scalar parameters (timm's ``StarReLU``): nothing says where channels are."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.scale * torch.relu(x)


class Heads(nn.Module):
    """A parameter per attention head, not per channel; its first child declares the channels."""

    def __init__(self, channels, heads):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Linear(channels, channels)

    def forward(self, x):
        return self.qkv(x) * self.temperature.mean()


def test_a_per_channel_parameter_puts_channels_on_the_axis_it_fits():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), Scale(6))
    _, layers, messages = recorded(model, torch.randn(2, 3, 5, 9))
    assert (layers.loc["1", "channel_dim"], layers.loc["1", "channels"]) == (1, 6)
    assert messages == []


def test_a_block_selected_by_itself_is_summarized_along_its_channels():
    model = nn.Sequential(Block(8))
    _, layers, messages = recorded(model, torch.randn(2, 8, 4, 16), layers=["0"])
    assert (layers.loc["0", "channel_dim"], layers.loc["0", "channels"]) == (1, 8)
    assert messages == []


def test_a_block_whose_first_child_gets_its_very_input_is_recorded_once_by_default():
    model = nn.Sequential(Block(8), Block(8))
    tracker, layers, messages = recorded(model, torch.randn(2, 8, 4, 16))
    assert list(layers.index) == ["0.conv", "1.conv"]
    assert tracker.duplicates == {"0": "0.conv", "1": "1.conv"}
    assert messages == []


def test_a_block_whose_children_get_other_tensors_is_recorded():
    model = nn.Sequential(SplitBlock(8))
    tracker, layers, messages = recorded(model, torch.randn(2, 8, 4, 16))
    assert (layers.loc["0", "channel_dim"], layers.loc["0", "channels"]) == (1, 8)
    assert layers.loc["0.conv", "channels"] == 4
    assert tracker.duplicates == {} and messages == []


def test_a_per_head_parameter_defers_to_the_first_child_that_declares_channels():
    model = nn.Sequential(Heads(12, heads=4))
    _, layers, messages = recorded(model, torch.randn(2, 5, 12), layers=["0"])
    assert (layers.loc["0", "channel_dim"], layers.loc["0", "channels"]) == (2, 12)
    assert messages == []


def test_a_layer_that_tells_nothing_about_an_image_input_is_named_in_one_warning():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), ScalarAct(), ScalarAct())
    _, layers, messages = recorded(model, torch.randn(2, 3, 5, 9), steps=3)
    assert (layers.loc["1", "channel_dim"], layers.loc["1", "channels"]) == (1, 6)  # NCHW by convention
    axis = [m for m in messages if "channel axis" in m]
    assert len(axis) == 1, messages
    assert "2 ScalarAct (it declares no channel count" in axis[0]
    assert "'1' (dim 1 of (2, 6, 5, 9)), '2' (dim 1 of (2, 6, 5, 9))" in axis[0]
    assert "channel_dim={'1': <dim>}" in axis[0]


def test_an_override_silences_the_warning():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), ScalarAct())
    _, layers, messages = recorded(model, torch.randn(2, 3, 5, 9), channel_dim={"1": 1})
    assert layers.loc["1", "channels"] == 6 and messages == []


def test_a_per_channel_parameter_that_fits_two_axes_is_named_in_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), Scale(6))
    _, layers, messages = recorded(model, torch.randn(2, 3, 5, 6))  # width 6 = channels 6
    assert layers.loc["1", "channel_dim"] == 1
    assert any("channel axis" in m and "1 Scale (the size of its per-channel parameters, 6, fits both dim 1 and dim 3): "
               "'1' (dim 1 of (2, 6, 5, 6))" in m for m in messages), messages


def test_a_channel_first_norm_whose_width_equals_its_channels_keeps_dim_1():
    class LayerNorm2d(nn.LayerNorm):  # as torchvision's and timm's: an NCHW LayerNorm
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    assert channel_axis(LayerNorm2d(8), (2, 8, 8, 8)) == 1
    assert channel_axis(nn.LayerNorm(8), (2, 8, 8, 8)) == 3


def test_local_response_norm_normalizes_across_dim_1():
    assert channel_axis(nn.LocalResponseNorm(2), (2, 6, 5, 9)) == 1
