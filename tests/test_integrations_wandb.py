"""The callbacks' drift reaches W&B through the frameworks' own W&B loggers, checked in offline mode
(``WANDB_MODE=offline``, no network): the scalars are read back from the offline run's ``.wandb`` file."""

import glob
import json
import time
from pathlib import Path

import pytest
import torch

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type, data) chunks
HEADER = 7


def finish_and_read(run_dir):
    """Finish the run, wait (up to a minute) until its offline file ends with the exit record, read it."""
    wandb.finish()
    wandb.teardown()  # stops the service process once it has written everything
    kinds = []
    for _ in range(120):
        kinds.clear()
        rows = wandb_history(run_dir, kinds)
        if "exit" in kinds:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"the offline run file holds no exit record, only {kinds}")


def wandb_history(run_dir, kinds=None):
    """Every ``run.log`` row stored in an offline run's ``.wandb`` file, as dicts."""
    (path,) = glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if kinds is not None:
                kinds.append(record.WhichOneof("record_type"))
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_CONSOLE": "off", "WANDB_PROJECT": "covshift-test"}.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()  # settings (the run directory) are read again from the environment
    yield tmp_path
    wandb.finish()
    wandb.teardown()


def test_lightning_wandb_logger_receives_drift(offline_wandb, tmp_path):
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import WandbLogger
    from test_integrations_lightning import Regressor, loaders, make_trainer

    from covshift.integrations.lightning import CovshiftCallback

    torch.manual_seed(0)
    callback = CovshiftCallback(every=1)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(tmp_path, callback, max_steps=10, loggers=logger)
    train, val = loaders()
    trainer.fit(Regressor(), train, val)
    rows = [row for row in finish_and_read(tmp_path) if "covshift/wasserstein/layer_mean" in row]
    assert [row["trainer/global_step"] for row in rows] == [4, 9]
    assert all(row["covshift/wasserstein/net.0"] > 0 for row in rows)
    assert callback.run.directory.exists()


def test_hugging_face_report_to_wandb_receives_drift(offline_wandb, tmp_path):
    pytest.importorskip("transformers")
    import transformers
    from test_integrations_huggingface import tiny_bert, token_rows, training_args

    from covshift.integrations.huggingface import CovshiftCallback

    torch.manual_seed(0)
    callback = CovshiftCallback(every=1)
    trainer = transformers.Trainer(
        model=tiny_bert(), args=training_args(tmp_path, report_to=["wandb"]), train_dataset=token_rows(64, 0),
        callbacks=[callback],
    )
    trainer.train()
    rows = [row for row in finish_and_read(tmp_path) if "train/covshift/step" in row]
    assert [(row["train/global_step"], row["train/covshift/step"]) for row in rows] == [(5, 4), (10, 9)]
    assert all(row["train/covshift/wasserstein/layer_mean"] > 0 for row in rows)
