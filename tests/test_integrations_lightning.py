"""`covshift.integrations.lightning.CovshiftCallback` in real (tiny) Lightning fits on CPU.

This file is also the script of the two-process ``strategy="ddp"`` fit:
``python tests/test_integrations_lightning.py OUT`` (Lightning's launcher starts it again for rank 1).
"""

import logging
import math
import os
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import covshift

lightning = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from covshift.faults import CovshiftWarning
from covshift.integrations.lightning import CovshiftCallback

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LightningModule.*has parameters in training mode.*")

BATCH = 4


class Regressor(lightning.LightningModule):
    """Calls ``self.net`` in training_step (or ``self`` with ``via_forward``); notes each training
    batch with the global step it ran at; validation batches are of another size."""

    def __init__(self, via_forward=False, fail_at=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.via_forward, self.fail_at = via_forward, fail_at
        self.seen = []  # (global_step, sum of x[:, 0], rows)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        x, y = batch
        if self.fail_at is not None and self.trainer.global_step == self.fail_at:
            raise RuntimeError("boom")
        self.seen.append((self.trainer.global_step, float(x[:, 0].sum()), len(x)))
        out = self(x) if self.via_forward else self.net(x)
        loss = F.mse_loss(out, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loaders():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(200, 4, generator=gen) * 2 + 1, torch.randn(200, 1, generator=gen))
    return DataLoader(data, batch_size=BATCH), DataLoader(data, batch_size=3)


def make_trainer(tmp_path, callback, max_steps=20, loggers=None, **kwargs):
    options = {
        "max_steps": max_steps, "accumulate_grad_batches": 2, "default_root_dir": tmp_path, "accelerator": "cpu",
        "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
        "log_every_n_steps": 5, "val_check_interval": 10, "limit_val_batches": 2, "num_sanity_val_steps": 2,
        "logger": loggers if loggers is not None else CSVLogger(tmp_path, name="csv"),
    }
    options.update(kwargs)
    return lightning.Trainer(callbacks=[callback], **options)


def per_step(run, layer="net.0"):
    stats = run.stats("train")
    rows = stats[(stats.layer == layer) & (stats.channel == 0)]
    return rows.set_index("step")[["count", "mean"]]


def test_steps_are_optimizer_steps_and_nothing_else_is_recorded(tmp_path):
    torch.manual_seed(0)
    module, callback = Regressor(), CovshiftCallback(every=1)
    trainer = make_trainer(tmp_path, callback)
    train, val = loaders()
    trainer.fit(module, train, val)
    assert trainer.global_step == 20 and not callback.tracker and callback.run is not None
    # the run is stored in the trainer's log dir and loads
    assert callback.run.directory == tmp_path / "csv" / "version_0" / "covshift" == tmp_path / trainer.log_dir / "covshift"
    run = covshift.load(callback.run.directory)
    rows = per_step(run)
    # one record per optimizer step, each the 2 accumulated micro-batches (no validation or sanity-check
    # batch of 3 rows in any of them), numbered with the global step their forwards ran at
    assert rows.index.tolist() == list(range(20))
    assert (rows["count"] == 2 * BATCH).all()
    seen = pd.DataFrame(module.seen, columns=["step", "sum", "rows"]).groupby("step").sum()
    assert seen.index.tolist() == list(range(20))
    pd.testing.assert_series_equal(rows["mean"], seen["sum"] / seen["rows"], check_names=False, rtol=1e-6)
    assert set(run.stats().source) == {"train"}


def test_drift_scalars_reach_csv_and_tensorboard_loggers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    callback = CovshiftCallback(every=1, metric=["wasserstein", "mean_shift"])
    csv, tb = CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, callback, loggers=[tb, csv], max_steps=12)
    train, val = loaders()
    trainer.fit(Regressor(), train, val)
    expected = covshift.drift(callback.run, ["wasserstein", "mean_shift"])
    # logged every 5 updates (the newest step then: 4, 9) and at the end of training (11), at the trainer's steps
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    assert metrics[["step", "train_loss"]].dropna().step.tolist()[:2] == [4, 9]  # where Lightning logs its own
    for metric in ("wasserstein", "mean_shift"):
        for layer in ("net.0", "net.2"):
            column = metrics[["step", f"covshift/{metric}/{layer}"]].dropna()
            assert column.step.tolist() == [4, 9, 11]
            want = expected[(expected.metric == metric) & (expected.layer == layer)].set_index("step").value
            assert column.iloc[:, 1].tolist() == pytest.approx(want.loc[[4, 9, 11]].tolist(), rel=1e-6)
        mean = metrics[["step", f"covshift/{metric}/layer_mean"]].dropna()
        assert mean.step.tolist() == [4, 9, 11] and (mean.iloc[:, 1] > 0).all()
    assert "train_loss" in metrics  # the module's own logging is untouched
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    assert "covshift/wasserstein/net.0" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("covshift/wasserstein/layer_mean")] == [4, 9, 11]
    # the run went to the first logger's directory
    assert callback.run.directory == tmp_path / "tb" / "version_0" / "covshift"


def test_log_interval_and_no_logger(tmp_path):
    torch.manual_seed(0)
    callback = CovshiftCallback(every=2, log_every_n_steps=4, per_layer=False)
    trainer = make_trainer(tmp_path, callback, max_steps=10)
    train, val = loaders()
    trainer.fit(Regressor(), train, val)
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    # logged at the trainer's steps 3 and 7 (updates 4 and 8) and 9 (the end), where Lightning logs its own metrics;
    # the drift is of the newest recorded steps then (every=2): 2, 6 and 8
    logged = metrics[["step", "covshift/wasserstein/layer_mean", "covshift/step"]].dropna()
    assert logged.step.tolist() == [3, 7, 9] and logged["covshift/step"].tolist() == [2, 6, 8]
    assert not [c for c in metrics if c.startswith("covshift/") and not c.endswith(("layer_mean", "/step"))]
    assert sorted(set(callback.run.stats("train").step)) == [0, 2, 4, 6, 8]
    # without a logger nothing is logged and the run goes to default_root_dir
    callback = CovshiftCallback(every=2)
    trainer = make_trainer(tmp_path / "plain", callback, max_steps=4, logger=False)
    trainer.fit(Regressor(), train, val)
    assert callback.run.directory == tmp_path / "plain" / "covshift"


def test_resumed_fit_goes_on_numbering_and_takes_a_new_directory(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    first = CovshiftCallback(every=1)
    trainer = make_trainer(tmp_path, first, max_steps=6, enable_checkpointing=True, logger=False)
    module = Regressor()
    trainer.fit(module, train, val)
    trainer.save_checkpoint(tmp_path / "six.ckpt")
    second = CovshiftCallback(every=1, store=tmp_path / "resumed")
    trainer = make_trainer(tmp_path, second, max_steps=10, logger=False)
    trainer.fit(Regressor(), train, val, ckpt_path=tmp_path / "six.ckpt")
    assert per_step(first.run).index.tolist() == list(range(6))
    assert per_step(second.run).index.tolist() == list(range(6, 10))
    assert second.run.directory == tmp_path / "resumed"
    # a second fit in the same log dir does not overwrite the first run
    third = CovshiftCallback(every=1)
    make_trainer(tmp_path, third, max_steps=2, logger=False).fit(Regressor(), train, val)
    assert first.run.directory == tmp_path / "covshift" and third.run.directory == tmp_path / "covshift_1"


def test_exception_detaches_and_keeps_the_steps_so_far(tmp_path):
    torch.manual_seed(0)
    module, callback = Regressor(fail_at=3), CovshiftCallback(every=1)
    trainer = make_trainer(tmp_path, callback, logger=False)
    train, val = loaders()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module, train, val)
    assert callback.tracker is None
    assert not any(m._forward_pre_hooks for m in module.modules())
    assert per_step(covshift.load(callback.run.directory)).index.tolist() == [0, 1, 2]


@pytest.mark.parametrize("via_forward", [True, False], ids=["self(x)", "self.net(x)"])
def test_probe_runs_whichever_forward_the_training_step_calls(tmp_path, via_forward):
    torch.manual_seed(0)
    probe = torch.randn(16, 4)
    module, callback = Regressor(via_forward=via_forward), CovshiftCallback(every=1, probe=probe, probe_every=3)
    trainer = make_trainer(tmp_path, callback, max_steps=7, logger=False)
    train, val = loaders()
    trainer.fit(module, train, val)
    probes = callback.run.stats("probe")
    assert sorted(set(probes.step)) == [0, 3, 6]
    assert (probes[probes.layer == "net.0"]["count"] == 16).all()
    assert math.isfinite(covshift.noise_floor(callback.run).value.iloc[0])
    assert per_step(callback.run).index.tolist() == list(range(7))


def test_options_are_checked():
    with pytest.raises(TypeError, match="optimizer"):
        CovshiftCallback(optimizer=None)
    with pytest.raises(ValueError, match="log_every_n_steps"):
        CovshiftCallback(log_every_n_steps=-1)
    for bad in ({"every": 0}, {"probe_every": "lg"}, {"probe_every": 2.5}):  # refused before training starts
        with pytest.raises(ValueError, match="every must be a positive int"):
            CovshiftCallback(**bad)


# -- strategy="ddp": two processes, one run ---------------------------------------------
DDP_STEPS = 3  # optimizer steps, each of 2 accumulated micro-batches of BATCH rows per rank


def ddp_rows() -> TensorDataset:
    """Rows for DDP_STEPS steps of 2 micro-batches of BATCH rows on each of 2 ranks."""
    gen = torch.Generator().manual_seed(4)
    n = 2 * 2 * BATCH * DDP_STEPS
    return TensorDataset(torch.randn(n, 4, generator=gen) * 2 + 1, torch.randn(n, 1, generator=gen))


def ddp_fit(out: Path, devices: int, batch: int, order: list[int] | None = None):
    """Fit on ``ddp_rows()`` (in ``order``, if given) with covshift on every step; return the module,
    the callback and covshift's warnings. With 2 devices Lightning gives each rank a shuffled
    ``DistributedSampler`` (seed 0): rank r takes rows ``randperm[r::2]``."""
    torch.manual_seed(0)
    module, callback = Regressor(), CovshiftCallback(every=1)
    strategy = {"strategy": "ddp"} if devices > 1 else {}
    trainer = make_trainer(out, callback, max_steps=DDP_STEPS, devices=devices, num_sanity_val_steps=0,
                           log_every_n_steps=2, limit_val_batches=0, **strategy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(ddp_rows(), batch_size=batch, sampler=order))
    return module, callback, [str(w.message) for w in caught if issubclass(w.category, CovshiftWarning)]


def ddp_rank_script(out: Path) -> None:
    """One rank of the ddp fit (rank 0 launches rank 1): writes ``rank{r}.json``."""
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    from jobs import start_rank

    start_rank(out, rank)
    module, callback, caught = ddp_fit(out, devices=2, batch=BATCH)
    try:
        callback.run.stats()
        reading = None
    except RuntimeError as err:
        reading = str(err)
    result = {"directory": str(callback.run.directory), "warnings": caught, "seen": module.seen, "reading": reading}
    from jobs import finish_rank

    finish_rank(out, rank, result)


def test_ddp_fit_writes_one_run_equal_to_one_process_on_both_ranks_batches(tmp_path):
    from jobs import one_run_written, python_script, run_job

    out = tmp_path / "job"
    out.mkdir()
    run_job(python_script(__file__, str(out)), cwd=out, timeout=150)
    directory = out / "csv" / "version_0" / "covshift"
    ranks = one_run_written(out, directory)
    assert list((out / "tmp-1").iterdir()) == [] == list((out / "tmp-0").iterdir())
    assert [r["warnings"] for r in ranks] == [[], []]
    run = covshift.load(directory)
    assert run.meta["config"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    # every record is the union of both ranks' micro-batches: as one process on batches twice as large
    rows = pd.DataFrame(ranks[0]["seen"] + ranks[1]["seen"], columns=["step", "sum", "rows"]).groupby("step").sum()
    assert per_step(run)["count"].tolist() == rows["rows"].tolist() == [2 * 2 * BATCH] * DDP_STEPS
    # the DistributedSampler's permutation: its rows 2kB … 2kB+2B-1 are both ranks' k-th micro-batches
    order = torch.randperm(len(ddp_rows()), generator=torch.Generator().manual_seed(0)).tolist()
    _, single, _ = ddp_fit(tmp_path / "single", devices=1, batch=2 * BATCH, order=order)
    got, want = (r.stats().sort_values(["step", "layer", "channel"]).reset_index(drop=True) for r in (run, single.run))
    assert len(got) == len(want) == DDP_STEPS * (4 + 8)  # two layers of 4 and 8 channels
    for column in ("step", "source", "layer", "channel", "count", "nonfinite"):
        assert got[column].astype(str).tolist() == want[column].astype(str).tolist(), column
    numbers = [c for c in got.columns if c not in ("step", "source", "layer", "channel")]
    torch.testing.assert_close(torch.tensor(got[numbers].to_numpy(dtype=float)),
                               torch.tensor(want[numbers].to_numpy(dtype=float)), rtol=1e-5, atol=1e-5)
    # drift logged through rank 0's logger
    metrics = pd.read_csv(out / "csv" / "version_0" / "metrics.csv")
    assert metrics["covshift/wasserstein/layer_mean"].notna().any()


if __name__ == "__main__":  # one rank of the ddp fit
    ddp_rank_script(Path(sys.argv[1]))


def test_drift_is_logged_at_the_trainers_steps_on_a_log_schedule(tmp_path):
    """With the default (log-spaced) schedule the newest recorded step lags the update: 28 when the trainer logs 29."""
    torch.manual_seed(0)
    callback = CovshiftCallback()
    trainer = make_trainer(tmp_path, callback, max_steps=40)
    train, val = loaders()
    trainer.fit(Regressor(), train, val)
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    own = metrics[["step", "train_loss"]].dropna().step.tolist()
    logged = metrics[["step", "covshift/wasserstein/layer_mean", "covshift/step"]].dropna()
    assert logged.step.tolist()[: len(own)] == own  # the same steps as the module's own metrics
    recorded = set(callback.run.stats("train").step)
    assert set(logged["covshift/step"].astype(int)) <= recorded and (logged["covshift/step"] <= logged.step).all()
    assert (logged["covshift/step"] < logged.step).any()  # on this schedule some drift is of an earlier step


class Poisoned(Regressor):
    """A NaN reaches the model from global step 12 on."""

    def training_step(self, batch, index):
        x, y = batch
        if self.trainer.global_step >= 12:
            x = x.clone()
            x[0, 0] = float("nan")
        return super().training_step((x, y), index)


def test_on_alert_reaches_the_callbacks_function_and_the_run(tmp_path):
    torch.manual_seed(0)
    seen = []
    callback = CovshiftCallback(every=1, on_alert=seen.append)
    trainer = make_trainer(tmp_path, callback, max_steps=16)
    train, val = loaders()
    trainer.fit(Poisoned(), train, val)  # training goes on: the alert only reports
    nonfinite = [(alert.step, alert.layer) for alert in seen if alert.kind == "nonfinite"]
    assert nonfinite[0] == (12, "net.0")
    assert callback.run.alerts()[["step", "layer", "kind"]].values.tolist() == [
        [alert.step, alert.layer, alert.kind] for alert in seen]
    metrics = pd.read_csv(tmp_path / "csv" / "version_0" / "metrics.csv")
    logged = metrics[["step", "covshift/alerts"]].dropna()
    assert logged["covshift/alerts"].tolist()[-1] == len(seen) and (logged.step >= 12).all()  # in the logs too


def test_the_probe_has_one_step_more_than_training_the_final_weights(tmp_path):
    torch.manual_seed(0)
    callback = CovshiftCallback(every=1, probe=torch.randn(16, 4))
    trainer = make_trainer(tmp_path, callback, max_steps=6, logger=False)
    trainer.fit(Regressor(), *loaders())
    stats = callback.run.stats()
    assert sorted(stats[stats.source == "train"].step.unique()) == list(range(6))
    assert sorted(stats[stats.source == "probe"].step.unique()) == list(range(7))  # step 6: after the last update


def test_a_resumed_fit_with_the_same_store_appends_to_its_run(tmp_path):
    """fit(ckpt_path=...) with CovshiftCallback(store=...) of the first fit: one run, every step once."""
    torch.manual_seed(0)
    train, val = loaders()
    first = CovshiftCallback(every=1, store=tmp_path / "job")
    trainer = make_trainer(tmp_path, first, max_steps=8, enable_checkpointing=False, logger=False)

    class Checkpoint(lightning.Callback):  # a checkpoint at step 5; the fit goes on to 8, as if it then crashed
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5 and not (tmp_path / "five.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "five.ckpt")

    trainer.callbacks.append(Checkpoint())
    trainer.fit(Regressor(), train, val)
    second = CovshiftCallback(every=1, store=tmp_path / "job")
    trainer = make_trainer(tmp_path, second, max_steps=10, logger=False)
    trainer.fit(Regressor(), train, val, ckpt_path=tmp_path / "five.ckpt")
    run = covshift.load(tmp_path / "job")
    assert per_step(run).index.tolist() == list(range(10))
    assert not run.stats().duplicated(["step", "source", "layer", "channel"]).any()
    assert second.run.directory == first.run.directory == tmp_path / "job"


def test_a_compiled_module_records_what_the_eager_one_records(tmp_path):
    """``trainer.fit(torch.compile(module))``: the same records as the same fit of the module itself."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        module, callback = Regressor(via_forward=True), CovshiftCallback(every=1)
        fitted = torch.compile(module, backend="aot_eager") if compiled else module
        with warnings.catch_warnings():
            warnings.simplefilter("error", CovshiftWarning)
            make_trainer(tmp_path / str(compiled), callback, max_steps=6).fit(fitted, *loaders())
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled  # it did compile
        runs[compiled] = callback.run.stats("train").sort_values(["step", "layer", "channel"]).reset_index(drop=True)
    assert runs[True]["step"].unique().tolist() == list(range(6))
    columns = ["step", "layer", "channel", "count", "mean", "var", "min", "max", "q0.5"]
    pd.testing.assert_frame_equal(runs[True][columns], runs[False][columns], rtol=1e-6)
