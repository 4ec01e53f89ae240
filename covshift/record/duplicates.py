"""Selected blocks whose input is the very tensor one of their selected submodules receives.

ConvNeXt's ``CNBlock`` owns a ``layer_scale`` parameter, so it is selected by default, and it hands
its input unchanged to its first convolution, which is selected too: recording both would store
the same values twice, and the report would show two identical layers. By default covshift records
such an input once, under the submodule's name (its declared channel count makes its axis certain),
and says which blocks it folded into which submodules (``Tracker.duplicates``). A block whose
submodules get other tensors (a split, a normalized copy) is recorded as itself; layers chosen with
``layers=`` are always recorded as asked.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from covshift.record.context import Forward


class SameInputs:
    """Finds, during forwards, the selected blocks that hand their own input on to a selected submodule."""

    def __init__(self, layers: dict[str, nn.Module], active: bool) -> None:
        """``active``: look for them (the default selection); else never fold anything."""
        names = set(layers)
        self._ancestors = {
            name: ancestors for name in layers if active and (ancestors := _selected_ancestors(name, names))
        }
        self._containers = {ancestor for ancestors in self._ancestors.values() for ancestor in ancestors}
        #: block name -> the submodule under whose name its input is recorded
        self.found: dict[str, str] = {}

    def see(self, forward: Forward, layer: str, x: torch.Tensor, written: set[str]) -> None:
        """Note ``x`` as ``layer``'s input in this forward; a selected block around ``layer`` that got
        the same tensor in this forward, and has no stored record yet, is folded into ``layer``."""
        if layer in self._containers:
            forward.inputs[layer] = weakref.ref(x)
        for ancestor in self._ancestors.get(layer, ()):
            ref = forward.inputs.get(ancestor)
            if ref is not None and ref() is x and ancestor not in self.found and ancestor not in written:
                self.found[ancestor] = layer


def _selected_ancestors(name: str, names: set[str]) -> tuple[str, ...]:
    parts = name.split(".")
    return tuple(prefix for prefix in (".".join(parts[:i]) for i in range(1, len(parts))) if prefix in names)
