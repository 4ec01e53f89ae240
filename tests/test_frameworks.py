"""Training loops users already run: a Lightning Trainer and a Hugging Face Trainer, with gradient
accumulation, attached by hand to the framework's optimizer. Steps must equal optimizer steps."""

import logging
import warnings

import lightning
import torch
import torch.nn.functional as F
import transformers
from tiny_regression import TinyRegressor, regression_rows
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import covshift
from covshift.faults import CovshiftWarning

logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def train_counts(run, layer):
    stats = run.stats("train")
    return stats[(stats.layer == layer) & (stats.channel == 0)].set_index("step")["count"].to_dict()


class Regressor(lightning.LightningModule):
    """Its training step calls ``self.net`` rather than ``self``: the root's forward never runs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.tracker = None

    def on_train_start(self):
        self.tracker = covshift.attach(self, optimizer=self.trainer.optimizers[0], every=1)

    def training_step(self, batch, index):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, index):
        x, y = batch
        self.log("val_loss", F.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_trainer_with_accumulation(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    module = Regressor()
    trainer = lightning.Trainer(
        max_epochs=1, accumulate_grad_batches=2, default_root_dir=tmp_path, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        limit_val_batches=2,
    )
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    run = module.tracker.detach()
    assert trainer.global_step == 5
    assert train_counts(run, "net.0") == {step: 8 for step in range(5)}  # 2 micro-batches of 4


class AutomaticRegressor(Regressor):
    """Attaches in ``on_train_start`` without ``optimizer=``: each training forward is a step, and
    its training step calls ``self.net``, never ``self``."""

    def on_train_start(self):
        self.tracker = covshift.attach(self, every=1)


def test_lightning_automatic_mode_records_a_training_step_that_calls_a_submodule(tmp_path):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    module = AutomaticRegressor()
    trainer = lightning.Trainer(
        max_steps=3, default_root_dir=tmp_path, accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False, limit_val_batches=2,
        val_check_interval=2, num_sanity_val_steps=1,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=5))
        run = module.tracker.detach()
    assert [str(w.message) for w in record if issubclass(w.category, CovshiftWarning)] == []
    assert trainer.global_step == 3
    assert train_counts(run, "net.0") == {step: 4 for step in range(3)}  # validation batches of 5 are not


class Attach(transformers.TrainerCallback):
    def __init__(self):
        self.tracker = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.tracker = covshift.attach(model, optimizer=optimizer, every=1)


def test_hugging_face_trainer_with_accumulation(tmp_path):
    torch.manual_seed(0)
    rows = regression_rows(32)
    callback = Attach()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
        report_to=[], use_cpu=True, logging_strategy="no", save_strategy="no", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=TinyRegressor(), args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    run = callback.tracker.detach()
    assert trainer.state.global_step == 4
    assert train_counts(run, "fc") == {step: 4 for step in range(4)}
