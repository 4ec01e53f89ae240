"""The instrument's rule: nothing covshift does raises into the user's forward, and nothing wrong is stored."""

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.faults import CovshiftWarning


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def covshift_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, CovshiftWarning)]


# -- empty inputs ---------------------------------------------------------------
class Experts(nn.Module):
    """Mixture-of-experts routing: an expert may get no tokens on a step."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 3), nn.Linear(4, 3)])

    def forward(self, x):
        route = x[:, 0] > 0
        out = torch.zeros(x.shape[0], 3)
        out[route] = self.experts[0](x[route])
        out[~route] = self.experts[1](x[~route])
        return out


def test_an_expert_with_no_tokens_records_nothing_and_the_forward_runs():
    model = Experts()
    x = torch.randn(8, 4).abs()  # every token goes to expert 0
    with covshift.attach(model, every=1) as tracker:
        out = model(x)
        model(-x)  # now every token goes to expert 1
    assert out.shape == (8, 3)
    stats = tracker.run.stats()
    assert (stats["count"] > 0).all()
    assert sorted(stats[stats.layer == "experts.0"].step.unique()) == [0]
    assert sorted(stats[stats.layer == "experts.1"].step.unique()) == [1]


@pytest.mark.parametrize(
    ("layer", "shape", "channel_dim"),
    [(nn.Linear(4, 2), (0, 4), "auto"), (nn.Conv2d(3, 2, 3), (0, 3, 8, 8), "auto"), (nn.Linear(4, 2), (0, 4), None)],
)
def test_empty_batches_are_no_record(layer, shape, channel_dim):
    model = nn.Sequential(layer)
    with covshift.attach(model, every=1, channel_dim=channel_dim) as tracker:
        model(torch.randn(shape))
        model(torch.randn(2, *shape[1:]))
    stats = tracker.run.stats()
    assert sorted(stats.step.unique()) == [1]


# -- threads --------------------------------------------------------------------
def test_two_threads_training_at_once_give_correct_records():
    model = mlp()
    errors = []
    tracker = covshift.attach(model, every=1)

    def worker(batch_size):
        try:
            for _ in range(40):
                model(torch.randn(batch_size, 4)).sum().backward()
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(size,)) for size in (3, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = tracker.detach().stats()
    assert errors == []
    assert sorted(stats.step.unique()) == list(range(80))
    per_step = stats.groupby("step")["count"].agg(["min", "max"])
    assert (per_step["min"] == per_step["max"]).all()  # no step mixes the two threads' batches
    assert sorted(per_step["min"].unique()) == [3, 5]
    assert (per_step["min"] == 3).sum() == 40


# -- faults inside covshift -----------------------------------------------------
def test_a_failing_store_warns_once_and_training_goes_on(monkeypatch):
    model = mlp()
    tracker = covshift.attach(model, every=1)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracker.run, "end_step", no_space)
    monkeypatch.setattr(tracker.run, "flush", no_space)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
        tracker.detach()
    messages = covshift_warnings(record)
    assert len([m for m in messages if "No space left on device" in m]) == 1
    assert not tracker.attached


def test_a_failing_summary_skips_that_layer_only(monkeypatch):
    model = mlp()
    tracker = covshift.attach(model, every=1)
    summarize = tracker._summarizer.summarize

    def broken(x, dim):
        if x.shape[-1] == 6:
            raise RuntimeError("boom")
        return summarize(x, dim)

    monkeypatch.setattr(tracker._summarizer, "summarize", broken)
    with pytest.warns(CovshiftWarning, match=r"layer '2'.*boom") as record:
        for _ in range(3):
            model(torch.randn(3, 4))
        stats = tracker.detach().stats()
    assert len([w for w in record if "boom" in str(w.message)]) == 1
    assert set(stats.layer) == {"0"}
    assert sorted(stats.step.unique()) == [0, 1, 2]


def test_channel_dim_out_of_range_warns_and_the_forward_runs():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.warns(CovshiftWarning, match=r"channel_dim=2 is out of range for the 2-d input of layer '0'"):
        with covshift.attach(model, every=1, channel_dim=2) as tracker:
            assert model(torch.randn(4, 3)).shape == (4, 2)
    assert tracker.run.stats().empty


def test_shared_layer_with_different_channel_counts_warns_and_skips_it():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4, elementwise_affine=False)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.norm(x)) + self.fc(self.norm(x[:2])).sum()

    model = Reused()
    with pytest.warns(CovshiftWarning, match=r"layer 'norm' saw inputs with \[2, 4\] channels in one step"):
        with covshift.attach(model, every=1, channel_dim={"norm": 0}) as tracker:
            model(torch.randn(4, 4))
    stats = tracker.run.stats()
    assert set(stats.layer) == {"fc"}


# -- two trackers ---------------------------------------------------------------
def test_a_probe_is_invisible_to_another_tracker():
    model = mlp()
    plain = covshift.attach(model, every=1)
    probing = covshift.attach(model, every=1).probe(torch.randn(6, 4), every=1)
    for size in (8, 8, 8):
        model(torch.randn(size, 4))
    probing.detach()
    stats = plain.detach().stats()
    assert sorted(stats.step.unique()) == [0, 1, 2]
    assert set(stats.source) == {"train"}
    assert (stats["count"] == 8).all()
    probe_stats = probing.run.stats("probe")
    assert (probe_stats["count"] == 6).all() and sorted(probe_stats.step.unique()) == [0, 1, 2]


# -- compilers and function transforms ------------------------------------------
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_fullgraph_compile_with_the_plain_dynamo_backend_records(order):
    torch._dynamo.reset()
    model = mlp()
    if order == "attach_then_compile":
        tracker = covshift.attach(model, every=1)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
    else:
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        tracker = covshift.attach(model, every=1)
    for _ in range(3):
        compiled(torch.randn(5, 4)).sum().backward()
    run = tracker.detach()
    assert sorted(run.stats().step.unique()) == [0, 1, 2] and (run.stats()["count"] == 5).all()
    assert model(torch.randn(2, 4)).shape == (2, 2)


def test_plain_compile_has_no_graph_break_or_recompile_from_covshift():
    torch._dynamo.reset()
    model = mlp()
    tracker = covshift.attach(model, every=2)
    explanation = torch._dynamo.explain(model)(torch.randn(5, 4))
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            compiled(torch.randn(5, 4)).sum().backward()
    tracker.detach()


def test_torch_func_grad_and_vmap_skip_wrapped_tensors_with_one_warning():
    model = mlp()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, y = torch.randn(6, 4), torch.randn(6, 2)

    def loss(p, xb, yb):
        return F.mse_loss(torch.func.functional_call(model, p, (xb,)), yb)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with covshift.attach(model, every=1) as tracker:
            grads = torch.func.grad(loss)(params, x, y)
            per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
            model(x)  # an ordinary forward is still recorded
    assert grads["0.weight"].shape == (6, 4) and per_example["0.weight"].shape == (6, 6, 4)
    messages = [m for m in covshift_warnings(record) if "torch.func" in m]
    assert len(messages) == 1
    stats = tracker.run.stats()
    assert (stats["count"] == 6).all() and stats.step.nunique() == 1


# -- warnings where the user would otherwise get silence -------------------------
def test_detach_warns_when_fewer_than_two_steps_were_recorded():
    model = mlp()
    with pytest.warns(CovshiftWarning, match=r"only 1 training step was recorded.*every=10 now"):
        with covshift.attach(model, every=10):
            for _ in range(8):
                model(torch.randn(3, 4))
    with pytest.warns(CovshiftWarning, match=r"only 1 training step was recorded \(step 0 of 1\).*train longer$"):
        with covshift.attach(model):  # the default schedule records every early step
            model(torch.randn(3, 4))
    model.eval()
    with pytest.warns(CovshiftWarning, match="no training step was recorded.*eval mode"):
        with covshift.attach(model):
            model(torch.randn(3, 4))


@pytest.mark.parametrize("optimizer", [False, True])
def test_a_failing_merge_warns_and_neither_forward_nor_update_raises(monkeypatch, optimizer):
    import covshift.record.steps

    def broken(parts):
        raise RuntimeError("merge broke")

    monkeypatch.setattr(covshift.record.steps, "merge", broken)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = covshift.attach(model, every=1, optimizer=opt if optimizer else None)
    with pytest.warns(CovshiftWarning, match="merge broke"):
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
        tracker.detach()
    assert tracker.run.stats().empty


class FailingSchedule(covshift.schedule.Schedule):
    """A user's schedule with a bug: it raises from step 2 on."""

    def records(self, step):
        if step >= 2:
            raise RuntimeError("schedule broke")
        return True

    def describe(self):
        return {"kind": "failing"}


@pytest.mark.parametrize("mode", ["forward", "optimizer", "manual", "probe"])
def test_a_schedule_that_raises_warns_once_and_neither_forward_nor_update_raises(mode):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {"optimizer": opt} if mode == "optimizer" else {"step": "manual"} if mode == "manual" else {}
    tracker = covshift.attach(model, every=1 if mode == "probe" else FailingSchedule(), **kwargs)
    if mode == "probe":
        tracker.probe(torch.randn(4, 4), every=FailingSchedule())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(5):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            if mode == "manual":
                tracker.step()
        run = tracker.detach()
    assert len([m for m in covshift_warnings(record) if "schedule broke" in m]) == 1
    assert sorted(run.stats().step.unique()) == [0, 1]  # the steps before the fault are kept


# -- why nothing was recorded: the cause that happened ----------------------------
def nothing_message(messages):
    found = [m for m in messages if "no training step was recorded" in m]
    assert len(found) == 1, messages
    return found[0]


@pytest.mark.parametrize("optimizer", [False, True])
def test_nothing_recorded_after_a_failing_probe_names_the_probe(optimizer):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    armed = False

    def probe(half):
        if armed:
            raise RuntimeError("probe broke")
        model(torch.randn(2, 4))

    tracker = covshift.attach(model, every=1, optimizer=opt if optimizer else None)
    tracker.probe(probe)
    armed = True
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
        tracker.detach()
    messages = covshift_warnings(record)
    assert len([m for m in messages if "probe broke" in m]) == 1
    message = nothing_message(messages)
    assert "running the probe failed" in message and "torch.compile" not in message


def test_nothing_recorded_when_no_selected_layer_gets_a_float_tensor_names_them():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(10, 3))

        def forward(self, index):
            return self.table[index]

    model = nn.Sequential(Lookup())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with covshift.attach(model, every=1):
            model(torch.tensor([1, 2]))
            model(torch.tensor([3, 4]))
    message = nothing_message(covshift_warnings(record))
    assert "'0' (received a torch.int64 tensor)" in message and "torch.compile" not in message


@pytest.mark.parametrize("optimizer", [False, True])
def test_a_probe_the_model_cannot_take_is_refused_at_probe(optimizer):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = covshift.attach(model, every=1, optimizer=opt if optimizer else None)
    with pytest.raises(ValueError, match=r"probe: the model's forward on the probe batch raised RuntimeError"):
        tracker.probe(torch.randn(4, 7))  # the first layer takes 4 features
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    run = tracker.detach()
    assert sorted(run.stats("train").step.unique()) == [0, 1, 2], "recording goes on"


def _forward_without_data(model, kind):
    """A forward whose tensors hold no values: on the meta device (shape inference), or fake (tracing)."""
    if kind == "meta":
        meta = {name: torch.empty_like(value, device="meta") for name, value in model.named_parameters()}
        return torch.func.functional_call(model, meta, (torch.empty(8, 4, device="meta"),))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return model(mode.from_tensor(torch.randn(8, 4)))


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize("optimizer", [False, True])
def test_a_forward_on_tensors_without_data_is_skipped_with_one_warning(tmp_path, kind, optimizer):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01) if optimizer else None
    tracker = covshift.attach(model, every=1, store=tmp_path / "r", flush_every=100, optimizer=opt)

    def train(steps):
        for _ in range(steps):
            model(torch.randn(8, 4)).sum().backward()
            if opt is not None:
                opt.step()

    train(25)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _forward_without_data(model, kind)
        train(3)
    messages = [str(w.message) for w in caught if issubclass(w.category, covshift.faults.CovshiftWarning)]
    assert len(messages) == 1 and "no values" in messages[0], messages
    assert sorted(tracker.run.stats().step.unique()) == list(range(28))
    run = tracker.detach()
    stats = covshift.load(run.directory).stats()
    assert sorted(stats.step.unique()) == list(range(28))
    assert (stats.groupby("step").size() == 4 + 6).all()  # both layers at every step, after it too


def test_a_run_resumed_late_on_the_log_schedule_says_when_the_schedule_records_next():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = covshift.attach(model, optimizer=opt)  # the log-spaced default: 40 steps per decade
    tracker.set_step(10_000)
    with pytest.warns(CovshiftWarning, match=r"only 1 training step was recorded \(step 10000 of 10041\).*train to "
                                             r"step 10593, the next one the schedule records \(log-spaced, 40 per decade now\)"):
        for _ in range(40):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
        tracker.detach()
