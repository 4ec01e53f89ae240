"""`covshift.integrations.huggingface.CovshiftCallback` in real (tiny) Hugging Face Trainer runs on CPU.

This file is also the script of the two-process run:
``torchrun --standalone --nproc_per_node=2 tests/test_integrations_huggingface.py OUT``.
"""

import glob
import math
import os
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from tiny_regression import TinyRegressor, regression_rows

import covshift

transformers = pytest.importorskip("transformers")
from covshift.faults import CovshiftWarning
from covshift.integrations.huggingface import CovshiftCallback

transformers.logging.set_verbosity_error()


def training_args(tmp_path, **kwargs):
    options = {
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 10,
        "report_to": [], "use_cpu": True, "logging_steps": 5, "save_strategy": "no", "disable_tqdm": True, "learning_rate": 1e-3,
    }
    options.update(kwargs)
    return transformers.TrainingArguments(**options)


def test_covshift_step_n_is_the_forwards_at_global_step_n(tmp_path):
    """The 1-based offset: covshift's step n holds the micro-batches run while state.global_step == n."""
    torch.manual_seed(0)
    rows = [{"x": torch.randn(4) * 3, "labels": torch.randn(1)} for _ in range(64)]
    model, callback = TinyRegressor(), CovshiftCallback(every=1)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=rows, callbacks=[callback])
    seen = []  # (global_step, sum of x[:, 0], rows) of each training forward
    model.register_forward_pre_hook(
        lambda m, args, kw: seen.append((trainer.state.global_step, float(kw["x"][:, 0].sum()), len(kw["x"])))
        if m.training else None,
        with_kwargs=True,
    )
    trainer.train()
    assert trainer.state.global_step == 10 and callback.tracker is None
    stats = callback.run.stats("train")
    record = stats[(stats.layer == "fc") & (stats.channel == 0)].set_index("step")
    forwards = pd.DataFrame(seen, columns=["step", "sum", "rows"]).groupby("step").sum()
    assert record.index.tolist() == forwards.index.tolist() == list(range(10))
    assert (record["count"] == 4).all()  # 2 micro-batches of 2
    pd.testing.assert_series_equal(record["mean"], forwards["sum"] / forwards["rows"], check_names=False, rtol=1e-6)
    # the log at the Trainer's step 5 carries covshift's step 4: the update that made global_step 5
    logged = [entry for entry in trainer.state.log_history if "covshift/step" in entry]
    assert [(entry["step"], entry["covshift/step"]) for entry in logged] == [(5, 4), (10, 9)]


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def token_rows(n, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 8), generator=gen)
    return [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(i[0] % 2)} for i in ids]


def test_bert_with_accumulation_and_evaluation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    callback = CovshiftCallback(every=1, metric=["wasserstein", "std_ratio"])
    args = training_args(
        tmp_path, eval_strategy="steps", eval_steps=5, per_device_eval_batch_size=3, report_to=["tensorboard"],
    )
    trainer = transformers.Trainer(
        model=tiny_bert(), args=args, train_dataset=token_rows(64, 0), eval_dataset=token_rows(9, 1), callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == 10
    # the run is stored under output_dir and loads; one record per update, no evaluation batch in any
    assert callback.run.directory == tmp_path / "out" / "covshift"
    run = covshift.load(tmp_path / "out" / "covshift")
    stats = run.stats("train")
    query = stats[(stats.layer == "bert.encoder.layer.0.attention.self.query") & (stats.channel == 0)]
    assert query.step.tolist() == list(range(10))
    assert (query["count"] == 2 * 2 * 8).all()  # 2 micro-batches of 2 sequences of 8 tokens
    assert set(run.stats().source) == {"train"}
    # drift in the Trainer's own logs at its logging steps, equal to covshift.drift at covshift's step
    history = trainer.state.log_history
    assert any("eval_loss" in entry for entry in history)
    assert not any("covshift/step" in entry for entry in history if "eval_loss" in entry)
    logged = [entry for entry in history if "covshift/step" in entry]
    assert [entry["step"] for entry in logged] == [5, 10] and all("loss" in entry for entry in logged)
    expected = covshift.drift(run, ["wasserstein", "std_ratio"]).set_index(["metric", "layer", "step"]).value
    for entry in logged:
        for metric in ("wasserstein", "std_ratio"):
            layer = "bert.encoder.layer.1.output.dense"
            assert entry[f"covshift/{metric}/{layer}"] == pytest.approx(expected[metric, layer, entry["step"] - 1])
            assert math.isfinite(entry[f"covshift/{metric}/layer_mean"])
    # ... and in what report_to="tensorboard" wrote: the integration ran after covshift added them
    (event_file,) = glob.glob(str(tmp_path / "out" / "**" / "events.out.tfevents.*"), recursive=True)
    events = EventAccumulator(event_file)
    events.Reload()
    assert [e.step for e in events.Scalars("train/covshift/wasserstein/layer_mean")] == [5, 10]


def test_log_false_records_without_logging(tmp_path):
    rows = regression_rows(16)
    callback = CovshiftCallback(every=1, log=False, store=tmp_path / "run")
    args = training_args(tmp_path, max_steps=4, logging_steps=2)
    trainer = transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    assert not any("covshift/step" in entry for entry in trainer.state.log_history)
    assert sorted(set(covshift.load(tmp_path / "run").stats().step)) == [0, 1, 2, 3]


def test_options_are_checked():
    with pytest.raises(TypeError, match="optimizer"):
        CovshiftCallback(optimizer=None)
    with pytest.raises(ValueError, match="every must be a positive int"):
        CovshiftCallback(every="lg")  # refused before training starts


# -- torchrun: two processes, one run ---------------------------------------------------
TORCHRUN_STEPS = 3  # updates, each of 2 micro-batches of 2 rows per rank


def torchrun_rank(out: Path) -> None:
    """One rank of a Trainer run under torchrun (gloo on the CPU): writes ``rank{r}.json`` with the rows of
    each training forward, covshift's warnings and where its run is."""
    rank = int(os.environ["RANK"])
    from jobs import start_rank

    start_rank(out, rank)
    torch.manual_seed(0)
    rows = regression_rows(64)
    model, callback = TinyRegressor(), CovshiftCallback(every=1)
    args = training_args(out, max_steps=TORCHRUN_STEPS, logging_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    seen = []  # (global_step, rows of x) of each training forward
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append((trainer.state.global_step, kw["x"].tolist())) if m.training else None,
        with_kwargs=True,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    try:
        callback.run.stats()
        reading = None
    except RuntimeError as err:
        reading = str(err)
    logged = [(e["step"], e["covshift/step"]) for e in trainer.state.log_history if "covshift/step" in e]
    result = {
        "directory": str(callback.run.directory), "seen": seen, "reading": reading, "logged": logged,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, CovshiftWarning)],
    }
    from jobs import finish_rank

    finish_rank(out, rank, result)


def test_torchrun_trainer_writes_one_run_of_the_union_over_ranks(tmp_path):
    from jobs import one_run_written, run_job, torchrun

    out = tmp_path / "job"
    out.mkdir()
    run_job(torchrun(__file__, str(out)), cwd=out, timeout=150)
    directory = out / "out" / "covshift"
    ranks = one_run_written(out, directory)
    assert list((out / "tmp-1").iterdir()) == [] == list((out / "tmp-0").iterdir())
    assert [r["warnings"] for r in ranks] == [[], []]
    run = covshift.load(directory)
    assert run.meta["config"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    # each step's record is the union of the rows both ranks' forwards took at that step
    stats = run.stats("train").query("layer == 'fc'")
    assert sorted(set(stats.step)) == list(range(TORCHRUN_STEPS))
    for step in range(TORCHRUN_STEPS):
        union = torch.tensor([row for r in ranks for s, x in r["seen"] if s == step for row in x], dtype=torch.float64)
        assert union.shape == (2 * 2 * 2, 4)  # 2 ranks x 2 micro-batches x 2 rows
        record = stats[stats.step == step].sort_values("channel")
        assert record["count"].tolist() == [len(union)] * 4
        for column, want in (("mean", union.mean(0)), ("var", union.var(0, unbiased=False)),
                             ("min", union.min(0).values), ("max", union.max(0).values)):
            torch.testing.assert_close(torch.tensor(record[column].to_numpy()), want, rtol=1e-5, atol=1e-6)
    assert ranks[0]["logged"] == [[2, 1], [3, 2]] and ranks[1]["logged"] == []  # drift logged on rank 0 only


if __name__ == "__main__":  # one rank under torchrun
    torchrun_rank(Path(sys.argv[1]))


def test_on_alert_reaches_the_callbacks_function_and_the_run(tmp_path):
    torch.manual_seed(0)
    rows = [{"x": torch.randn(4) * 3, "labels": torch.randn(1)} for _ in range(64)]
    for row in rows[20:]:
        row["x"][0] = float("nan")  # from some step on, non-finite inputs
    seen = []
    callback = CovshiftCallback(every=1, on_alert=seen.append)
    trainer = transformers.Trainer(model=TinyRegressor(), args=training_args(tmp_path), train_dataset=rows,
                                   callbacks=[callback])
    trainer.train()
    nonfinite = [alert for alert in seen if alert.kind == "nonfinite"]
    assert nonfinite and nonfinite[0].layer == "fc"
    assert callback.run.alerts()["kind"].tolist() == [alert.kind for alert in seen]


def test_training_resumed_from_a_checkpoint_with_the_same_store_appends_to_its_run(tmp_path):
    """train(resume_from_checkpoint=...) with CovshiftCallback(store=...) of the first training: one run."""
    torch.manual_seed(0)
    rows = regression_rows(64)
    args = training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=4)
    first = CovshiftCallback(every=1, log=False, store=tmp_path / "job")
    transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=rows, callbacks=[first]).train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert checkpoint.is_dir()
    second = CovshiftCallback(every=1, log=False, store=tmp_path / "job")
    args = training_args(tmp_path, max_steps=10, save_strategy="no")
    trainer = transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=rows, callbacks=[second])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    stats = covshift.load(tmp_path / "job").stats("train")
    assert sorted(stats.step.unique()) == list(range(10))
    assert not stats.duplicated(["step", "source", "layer", "channel"]).any()


def test_a_compiled_trainer_records_what_the_eager_one_records(tmp_path):
    """TrainingArguments(torch_compile=True): the same records as the same training without it."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(0)
        rows = [{"x": torch.randn(4) * 3, "labels": torch.randn(1)} for _ in range(32)]
        callback = CovshiftCallback(every=1)
        options = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        args = training_args(tmp_path / str(compiled), max_steps=4, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CovshiftWarning)
            transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=rows, callbacks=[callback]).train()
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compiled  # it did compile
        runs[compiled] = callback.run.stats("train").sort_values(["step", "layer", "channel"]).reset_index(drop=True)
    assert runs[True]["step"].unique().tolist() == list(range(4))
    columns = ["step", "layer", "channel", "count", "mean", "var", "min", "max", "q0.5"]
    pd.testing.assert_frame_equal(runs[True][columns], runs[False][columns], rtol=1e-6)
