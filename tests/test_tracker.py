"""attach(): layer selection, steps, probes, hook lifecycle, robustness, on real models."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import covshift


def train(model, batches, tracker=None, accumulate=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for i, (x, target) in enumerate(batches):
        out = model(x)
        out = out[0] if isinstance(out, tuple) else out
        loss = F.mse_loss(out, target) / accumulate
        loss.backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
            if tracker is not None and tracker.manual:
                tracker.step()


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )


def cnn_batches(n=3, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randn(size, 3, generator=g)) for _ in range(n)]


def recorded(run, source="train"):
    stats = run.stats(source)
    return stats.groupby("layer", observed=True).agg(channels=("channel", "nunique"), steps=("step", "nunique"))


def test_mlp_records_every_layer_input_per_step():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.LayerNorm(7), nn.Linear(7, 2))
    batches = [(torch.randn(16, 5), torch.randn(16, 2)) for _ in range(4)]
    with covshift.attach(model, every=1) as tracker:
        train(model, batches)
    table = recorded(tracker.run)
    assert table.to_dict("index") == {
        "0": {"channels": 5, "steps": 4}, "2": {"channels": 7, "steps": 4}, "3": {"channels": 7, "steps": 4},
    }
    stats = tracker.run.stats()
    assert sorted(stats.step.unique()) == [0, 1, 2, 3]
    assert (stats["count"] == 16).all()
    first = stats[(stats.step == 0) & (stats.layer == "0")]
    np.testing.assert_allclose(first["mean"], batches[0][0].mean(0).double().numpy(), rtol=1e-5)


def test_stats_has_the_contract_columns():
    model = cnn()
    with covshift.attach(model) as tracker:
        train(model, cnn_batches(1))
    columns = tracker.run.stats().columns
    for name in ["step", "layer", "channel", "count", "mean", "var", "min", "max", "nonfinite", "zero_frac",
                 "source", "q0.01", "q0.05", "q0.15", "q0.25", "q0.5", "q0.75", "q0.85", "q0.95", "q0.99"]:
        assert name in columns


def test_cnn_channel_axis_is_dim_1():
    model = cnn()
    with covshift.attach(model, every=1) as tracker:
        train(model, cnn_batches(2))
    layers = tracker.run.layers.set_index("layer")
    assert layers.loc["0", "channels"] == 1 and layers.loc["1", "channels"] == 4
    assert layers.loc["3", "channels"] == 4 and layers.loc["6", "channels"] == 96
    assert layers.loc["1", "channel_dim"] == 1 and layers.loc["6", "channel_dim"] == 1
    counts = tracker.run.stats().groupby("layer", observed=True)["count"].first()
    assert counts["0"] == 8 * 8 * 8 and counts["3"] == 8 * 6 * 6 and counts["6"] == 8


def test_resnet18_records_all_convs_and_norms():
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    batches = [(torch.randn(2, 3, 32, 32), torch.randn(2, 4)) for _ in range(2)]
    with covshift.attach(model, every=1, layers=(nn.Conv2d, nn.BatchNorm2d, nn.Linear)) as tracker:
        train(model, batches)
    table = recorded(tracker.run)
    assert len(table) == 20 + 20 + 1  # 20 convs, 20 batch norms, the fc layer
    assert (table.steps == 2).all()
    assert table.loc["conv1", "channels"] == 3 and table.loc["layer4.1.bn2", "channels"] == 512
    assert table.loc["fc", "channels"] == 512


def test_transformer_encoder_records_attention_and_feed_forward():
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    batches = [(torch.randn(4, 5, 16), torch.randn(4, 5, 16)) for _ in range(3)]
    with covshift.attach(model, every=1) as tracker:
        train(model, batches)
    table = recorded(tracker.run)
    for i in range(2):
        for name in ["self_attn", "linear1", "linear2", "norm1", "norm2"]:
            assert table.loc[f"layers.{i}.{name}", "steps"] == 3
    assert table.loc["layers.0.linear2", "channels"] == 32
    assert table.loc["layers.0.self_attn", "channels"] == 16
    assert (tracker.run.stats()["count"] == 4 * 5).all()


def test_lstm_records_sequence_features_on_last_dim():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, 10, batch_first=True)
            self.head = nn.Linear(10, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = Tagger()
    batches = [(torch.randn(3, 7, 6), torch.randn(3, 7, 2)) for _ in range(2)]
    with covshift.attach(model, every=1) as tracker:
        train(model, batches)
    table = recorded(tracker.run)
    assert table.loc["lstm", "channels"] == 6 and table.loc["head", "channels"] == 10
    assert (tracker.run.stats()["count"] == 21).all()


def test_layer_selection_by_pattern_type_and_predicate():
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(8, 1)))
    names = lambda spec: list(covshift.attach(model, spec).layers)  # noqa: E731
    assert names("features.*") == ["features.0", "features.1", "features.2"]
    assert names(nn.Conv2d) == ["features.0", "features.2"]
    assert names(["head.1", "features.0"]) == ["features.0", "head.1"]
    assert names(lambda name, module: name.endswith("2")) == ["features.2"]
    assert names(None) == ["features.0", "features.2", "head.1"]


def test_unknown_layer_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"layers='conv9' matches no module.*'0', '1', '2'"):
        covshift.attach(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), "conv9")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"every": 0}, "every must be a positive int, got 0"), ({"step": "often"}, "step must be 'auto' or 'manual'"),
     ({"sample_size": -3}, "sample_size must be a positive int, got -3"),
     ({"sample_size": True}, "sample_size must be a positive int, got True"),
     ({"flush_every": 0}, "flush_every must be a positive int, got 0"),
     ({"channel_dim": "last"}, "channel_dim must be 'auto', None or an int"),
     ({"channel_dim": {"0": 1.5}}, "channel_dim must be 'auto', None or an int"),
     ({"channel_dim": {"fc": 1}}, r"channel_dim names layers that are not recorded: \['fc'\]")],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        covshift.attach(nn.Linear(2, 2), **kwargs)


def test_attach_needs_a_module():
    with pytest.raises(TypeError, match="needs a torch.nn.Module, got function"):
        covshift.attach(lambda x: x)


def test_every_records_one_step_in_n():
    model = cnn()
    with covshift.attach(model, every=3) as tracker:
        train(model, cnn_batches(7))
    assert sorted(tracker.run.stats().step.unique()) == [0, 3, 6]
    assert tracker.current_step == 6


def test_eval_forwards_are_not_steps_and_not_recorded():
    model = cnn()
    with covshift.attach(model, every=1) as tracker:
        train(model, cnn_batches(2))
        model.eval()
        with torch.no_grad():
            model(torch.randn(5, 1, 8, 8))
        model.train()
        train(model, cnn_batches(1))
    stats = tracker.run.stats()
    assert sorted(stats.step.unique()) == [0, 1, 2]
    assert (stats["count"] % 8 == 0).all()  # no record holds the eval batch of 5


def test_manual_steps_merge_micro_batches():
    model = cnn()
    with covshift.attach(model, every=1, step="manual") as tracker:
        train(model, cnn_batches(6), tracker, accumulate=3)
    stats = tracker.run.stats()
    assert sorted(stats.step.unique()) == [0, 1]
    linear = stats[stats.layer == "6"]
    assert (linear["count"] == 3 * 8).all()


def test_step_is_only_for_manual_mode():
    tracker = covshift.attach(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="step='manual'"):
        tracker.step()
    tracker.detach()


def test_weight_shared_layer_is_merged_into_one_record():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    model = Twice()
    x = torch.randn(10, 4)
    with covshift.attach(model, every=1, sample_size=10**6) as tracker:
        model(x)
    stats = tracker.run.stats()
    assert len(stats) == 4 and (stats["count"] == 20).all()
    both = torch.cat([x, torch.relu(model.shared(x))]).detach().double().numpy()
    np.testing.assert_allclose(stats["mean"], both.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["max"], both.max(0), rtol=1e-6)


def test_outputs_on_request():
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with covshift.attach(model, every=1, outputs=True) as tracker:
        model(torch.randn(4, 3))
    table = recorded(tracker.run)
    assert table.loc["0:output", "channels"] == 5 and table.loc["2:output", "channels"] == 2


def test_layer_names_with_a_colon_are_recorded_with_their_outputs():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"enc:0": nn.Linear(3, 5)})

        def forward(self, x):
            return self.blocks["enc:0"](x)

    model = Named()
    with covshift.attach(model, every=1, outputs=True) as tracker:
        model(torch.randn(4, 3))
    table = recorded(tracker.run)
    assert table.loc["blocks.enc:0", "channels"] == 3 and table.loc["blocks.enc:0:output", "channels"] == 5


def test_whole_layer_summary_on_request():
    model = cnn()
    with covshift.attach(model, every=1, channel_dim={"1": None}) as tracker:
        train(model, cnn_batches(1))
    table = recorded(tracker.run)
    assert table.loc["1", "channels"] == 1 and table.loc["3", "channels"] == 4


def test_detach_removes_every_hook_and_keeps_users_hooks():
    model = cnn()
    calls = []
    model[3].register_forward_pre_hook(lambda module, args: calls.append("user"))
    before = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    tracker = covshift.attach(model, outputs=True)
    assert len(model[3]._forward_pre_hooks) == 2
    train(model, cnn_batches(2))
    tracker.detach()
    tracker.detach()  # idempotent
    after = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    assert after == before
    assert calls == ["user", "user"]
    assert not tracker.attached


def test_forward_that_raises_leaves_no_hook_and_no_partial_step():
    model = cnn()
    with pytest.raises(RuntimeError):
        with covshift.attach(model, every=1) as tracker:
            train(model, cnn_batches(1))
            model(torch.randn(2, 3, 8, 8))  # wrong channel count: the first conv raises
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert sorted(tracker.run.stats().step.unique()) == [0]


def test_failed_forward_is_discarded_and_counting_goes_on():
    model = cnn()
    tracker = covshift.attach(model, every=1)
    train(model, cnn_batches(1))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 2, 8, 8))
    train(model, cnn_batches(1))
    stats = tracker.detach().stats()
    assert sorted(stats.step.unique()) == [0, 2]
    assert (stats["count"] % 8 == 0).all()


def test_non_float_and_missing_inputs_warn_once_per_layer():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, tokens):
            return self.norm(self.embed(tokens))

    model = Mixed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with covshift.attach(model, ["embed", "norm"], every=1) as tracker:
            for _ in range(3):
                model(torch.randint(0, 10, (2, 5)))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'embed'" in messages[0] and "torch.int64" in messages[0]
    assert list(recorded(tracker.run).index) == ["norm"]
    assert list(covshift.attach(model).detach().layers.layer) == []
    assert list(covshift.attach(model).layers) == ["norm"]  # embeddings take indices: not selected by default


def test_probe_restores_buffers_and_rng_bit_identically():
    model = nn.Sequential(cnn(), nn.Dropout(0.5))  # dropout draws from the CPU generator
    train(model, cnn_batches(1))
    probe_batch = torch.randn(16, 1, 8, 8)
    tracker = covshift.attach(model, every=1).probe(probe_batch, every=1)
    # Compare against a model the probe never touches, trained on the same batches.
    twin = nn.Sequential(cnn(), nn.Dropout(0.5))
    twin.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    train(model, cnn_batches(2))
    torch.manual_seed(3)
    train(twin, cnn_batches(2))
    tracker.detach()
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert model.training


def test_probe_records_halves_and_whole_batch():
    model = cnn()
    tracker = covshift.attach(model, every=1).probe(torch.randn(10, 1, 8, 8), every=2)
    train(model, cnn_batches(5))
    run = tracker.detach()
    stats = run.stats()
    assert sorted(stats[stats.source == "probe"].step.unique()) == [0, 2, 4]
    linear = stats[stats.layer == "6"].groupby("source")["count"].first()
    assert linear.to_dict() == {"probe": 10, "probe_a": 5, "probe_b": 5, "train": 8}
    assert sorted(run.stats("train").step.unique()) == [0, 1, 2, 3, 4]


def test_probe_in_eval_model_changes_nothing_recorded_for_training():
    model = cnn()
    tracker = covshift.attach(model, every=1).probe(torch.randn(4, 1, 8, 8))
    model.eval()
    model(torch.randn(3, 1, 8, 8))
    assert tracker.detach().stats().empty


@pytest.mark.parametrize(
    ("batch", "message"),
    [(torch.randn(1, 3), "at least 2 examples"), (("text",), "must contain a tensor"),
     ((torch.randn(4, 2), torch.randn(3, 2)), "disagree on the batch size")],
)
def test_bad_probe_batches_are_rejected(batch, message):
    tracker = covshift.attach(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=message):
        tracker.probe(batch)
    tracker.detach()


@pytest.mark.parametrize(
    ("module", "ndim", "axis"),
    [(nn.InstanceNorm1d(4), 2, 0), (nn.InstanceNorm1d(4), 3, 1), (nn.InstanceNorm2d(4), 3, 0),
     (nn.InstanceNorm2d(4), 4, 1), (nn.BatchNorm1d(4), 2, 1), (nn.Conv2d(2, 4, 3), 3, 0),
     (nn.Conv2d(2, 4, 3), 4, 1), (nn.Linear(3, 2), 3, 2)],
)
def test_auto_channel_axis_batched_and_unbatched(module, ndim, axis):
    assert covshift.record.layers.channel_axis(module, (2,) * ndim) == axis
