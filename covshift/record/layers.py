"""Which layers of a model to watch (:mod:`covshift.record.channels`: along which axis their inputs have channels)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from covshift.record.channels import (  # noqa: F401 - the channel axis, importable from here as before
    CHANNEL_FIRST_TYPES,
    ChannelDim,
    channel_axis,
    check_channel_dims,
    declared_channels,
    resolve_channel_dim,
)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    _InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
LayerSpec = Union[
    None, str, type, Callable[[str, nn.Module], bool], Iterable[Union[str, type]]
]


#: Layers whose input is never floating point (indices), so never selected by default.
INDEX_INPUT_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def is_default_layer(module: nn.Module) -> bool:
    """A module that holds parameters of its own (a parametrized layer's ``weight`` included), or
    is a normalization layer, and takes float input."""
    if isinstance(module, INDEX_INPUT_TYPES):
        return False
    return (isinstance(module, NORM_TYPES) or parametrize.is_parametrized(module)
            or next(module.parameters(recurse=False), None) is not None)


def select_layers(model: nn.Module, layers: LayerSpec = None) -> dict[str, nn.Module]:
    """Resolve a layer specification to ``{name: module}`` in model order.

    ``layers`` may be None (every default layer), a name or glob pattern, a
    module type, a predicate ``(name, module) -> bool``, or a list of names,
    patterns and types. A module registered under several names answers to each
    and is selected once, under the first name chosen.

    Raises:
        ValueError: a name or pattern matches no module, or nothing is selected.
    """
    if layers is None:
        named = _named(model, remove_duplicate=True)
        skipped = _functional_parts(model)
        chosen = {name: module for name, module in named if is_default_layer(module) and not _skipped(name, skipped)}
        if not chosen and parametrize.is_parametrized(model):
            chosen = {"": model}  # a parametrized layer on its own
    else:
        named = _named(model, remove_duplicate=False)
        if callable(layers) and not isinstance(layers, type):
            chosen = {name: module for name, module in named if layers(name, module)}
        else:
            specs = [layers] if isinstance(layers, (str, type)) else list(layers)
            matched_names: set[str] = set()
            for spec in specs:
                matched = _match(named, spec)
                if not matched:
                    valid = ", ".join(repr(name) for name, _ in named)
                    raise ValueError(f"layers={spec!r} matches no module of the model; valid names: {valid}")
                matched_names.update(matched)
            chosen = {name: module for name, module in named if name in matched_names}
        chosen = _once_each(chosen)
    if not chosen:
        raise ValueError(f"layers={layers!r} selects no module of {type(model).__name__}")
    return chosen


def _named(model: nn.Module, remove_duplicate: bool) -> list[tuple[str, nn.Module]]:
    named = [(name, module) for name, module in model.named_modules(remove_duplicate=remove_duplicate) if name]
    return named or [("", model)]  # a single-module model watches itself


def _once_each(chosen: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Each module once, under the first of its chosen names: a module hooked twice would record each call twice."""
    seen: set[int] = set()
    kept = {}
    for name, module in chosen.items():
        if id(module) not in seen:
            seen.add(id(module))
            kept[name] = module
    return kept


def _skipped(name: str, prefixes: set[str]) -> bool:
    return name in prefixes or any(name.startswith(f"{prefix}.") for prefix in prefixes)


def _functional_parts(model: nn.Module) -> set[str]:
    """Submodules (and their insides) whose own forward never runs with the layer's input.

    ``MultiheadAttention`` applies ``out_proj``'s weights in ``F.multi_head_attention_forward``;
    a parametrized layer (``weight_norm``, ``spectral_norm``) computes its weight by calling its
    ``parametrizations`` with no input: the layer itself is selected instead.
    """
    parts = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            parts.add(f"{prefix}out_proj")
        if parametrize.is_parametrized(module):
            parts.add(f"{prefix}parametrizations")
    return parts


def _match(named: list[tuple[str, nn.Module]], spec: str | type) -> dict[str, nn.Module]:
    if isinstance(spec, type):
        return {name: module for name, module in named if isinstance(module, spec)}
    if isinstance(spec, str):
        return {name: module for name, module in named if fnmatch.fnmatchcase(name, spec)}
    raise TypeError(
        f"layers entries must be names, glob patterns or module types, got {type(spec).__name__}: {spec!r}"
    )
