"""Which layers of a model to watch, and along which axis their inputs have channels."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: Layers whose inputs are laid out (N, C, ...): channels on dim 1.
CHANNEL_FIRST_TYPES: tuple[type[nn.Module], ...] = (_ConvNd, _BatchNorm, _InstanceNorm, nn.GroupNorm)

ChannelDim = Union[Literal["auto"], int, None]
LayerSpec = Union[
    None, str, type, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]
]


#: Layers whose input is never floating point (indices), so never selected by default.
INDEX_INPUT_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def is_default_layer(module: nn.Module) -> bool:
    """A module that holds parameters of its own, or is a normalization layer, and takes float input."""
    if isinstance(module, INDEX_INPUT_TYPES):
        return False
    return isinstance(module, NORM_TYPES) or next(module.parameters(recurse=False), None) is not None


def select_layers(model: nn.Module, layers: LayerSpec = None) -> dict[str, nn.Module]:
    """Resolve a layer specification to ``{name: module}`` in model order.

    ``layers`` may be None (every default layer), a name or glob pattern, a
    module type, a predicate ``(name, module) -> bool``, or a list of names,
    patterns and types.

    Raises:
        ValueError: a name or pattern matches no module, or nothing is selected.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if not named:  # a single-module model watches itself
        named = [("", model)]
    if layers is None:
        skipped = _functional_parts(model)
        chosen = {name: module for name, module in named if is_default_layer(module) and name not in skipped}
    elif callable(layers) and not isinstance(layers, type):
        chosen = {name: module for name, module in named if layers(name, module)}
    else:
        specs = [layers] if isinstance(layers, (str, type)) else list(layers)
        chosen = {}
        for spec in specs:
            matched = _match(named, spec)
            if not matched:
                valid = ", ".join(repr(name) for name, _ in named)
                raise ValueError(f"layers={spec!r} matches no module of the model; valid names: {valid}")
            chosen.update(matched)
        chosen = {name: module for name, module in named if name in chosen}
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no module of {type(model).__name__}")
    return chosen


def _functional_parts(model: nn.Module) -> set[str]:
    """Submodules their parent only uses through a functional path: their own forward never runs.

    ``MultiheadAttention`` applies ``out_proj``'s weights in ``F.multi_head_attention_forward``.
    """
    return {
        f"{name}.out_proj" if name else "out_proj"
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def _match(named: list[tuple[str, nn.Module]], spec: str | type) -> dict[str, nn.Module]:
    if isinstance(spec, type):
        return {name: module for name, module in named if isinstance(module, spec)}
    if isinstance(spec, str):
        return {name: module for name, module in named if fnmatch.fnmatchcase(name, spec)}
    raise TypeError(
        f"layers entries must be names, glob patterns or module types, got {type(spec).__name__}: {spec!r}"
    )


def declared_channels(module: nn.Module) -> int | None:
    """The channel count a layer declares for its input (``in_channels``, ``in_features``, ...), if any."""
    for attribute in ("in_channels", "in_features", "num_features", "num_channels", "embed_dim"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return None


def channel_axis(module: nn.Module, shape: Sequence[int]) -> int | None:
    """Channel axis of ``module``'s input of this ``shape`` (None: summarize the whole tensor).

    By type: dim 1 for convolution and batch/instance/group norm inputs (dim 0
    when unbatched), the last dim for everything else (Linear, LayerNorm,
    sequences). Where that axis does not hold the channel count the layer
    declares but dim 1 or the last dim does (a LayerNorm applied to NCHW input, as
    ConvNeXt's LayerNorm2d does), that axis.
    """
    ndim = len(shape)
    if ndim == 0:
        return None
    axis = _axis_by_type(module, ndim)
    declared = declared_channels(module)
    if declared is None or shape[axis] == declared:
        return axis
    for other in (1, ndim - 1):
        if 0 < other < ndim and shape[other] == declared:
            return other
    return axis


def _axis_by_type(module: nn.Module, ndim: int) -> int:
    if isinstance(module, _ConvNd):
        spatial = len(module.kernel_size)
        return max(ndim - spatial - 1, 0)
    if isinstance(module, _InstanceNorm):
        return 0 if ndim == module._get_no_batch_dim() else 1
    if isinstance(module, CHANNEL_FIRST_TYPES):
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
    spec: ChannelDim | dict[str, ChannelDim], layer: str, module: nn.Module, shape: Sequence[int]
) -> int | None:
    """The channel axis of ``layer``'s input of this ``shape`` under the ``channel_dim`` setting."""
    if isinstance(spec, dict):
        spec = spec.get(layer, "auto")
    if spec == "auto":
        return channel_axis(module, shape)
    if spec is not None and not -len(shape) <= spec < len(shape):
        raise ValueError(f"channel_dim={spec} is out of range for the {len(shape)}-d input of layer {layer!r}")
    return spec
