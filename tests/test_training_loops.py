"""Steps that are optimizer steps, in the loops users write: accumulation, checkpointing, resume, probes."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import covshift
from covshift.faults import CovshiftWarning


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def batches(n, size=5):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 4, generator=gen), torch.randn(size, 2, generator=gen)) for _ in range(n)]


def steps_and_counts(run, layer="0"):
    stats = run.stats("train")
    return stats[(stats.layer == layer) & (stats.channel == 0)].set_index("step")["count"].to_dict()


def test_gradient_accumulation_records_one_step_per_optimizer_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.attach(model, optimizer=opt, every=1) as tracker:
        for i, (x, y) in enumerate(batches(12)):
            (F.mse_loss(model(x), y) / 2).backward()
            if i % 2 == 1:
                opt.step()
                opt.zero_grad()
    assert steps_and_counts(tracker.run) == {step: 10 for step in range(6)}


def test_two_forwards_per_update_are_one_record():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.attach(model, optimizer=opt, every=1) as tracker:
        for x, y in batches(3):
            loss = F.mse_loss(model(x), y) + F.mse_loss(model(x[:2]), y[:2])
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert steps_and_counts(tracker.run) == {0: 7, 1: 7, 2: 7}


def test_every_counts_optimizer_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.attach(model, optimizer=opt, every=3) as tracker:
        for x, y in batches(14):
            for half in (x[:2], x[2:]):  # two micro-batches per update
                model(half).sum().backward()
            opt.step()
    assert sorted(steps_and_counts(tracker.run)) == [0, 3, 6, 9, 12]


def test_a_training_step_that_calls_a_submodule_is_recorded():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

    wrapper = Wrapper()
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    with covshift.attach(wrapper, optimizer=opt, every=1) as tracker:
        for x, y in batches(3):
            F.mse_loss(wrapper.net(x), y).backward()  # the root's forward never runs
            opt.step()
    assert steps_and_counts(tracker.run, "net.0") == {0: 5, 1: 5, 2: 5}


def test_without_an_optimizer_each_call_of_a_submodule_the_training_step_makes_is_a_step():
    class Module(nn.Module):  # as a LightningModule whose training_step calls self.net(x), no optimizer=
        def __init__(self):
            super().__init__()
            self.net = mlp()

    model = Module()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with covshift.attach(model, every=1) as tracker:
            for size in (3, 4, 5):
                model.net(torch.randn(size, 4)).sum().backward()
            model.eval()
            model.net(torch.randn(6, 4))  # eval mode: no step
    assert [w for w in record if issubclass(w.category, CovshiftWarning)] == []
    counts = tracker.run.stats("train").query("channel == 0 and layer == 'net.0'").set_index("step")["count"]
    assert counts.to_dict() == {0: 3, 1: 4, 2: 5}


def test_steps_counted_at_calls_of_two_submodules_are_warned_about():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    model = Pair()
    with pytest.warns(CovshiftWarning, match=r"steps were counted at each training-mode call of 'encoder', 'head'"):
        with covshift.attach(model, every=1) as tracker:
            for _ in range(2):
                model.head(model.encoder(torch.randn(3, 4)))
    assert tracker.current_step == 3


def test_eval_forwards_between_updates_are_not_recorded():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with covshift.attach(model, optimizer=opt, every=1) as tracker:
        for x, y in batches(2):
            F.mse_loss(model(x), y).backward()
            model.eval()
            with torch.no_grad():
                model(torch.randn(9, 4))
            model.train()
            opt.step()
    assert steps_and_counts(tracker.run) == {0: 5, 1: 5}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("optimizer", [False, True])
def test_checkpoint_recomputation_is_not_counted_twice(reentrant, optimizer):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = covshift.attach(model, optimizer=opt if optimizer else None, every=1)
    for x, y in batches(4):
        x.requires_grad_(True)
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=reentrant)
        F.mse_loss(out, y).backward()
        opt.step()
        opt.zero_grad()
    assert steps_and_counts(tracker.detach()) == {0: 5, 1: 5, 2: 5, 3: 5}


def test_set_step_resumes_numbering():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = covshift.attach(model, optimizer=opt, every=1)
    tracker.set_step(100)
    for x, y in batches(2):
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert tracker.current_step == 102
    assert sorted(steps_and_counts(tracker.detach())) == [100, 101]

    plain = covshift.attach(model, every=5)
    plain.set_step(10)
    for x, _ in batches(6):
        model(x)
    assert sorted(steps_and_counts(plain.detach())) == [10, 15]


def test_set_step_rejects_negative_indices():
    tracker = covshift.attach(mlp())
    with pytest.raises(ValueError, match="index"):
        tracker.set_step(-1)
    tracker.detach()


def test_optimizer_mode_rejects_manual_steps_and_removes_its_hook():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="either optimizer="):
        covshift.attach(model, optimizer=opt, step="manual")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        covshift.attach(model, optimizer="sgd")
    tracker = covshift.attach(model, optimizer=opt)
    with pytest.raises(RuntimeError, match="follow optimizer.step"):
        tracker.step()
    tracker.detach()
    assert not opt._optimizer_step_post_hooks


def test_probe_runs_once_per_probe_step_in_optimizer_mode():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = covshift.attach(model, optimizer=opt, every=1).probe(torch.randn(6, 4), every=2)
    for x, y in batches(5):
        for half in (x[:2], x[2:]):
            model(half).sum().backward()
        opt.step()
    stats = tracker.detach().stats()
    probe = stats[(stats.source == "probe") & (stats.layer == "0") & (stats.channel == 0)]
    assert sorted(probe.step) == [0, 2, 4] and (probe["count"] == 6).all()


def test_probe_takes_keywords_nested_batches_and_functions():
    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, inputs, scale=None):
            return self.fc(inputs["x"] * scale[0])

    model = Keyed()
    tracker = covshift.attach(model, every=1)
    tracker.probe({"x": torch.randn(6, 4)}, scale=(torch.ones(6, 1),), every=1)
    model({"x": torch.randn(3, 4)}, scale=(torch.ones(3, 1),))
    stats = tracker.detach().stats()
    counts = stats[stats.channel == 0].set_index("source")["count"].to_dict()
    assert counts == {"train": 3, "probe_a": 3, "probe_b": 3, "probe": 6}

    halves = []
    fixed = torch.randn(8, 4)
    tracker = covshift.attach(model, every=1)
    tracker.probe(lambda part: halves.append(part) or model({"x": fixed[part * 4 : part * 4 + 4]}, scale=[1.0]))
    model({"x": torch.randn(3, 4)}, scale=[1.0])
    stats = tracker.detach().stats()
    assert halves == [0, 1, 0, 1]  # tried once at probe(), then run at the step
    assert stats[stats.channel == 0].set_index("source")["count"].to_dict()["probe"] == 8


def test_never_called_layers_are_named_at_detach():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = Unused()
    with pytest.warns(CovshiftWarning, match=r"1 of 2 selected layers were never called.*'spare'"):
        with covshift.attach(model, every=1):
            model(torch.randn(2, 4))
            model(torch.randn(2, 4))


def test_multihead_attention_out_proj_is_not_selected_by_default():
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with covshift.attach(model, every=1) as tracker:
            model(torch.randn(2, 5, 8))
            model(torch.randn(2, 5, 8))
    assert "self_attn.out_proj" not in tracker.layers
    assert not [w for w in record if issubclass(w.category, CovshiftWarning)]
    assert set(tracker.run.layers.layer) == set(tracker.layers)


def test_eval_mode_model_says_why_nothing_was_recorded():
    model = mlp().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(CovshiftWarning, match=r"never ran a training-mode forward.*model.train\(\)"):
        with covshift.attach(model, optimizer=opt):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()


def test_layernorm_on_nchw_input_records_channels_not_width():
    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    model = nn.Sequential(nn.Conv2d(3, 12, 1), LayerNorm2d(12))
    with covshift.attach(model, every=1) as tracker:
        model(torch.randn(2, 3, 5, 7))
        model(torch.randn(2, 3, 5, 7))
    layers = tracker.run.layers.set_index("layer")
    assert layers.loc["1", "channels"] == 12 and layers.loc["1", "channel_dim"] == 1


def test_a_channel_count_that_differs_from_the_declared_size_warns_once():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.warns(CovshiftWarning, match=r"declares 4 channels but its input \(2, 3, 4\) has 3 along dim 1"):
        with covshift.attach(model, every=1, channel_dim=1):
            model(torch.randn(2, 3, 4))
            model(torch.randn(2, 3, 4))


def test_compiled_model_layers_keep_their_names():
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    tracker = covshift.attach(compiled)
    assert list(tracker.layers) == ["0", "2"]
    tracker.detach()


def test_probe_runs_when_the_training_step_never_calls_the_root():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

    wrapper = Wrapper()
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.1)
    tracker = covshift.attach(wrapper, optimizer=opt, every=1).probe(torch.randn(6, 4), every=2)
    for x, y in batches(5):
        F.mse_loss(wrapper.net(x), y).backward()  # as a Lightning training_step calling self.net(x)
        opt.step()
    stats = tracker.detach().stats()
    probe = stats[(stats.source == "probe") & (stats.layer == "net.0") & (stats.channel == 0)]
    assert sorted(probe.step) == [0, 2, 4] and (probe["count"] == 6).all()
    train = stats[(stats.source == "train") & (stats.layer == "net.0") & (stats.channel == 0)]
    assert sorted(train.step) == [0, 1, 2, 3, 4] and (train["count"] == 5).all()


@pytest.mark.parametrize("probe_inside_autocast", [False, True])
def test_probe_runs_under_the_autocast_state_of_the_training_forward(probe_inside_autocast):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []  # (probe?, dtype) of the second Linear's input: bfloat16 under CPU autocast
    model[2].register_forward_pre_hook(lambda module, args: seen.append((not torch.is_grad_enabled(), args[0].dtype)))
    tracker = covshift.attach(model, optimizer=opt, every=1)
    if probe_inside_autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tracker.probe(torch.randn(6, 4))
    else:
        tracker.probe(torch.randn(6, 4))
    seen.clear()  # the trial run of probe()
    for x, y in batches(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()  # outside autocast, as in PyTorch's AMP recipe: the next step's probe runs here
        opt.zero_grad()
    stats = tracker.detach().stats()
    assert sorted(stats[stats.source == "probe"].step.unique()) == [0, 1, 2, 3]
    assert {probe for probe, _ in seen} == {False, True}
    assert {dtype for _, dtype in seen} == {torch.bfloat16}, seen


@pytest.mark.parametrize("mode", ["optimizer", "manual", "forward"])
def test_the_probe_also_records_the_final_weights_when_steps_follow_updates(mode):
    """Why the probe can have one step more than training: where steps follow updates, the probe runs as a step
    opens, right after the update before it, so the step the last update opens (which no training forward
    reaches) holds the probe of the final weights. Each training forward is a step of its own otherwise, and
    its probe runs at its start: then probe and training have the same steps."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"optimizer": opt} if mode == "optimizer" else {"step": "manual"} if mode == "manual" else {}
    probe = torch.randn(6, 4)
    tracker = covshift.attach(model, every=1, **options).probe(probe)
    for _ in range(50):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        if mode == "manual":
            tracker.step()
    stats = tracker.detach().stats()
    steps = {source: sorted(stats[stats.source == source].step.unique()) for source in ("train", "probe")}
    assert steps["train"] == list(range(50))
    assert steps["probe"] == list(range(50 if mode == "forward" else 51))
    if mode != "forward":
        final = stats[(stats.source == "probe") & (stats.step == 50) & (stats.layer == "2")]
        with torch.no_grad():
            hidden = model[1](model[0](probe))  # what the last layer gets from the final weights
        np.testing.assert_allclose(final["mean"].to_numpy(), hidden.double().mean(0).numpy(), rtol=1e-6)
