"""``Run.save(path, overwrite=...)``: a second save of a notebook or script replaces its own run only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import covshift


def _run(steps: int) -> covshift.Run:
    model = nn.Linear(3, 2)
    with covshift.attach(model, every=1) as tracker:
        for _ in range(steps):
            model(torch.randn(4, 3))
    return tracker.run


def test_saving_twice_needs_overwrite(tmp_path):
    _run(1).save(tmp_path / "r")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        _run(3).save(tmp_path / "r")
    assert covshift.load(tmp_path / "r").stats()["step"].nunique() == 1


def test_overwrite_replaces_the_stored_run(tmp_path):
    _run(1).save(tmp_path / "r")
    _run(3).save(tmp_path / "r", overwrite=True)
    assert covshift.load(tmp_path / "r").stats()["step"].nunique() == 3


def test_overwrite_never_deletes_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no covshift run"):
        _run(1).save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
