"""Resuming a run: ``attach(..., resume=True)`` appends to the run in ``store=`` when model and layers match.

Training resumed from a checkpoint goes on at the checkpoint's step; the steps
the crashed process recorded after the checkpoint are replaced, in the records,
the curves and the side tables, so no step is stored twice. A run that does
not match is refused before training starts, and a directory that holds
anything but a run is refused whatever ``resume`` says.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict

import pytest
import torch
from torch import nn

import covshift
from covshift.store import files as store
from covshift.store import manifest

STEPS = 10
CHECKPOINT = 6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(4, 6), relu=nn.ReLU(), fc2=nn.Linear(6, 3)))


def batch(step, offset=0.0):
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(step)) + offset


def train(model, opt, tracker, steps, offset=0.0):
    for step in steps:
        loss = model(batch(step, offset)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        tracker.run.log(step, loss=float(loss), offset=offset)


def crashed_run(directory, **options):
    """Steps 0 … 9 recorded and flushed, a checkpoint taken at step 6; the process then dies (no detach)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = covshift.attach(model, optimizer=opt, every=1, store=directory, flush_every=3, **options)
    train(model, opt, tracker, range(CHECKPOINT))
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict()}
    train(model, opt, tracker, range(CHECKPOINT, STEPS))
    tracker.flush()
    tracker._remove_hooks()  # as a killed process leaves it: nothing more is written
    return checkpoint


def resumed(directory, checkpoint, *, set_step=True, steps=range(CHECKPOINT, STEPS + 2), **options):
    """Training resumed from the checkpoint on other data (offset 100), so replaced steps show."""
    model = mlp()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.load_state_dict(checkpoint["opt"])
    tracker = covshift.attach(model, optimizer=opt, every=1, store=directory, flush_every=3, resume=True, **options)
    if set_step:
        tracker.set_step(CHECKPOINT)
    train(model, opt, tracker, steps, offset=100.0)
    return tracker.detach()


def first_channel(run, layer="fc1"):
    stats = run.stats("train")
    return stats[(stats.layer == layer) & (stats.channel == 0)].set_index("step")


def test_a_resumed_run_goes_on_at_the_checkpoint_and_replaces_the_steps_after_it(tmp_path):
    checkpoint = crashed_run(tmp_path / "r")
    run_id = covshift.load(tmp_path / "r").meta["run_id"]
    resumed(tmp_path / "r", checkpoint)
    run = covshift.load(tmp_path / "r")
    assert run.meta["run_id"] == run_id
    stats = run.stats()
    assert not stats.duplicated(["step", "source", "layer", "channel"]).any()
    rows = first_channel(run)
    assert rows.index.tolist() == list(range(STEPS + 2))
    assert (rows.loc[: CHECKPOINT - 1, "mean"].abs() < 50).all()  # the first process's steps, kept
    assert (rows.loc[CHECKPOINT:, "mean"] > 50).all()  # steps 6 … 11: the resumed process's, replacing 6 … 9
    curves = run.curves()
    assert curves.step.tolist() == list(range(STEPS + 2)) and not curves.step.duplicated().any()
    assert (curves.set_index("step").loc[CHECKPOINT:, "offset"] == 100).all()
    # the parts that held replaced steps are gone, and the manifest lists exactly what is on disk
    entries = manifest.read(tmp_path / "r", run_id)
    assert sorted(e.name for e in entries) == sorted(p.name for p in store.part_paths(tmp_path / "r"))


def test_resume_without_a_step_goes_on_after_the_last_training_step(tmp_path):
    checkpoint = crashed_run(tmp_path / "r")
    run = resumed(tmp_path / "r", checkpoint, set_step=False, steps=range(STEPS, STEPS + 2))
    rows = first_channel(covshift.load(run.directory))
    assert rows.index.tolist() == list(range(STEPS + 2))
    assert (rows.loc[: STEPS - 1, "mean"].abs() < 50).all() and (rows.loc[STEPS:, "mean"] > 50).all()


def test_a_crash_before_the_resumed_process_flushes_leaves_the_run_as_it_was(tmp_path):
    checkpoint = crashed_run(tmp_path / "r")
    before = covshift.load(tmp_path / "r").stats()
    model = mlp()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "r", flush_every=100, resume=True)
    tracker.set_step(CHECKPOINT)
    train(model, opt, tracker, range(CHECKPOINT, CHECKPOINT + 2), offset=100.0)
    tracker._remove_hooks()  # killed: the two steps were never flushed
    after = covshift.load(tmp_path / "r").stats()
    assert after.equals(before)


def test_resume_true_in_a_new_or_empty_directory_starts_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    for directory in (tmp_path / "new", tmp_path / "empty"):
        model = mlp()
        with covshift.attach(model, every=1, store=directory, resume=True):
            model(batch(0))
            model(batch(1))
        assert first_channel(covshift.load(directory)).index.tolist() == [0, 1]


class Other(nn.Sequential):
    pass


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda model: (Other(OrderedDict(model.named_children())), {}), r"model: the run recorded Sequential, this is Other"),
        (lambda model: (model, {"layers": ["fc1"]}), r"layers: the run recorded \['fc1', 'fc2'\], these are \['fc1'\]"),
        (lambda model: (model, {"sample_size": 64}), r"sample_size: the run recorded 1024, this is 64"),
        (lambda model: (model, {"every": 2}), r"every: the run recorded .*'every': 1.*, this is .*'every': 2"),
    ],
)
def test_a_run_that_does_not_match_is_refused_before_training(tmp_path, change, message):
    checkpoint = crashed_run(tmp_path / "r")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    model, options = change(mlp())
    model.load_state_dict(checkpoint["model"])
    options = {"every": 1, **options}
    with pytest.raises(ValueError, match=rf"cannot resume the run in {tmp_path / 'r'}: .*{message}"):
        covshift.attach(model, store=tmp_path / "r", resume=True, **options)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_layer_whose_size_changed_is_refused(tmp_path):
    crashed_run(tmp_path / "r")
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(5, 6), relu=nn.ReLU(), fc2=nn.Linear(6, 3)))
    with pytest.raises(ValueError, match=r"fc1: the run recorded 4 channels, the layer now takes 5"):
        covshift.attach(model, every=1, store=tmp_path / "r", resume=True)


@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_that_holds_something_else_is_refused(tmp_path, resume):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"r holds notes.txt, which is not a covshift run: choose a new or empty"):
        covshift.attach(mlp(), store=tmp_path / "r", resume=resume)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["notes.txt"]


def test_without_resume_a_run_is_still_refused(tmp_path):
    crashed_run(tmp_path / "r")
    with pytest.raises(FileExistsError, match="already holds a covshift run.*resume=True"):
        covshift.attach(mlp(), store=tmp_path / "r")


def test_a_run_written_before_manifests_cannot_be_resumed(tmp_path):
    crashed_run(tmp_path / "r")
    (tmp_path / "r" / "manifest.json").unlink()
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    meta["format_version"] = 3
    (tmp_path / "r" / "meta.json").write_text(json.dumps(meta))
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="written by an earlier covshift .* cannot be resumed"):
        covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "r", resume=True)


def test_resume_needs_a_store():
    with pytest.raises(ValueError, match="resume=True needs store="):
        covshift.attach(mlp(), resume=True)


def test_an_interrupted_first_flush_after_resuming_loses_nothing(tmp_path, monkeypatch):
    """The replaced steps' removal and the new steps are one manifest commit: before it, the run is as it was."""
    checkpoint = crashed_run(tmp_path / "r")
    before = covshift.load(tmp_path / "r").stats()
    real = manifest.write
    calls = []

    def interrupted(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(manifest, "write", interrupted)
    model = mlp()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = covshift.attach(model, optimizer=opt, every=1, store=tmp_path / "r", flush_every=2, resume=True)
    tracker.set_step(CHECKPOINT)
    with pytest.raises(KeyboardInterrupt):
        train(model, opt, tracker, range(CHECKPOINT, CHECKPOINT + 2), offset=100.0)
    assert covshift.load(tmp_path / "r").stats().equals(before)
    train(model, opt, tracker, range(CHECKPOINT + 2, STEPS + 2), offset=100.0)
    tracker.detach()
    rows = first_channel(covshift.load(tmp_path / "r"))
    assert rows.index.tolist() == list(range(STEPS + 2)) and (rows.loc[CHECKPOINT:, "mean"] > 50).all()
    assert not covshift.load(tmp_path / "r").stats().duplicated(["step", "source", "layer", "channel"]).any()
    logged = [step for step in range(STEPS + 2) if step != CHECKPOINT + 1]  # step 7's log: the interrupt came first
    assert covshift.load(tmp_path / "r").curves().step.tolist() == logged


def test_a_saved_copy_of_a_crashed_run_resumes_like_the_original(tmp_path):
    checkpoint = crashed_run(tmp_path / "r")
    shutil.copytree(tmp_path / "r", tmp_path / "copy")
    resumed(tmp_path / "copy", checkpoint)
    assert first_channel(covshift.load(tmp_path / "copy")).index.tolist() == list(range(STEPS + 2))
