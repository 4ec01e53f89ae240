"""Resuming a stored run (``attach(..., resume=True)``): whether this tracker may go on with it, and where.

A run is gone on with only when what its rows mean stays the same: the model
class, the selected layers (with their types and sizes) and the settings that
decide what a row holds (schedule, sample and sketch sizes, outputs, step
mode). Anything else is a ValueError listing every difference, raised before a
hook is installed or a file touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from covshift.record.layers import declared_channels
from covshift.store import files as store_files

#: Settings of ``meta["config"]`` that must match, with the words an error names them by.
_MATCHED = (("layers", "layers"), ("schedule", "every"), ("sample_size", "sample_size"),
            ("sketch_channels", "sketch_channels"), ("outputs", "outputs"), ("step", "step"))


def stored_meta(directory: str | Path) -> dict | None:
    """The ``meta.json`` of the run in ``directory``, or None when there is no run to resume (a new or empty one)."""
    if not os.path.lexists(Path(directory) / store_files.META_FILE):
        return None
    return store_files.read_meta(Path(directory))


def check(directory: str | Path, stored: dict, meta: dict, layers: dict[str, nn.Module]) -> None:
    """Refuse to resume the run ``stored`` (its meta) with a tracker of ``meta`` on ``layers``.

    Raises:
        ValueError: naming every difference.
    """
    problems = differences(stored, meta, layers)
    if problems:
        raise ValueError(f"cannot resume the run in {directory}: " + "; ".join(problems)
                         + ". Resume with the settings it was recorded with, or record into a new directory")


def differences(stored: dict, meta: dict, layers: dict[str, nn.Module]) -> list[str]:
    """What differs between the stored run and this tracker, in words (empty: it may go on)."""
    problems = []
    if stored.get("model") != meta["model"]:
        problems.append(f"model: the run recorded {stored.get('model')}, this is {meta['model']}")
    old, new = stored.get("config") or {}, meta["config"]
    for key, label in _MATCHED:
        if key in old and old[key] != new.get(key):
            these = "these are" if key == "layers" else "this is"
            problems.append(f"{label}: the run recorded {old[key]!r}, {these} {new.get(key)!r}")
    for layer in stored.get("layers", []):
        name = layer["name"].removesuffix(":output")
        module = layers.get(name)
        if module is None:
            if "layers" not in old:  # a difference the layer lists above did not already name
                problems.append(f"{name}: the run recorded it, it is not among the layers now")
            continue
        if type(module).__name__ != layer["type"]:
            problems.append(f"{name}: the run recorded a {layer['type']}, it is now a {type(module).__name__}")
            continue
        declared = declared_channels(module)
        if layer["name"] == name and layer["channel_dim"] is not None and declared not in (None, layer["channels"]):
            problems.append(f"{name}: the run recorded {layer['channels']} channels, the layer now takes {declared}")
    return problems
