"""Which axis of a layer's input holds its channels.

What a module tells, strongest first:

1. the channel count it **declares** (``in_channels``, ``in_features``, ``num_features``,
   ``normalized_shape`` …), found on the axis its type implies (dim 1 for convolutions,
   batch/instance/group norms and ``…1d/2d/3d`` classes such as ``LayerNorm2d``, the last dim
   for the rest) or else on dim 1 or the last dim;
2. the size of its **per-channel parameters** (every parameter of its own one-dimensional but
   for size-1 axes, all of one size: ConvNeXt's ``layer_scale`` of shape ``(C, 1, 1)``,
   poolformer's ``Scale`` of ``(C,)``), on dim 1 or the last dim, whichever has that size;
3. the count declared by its **first submodule** that declares one (a block that owns a
   per-head temperature and a ``Linear``).

Where none of these fits exactly one of those axes, covshift **cannot tell**: it takes dim 1 of
an input of four or more dims (PyTorch images are ``(N, C, H, W)``) and the last dim of a
three-dim one (sequences are ``(N, T, C)``), and the tracker names the layer in a warning with
the ``channel_dim=`` override. Two-dim inputs ``(N, C)`` leave no doubt.
"""

from __future__ import annotations

import re
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

#: Layers whose inputs are laid out (N, C, ...): channels on dim 1.
CHANNEL_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    _ConvNd, _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LocalResponseNorm,
)
#: Attributes in which a layer declares its input's channel count (``input_size``: recurrent
#: layers; ``nx``: Hugging Face's ``Conv1D``).
DECLARING_ATTRIBUTES = ("in_channels", "in_features", "num_features", "num_channels", "embed_dim", "input_size", "nx")
#: Class names of layers that take ``(N, C, *spatial)`` input by PyTorch's naming (``LayerNorm2d``).
_SPATIAL_NAME = re.compile(r"[123]d$")

ChannelDim = Union[Literal["auto"], int, None]


def declared_channels(module: nn.Module) -> int | None:
    """The channel count a layer declares for its input (``in_channels``, ``in_features``, ...), if any."""
    for attribute in DECLARING_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def parameter_channels(module: nn.Module) -> int | None:
    """The size of a module's per-channel parameters: every parameter of its own has one axis of
    size above 1 (``(C,)``, ``(C, 1, 1)``), all of the same size. None for a weight matrix, a
    scalar, or sizes that differ."""
    sizes = set()
    for parameter in module.parameters(recurse=False):
        kept = [size for size in parameter.shape if size != 1]
        if len(kept) != 1:
            return None
        sizes.add(kept[0])
    return sizes.pop() if len(sizes) == 1 else None


def parameter_rank(module: nn.Module) -> int | None:
    """How many trailing axes a module's per-channel parameters span when shaped to broadcast
    (``(C, 1, 1)``: 3, so channels are the third axis from the end); None for ``(C,)`` shapes,
    which say nothing (poolformer reshapes its ``(C,)`` scale in ``forward``)."""
    ranks = {parameter.ndim for parameter in module.parameters(recurse=False)
             if parameter.ndim > 1 and parameter.shape[0] > 1 and all(size == 1 for size in parameter.shape[1:])}
    return ranks.pop() if len(ranks) == 1 else None


def submodule_channels(module: nn.Module) -> int | None:
    """The count declared by the first submodule (in definition order) that declares one."""
    for name, child in module.named_modules():
        if name:
            declared = declared_channels(child)
            if declared is not None:
                return declared
    return None


@dataclass(frozen=True)
class Hints:
    """What a module tells about its input's channels; the same for every call, so found once."""

    declared: int | None
    parameter: int | None
    rank: int | None  # parameter_rank()
    submodule: int | None
    channel_first: bool  # its type or name says (N, C, ...)

    @classmethod
    def of(cls, module: nn.Module) -> Hints:
        return cls(
            declared=declared_channels(module),
            parameter=parameter_channels(module),
            rank=parameter_rank(module),
            submodule=submodule_channels(module),
            channel_first=isinstance(module, CHANNEL_FIRST_TYPES) or bool(_SPATIAL_NAME.search(type(module).__name__)),
        )


@dataclass(frozen=True)
class Axis:
    """A channel axis, and why covshift cannot be sure of it (None: it is)."""

    dim: int | None
    doubt: str | None = None


def find_axis(module: nn.Module, shape: Sequence[int], hints: Hints | None = None) -> Axis:
    """The channel axis of ``module``'s input of this ``shape`` (module docstring), with any doubt."""
    hints = Hints.of(module) if hints is None else hints
    ndim = len(shape)
    if ndim == 0:
        return Axis(None)
    typed = _axis_by_type(module, ndim, hints)
    if hints.declared is not None:
        if shape[typed] == hints.declared:
            return Axis(typed)
        fits = _fitting(shape, hints.declared)
        return Axis(fits[0] if fits else typed)  # a count that fits nothing is warned about as declared
    if ndim <= 2:
        return Axis(typed)
    tried = []
    for what, count in (("the size of its per-channel parameters", hints.parameter),
                        ("the count its first submodule declares", hints.submodule)):
        if count is None:
            continue
        fits = _fitting(shape, count)
        if hints.channel_first and typed in fits:
            return Axis(typed)
        if len(fits) == 1:
            return Axis(fits[0])
        if count == hints.parameter and hints.rank is not None and ndim - hints.rank in fits:
            return Axis(ndim - hints.rank)  # a (C, 1, 1) parameter lines up with dim -3
        conventional = 1 if ndim >= 4 else ndim - 1
        if fits:
            return Axis(conventional, f"{what}, {count}, fits both dim {fits[0]} and dim {fits[1]}")
        tried.append(f"{what}, {count}, fits neither dim 1 nor dim {ndim - 1}")
    if hints.channel_first:
        return Axis(typed)
    conventional = 1 if ndim >= 4 else ndim - 1
    return Axis(conventional, "; ".join(tried) or "it declares no channel count and has no per-channel parameter")


def _fitting(shape: Sequence[int], count: int) -> list[int]:
    """Of dim 1 and the last dim (the batch dim aside), those of size ``count``."""
    return [dim for dim in sorted({1, len(shape) - 1}) if 0 < dim < len(shape) and shape[dim] == count]


def channel_axis(module: nn.Module, shape: Sequence[int]) -> int | None:
    """Channel axis of ``module``'s input of this ``shape`` (None: summarize the whole tensor)."""
    return find_axis(module, shape).dim


def _axis_by_type(module: nn.Module, ndim: int, hints: Hints) -> int:
    if isinstance(module, _ConvNd):
        spatial = len(module.kernel_size)
        return max(ndim - spatial - 1, 0)
    if isinstance(module, _InstanceNorm):
        return 0 if ndim == module._get_no_batch_dim() else 1
    if hints.channel_first:
        return 1 if ndim >= 2 else 0
    return ndim - 1


def check_channel_dims(spec: object, layers: dict[str, nn.Module]) -> None:
    """``channel_dim`` is "auto", None, an int, or a dict of those keyed by selected layer names."""
    specs = spec.values() if isinstance(spec, dict) else [spec]
    for value in specs:
        if not (value == "auto" or value is None or (isinstance(value, int) and not isinstance(value, bool))):
            raise ValueError(f"channel_dim must be 'auto', None or an int (or a dict of them), got {value!r}")
    unknown = sorted(set(spec) - set(layers)) if isinstance(spec, dict) else []
    if unknown:
        raise ValueError(f"channel_dim names layers that are not recorded: {unknown}; recorded: {list(layers)}")


def resolve_channel_dim(
    spec: ChannelDim | dict[str, ChannelDim], layer: str, module: nn.Module, shape: Sequence[int],
    hints: Hints | None = None,
) -> Axis:
    """The channel axis of ``layer``'s input of this ``shape`` under the ``channel_dim`` setting
    (a doubt only where the setting is ``"auto"``)."""
    if isinstance(spec, dict):
        spec = spec.get(layer, "auto")
    if spec == "auto":
        return find_axis(module, shape, hints)
    if spec is not None and not -len(shape) <= spec < len(shape):
        raise ValueError(f"channel_dim={spec} is out of range for the {len(shape)}-d input of layer {layer!r}")
    return Axis(spec)


class LayerAxes:
    """The channel axis of each recorded layer's input under the ``channel_dim`` setting, with each
    module's hints found once, and the layers whose axis covshift cannot tell, gathered for one warning."""

    def __init__(self, spec: ChannelDim | dict[str, ChannelDim]) -> None:
        self.spec = spec
        self._hints: dict[str, Hints] = {}
        self._doubts: dict[str, tuple[str, str, str]] = {}  # layer -> (layer type, why, "dim d of (shape)")

    def resolve(self, layer: str, module: nn.Module, shape: Sequence[int]) -> Axis:
        hints = self._hints.get(layer)
        if hints is None:
            hints = self._hints[layer] = Hints.of(module)
        return resolve_channel_dim(self.spec, layer, module, shape, hints)

    def declared_mismatch(self, layer: str, module: nn.Module, shape: Sequence[int], dim: int | None) -> str | None:
        """What to warn when an input's channel count differs from the size its layer declares (None: it does not)."""
        declared = self._hints[layer].declared if layer in self._hints else declared_channels(module)
        if declared is None or dim is None or shape[dim] == declared:
            return None
        return (
            f"layer {layer!r} ({type(module).__name__}) declares {declared} channels but its input "
            f"{tuple(shape)} has {shape[dim]} along dim {dim}, which is recorded; set channel_dim "
            f"for it if that is not the channel axis"
        )

    def doubt(self, layer: str, module: nn.Module, shape: Sequence[int], axis: Axis) -> None:
        """Note a layer first recorded along an axis covshift could not be sure of."""
        if axis.doubt is not None:
            self._doubts[layer] = (type(module).__name__, axis.doubt, f"dim {axis.dim} of {tuple(shape)}")

    def doubts_message(self, exclude: Container[str] = ()) -> str | None:
        """One message naming every layer noted since the last call but those in ``exclude``,
        grouped by type and reason (None if there are none)."""
        doubts = {layer: doubt for layer, doubt in self._doubts.items() if layer not in exclude}
        self._doubts = {}
        if not doubts:
            return None
        groups: dict[tuple[str, str], list[str]] = {}
        for layer, (kind, why, where) in doubts.items():
            groups.setdefault((kind, why), []).append(f"{layer!r} ({where})")
        listed = "; ".join(f"{len(names)} {kind} ({why}): {', '.join(names)}" for (kind, why), names in groups.items())
        example = next(iter(doubts))
        return (
            f"cannot tell the channel axis of {len(doubts)} layer{'s' if len(doubts) > 1 else ''}, so "
            "it is taken by convention: dim 1 of (N, C, H, W) images, the last dim of (N, T, C) sequences. "
            f"{listed}. Where that is not the channel axis, set channel_dim={{{example!r}: <dim>}} "
            "(None: the whole input as one channel)"
        )
