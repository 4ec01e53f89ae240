"""Recording inside torch.compile: the same statistics as eager, no graph break, no recompilation.

Most tests compile with ``backend="aot_eager"`` (dynamo and AOT autograd, as the default
backend, without inductor's C++ compile: seconds on two cores); guards, graph breaks and
recompilations are dynamo's, so they are the same there. One test compiles with inductor.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import covshift
from covshift.faults import CovshiftWarning

STAT_COLUMNS = ["count", "mean", "var", "min", "max", "nonfinite", "zero_frac"]
SAMPLE_COLUMNS = ["q0.01", "q0.5", "q0.99", "binmean_00", "binmean_17"]


class TinyCNN(nn.Module):
    def __init__(self, checkpointed: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4 * 6 * 6, 3)
        self.checkpointed = checkpointed

    def forward(self, x):
        if self.checkpointed:  # the data's layer and a layer whose input has a gradient
            h = checkpoint(self.conv, x, use_reentrant=False)
            return checkpoint(self.head, self.act(h).flatten(1), use_reentrant=False)
        return self.head(self.act(self.conv(x)).flatten(1))


def tiny_cnn(checkpointed=False):
    torch.manual_seed(0)
    return TinyCNN(checkpointed)


def batches(n, size=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for _ in range(n)]


def train(order, *, mode="optimizer", steps=4, accumulate=1, every=1, backend="aot_eager", checkpointed=False,
          probe=False, fullgraph=True, gradients=False):
    """Train a fresh TinyCNN with covshift attached, compiled or eager, and return the run."""
    torch._dynamo.reset()
    model = tiny_cnn(checkpointed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = {"every": every, "gradients": gradients}
    if mode == "optimizer":
        settings["optimizer"] = opt
    if order == "eager":
        tracker, forward = covshift.attach(model, **settings), model
    elif order == "attach_then_compile":
        tracker = covshift.attach(model, **settings)
        forward = torch.compile(model, backend=backend, fullgraph=fullgraph)
    else:
        forward = torch.compile(model, backend=backend, fullgraph=fullgraph)
        tracker = covshift.attach(forward, **settings)
    if probe:
        tracker.probe(batches(1, size=6, seed=9)[0][0])
    for i, (x, y) in enumerate(batches(steps * accumulate)):
        nn.functional.cross_entropy(forward(x), y).backward()
        if (i + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
    return tracker.detach()


def sorted_stats(run, source="train"):
    return run.stats(source=source).sort_values(["step", "layer", "channel"]).reset_index(drop=True)


def assert_same_records(compiled, eager, source="train", rtol=1e-6, atol=1e-7):
    got, want = sorted_stats(compiled, source), sorted_stats(eager, source)
    assert len(want) > 0
    assert got[["step", "layer", "channel"]].equals(want[["step", "layer", "channel"]])
    columns = STAT_COLUMNS + SAMPLE_COLUMNS
    np.testing.assert_allclose(got[columns].to_numpy(float), want[columns].to_numpy(float), rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["optimizer", "per_forward"])
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_a_compiled_model_records_what_the_eager_model_records(order, mode):
    eager = train("eager", mode=mode, probe=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CovshiftWarning)  # no eval-mode or "nothing recorded" warning either
        compiled = train(order, mode=mode, probe=True)
    assert sorted(compiled.stats(source="train").step.unique()) == list(range(4))
    assert_same_records(compiled, eager)
    assert_same_records(compiled, eager, source="probe")


def test_micro_batches_of_a_compiled_model_form_one_record_per_optimizer_step():
    eager = train("eager", accumulate=3, steps=3)
    compiled = train("attach_then_compile", accumulate=3, steps=3)
    stats = compiled.stats()
    assert (stats.loc[stats.layer == "conv", "count"] == 3 * 8 * 36).all()
    assert_same_records(compiled, eager)


def test_activation_checkpointing_inside_a_compiled_model_is_not_counted_twice():
    eager = train("eager", checkpointed=True)
    compiled = train("compile_then_attach", checkpointed=True)
    assert (compiled.stats().query("layer == 'conv'")["count"] == 8 * 36).all()
    assert_same_records(compiled, eager)


@pytest.mark.parametrize("every", [3, "log"])
def test_recorded_and_unrecorded_steps_share_one_graph(every):
    torch._dynamo.reset()
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = covshift.attach(model, optimizer=opt, every=every)
    forward = torch.compile(model, backend="aot_eager", fullgraph=True)
    data = batches(1)[0]
    nn.functional.cross_entropy(forward(data[0]), data[1]).backward()  # the one compile
    opt.step()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(199):
            nn.functional.cross_entropy(forward(data[0]), data[1]).backward()
            opt.step()
            opt.zero_grad()
    run = tracker.detach()
    plan = covshift.schedule.parse(every)
    assert sorted(run.stats().step.unique()) == [step for step in range(200) if plan.records(step)]


def test_covshift_adds_no_graph_break():
    model = tiny_cnn()
    tracker = covshift.attach(model, every=1)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda x: model(x))(batches(1)[0][0])  # the call, its hooks included
    tracker.detach()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_the_default_compiler_records_what_eager_records_in_one_graph():
    """Inductor, fullgraph: the same records (to float tolerance: its kernels sum in their own order)."""
    eager = train("eager", steps=3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train("attach_then_compile", steps=3, backend="inductor")
    assert_same_records(compiled, eager, rtol=1e-4, atol=1e-5)


def test_inside_the_models_traced_forward_its_childrens_calls_relay_nothing():
    """A child's start and end hooks (for steps that call a child themselves) return at once inside the model's
    forward: traced there, they add no relay to the graph. One relay per layer input, the model's start and end."""
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), nn.Flatten(), nn.Linear(144, 3))
    tracker = covshift.attach(model, every=1)
    forward = torch.compile(model, backend=keep_graph, fullgraph=True)
    for x, _ in batches(2):
        forward(x).sum().backward()
    stats = tracker.detach().stats()
    relays = [node for node in graphs[0].graph.nodes if str(node.target) in ("covshift.relay.default", "covshift.relay")]
    assert len(graphs) == 1 and len(relays) == 4
    assert sorted(stats.step.unique()) == [0, 1] and (stats.query("layer == '0.0'")["count"] == 8 * 36).all()


def test_eval_forwards_before_training_leave_the_compiled_steps_counted():
    """A child that is a layer starts a call in its input hook: inside the model's traced forward that start
    is left out with its end, or eval forwards (before the first training one) would leave it open for good."""
    torch._dynamo.reset()
    model = sequential_cnn()
    tracker = covshift.attach(model, every=1)
    forward = torch.compile(model, backend="aot_eager")
    data = batches(3)
    model.eval()
    for x, _ in data[:2]:
        forward(x)
    model.train()
    for x, _ in data:
        forward(x).sum().backward()
    stats = tracker.detach().stats()
    assert sorted(stats.step.unique()) == [0, 1, 2] and (stats.query("layer == '0'")["count"] == 8 * 36).all()


def test_per_forward_gradients_that_cannot_be_told_apart_are_not_recorded_under_a_wrong_step():
    """Two forwards (two steps without optimizer=), then one backward: inside torch.compile which gradient is
    whose cannot be told; none is filed under the wrong step, and that is said once."""
    runs = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        model = tiny_cnn()
        tracker = covshift.attach(model, every=1, gradients=True)
        forward = torch.compile(model, backend="aot_eager") if compile_it else model
        (x1, _), (x2, _), (x3, _) = batches(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (forward(x1).sum() + forward(x2).sum()).backward()
            forward(x3).sum().backward()  # one forward, one backward: matched again
            runs.append(tracker.detach())
        messages = [str(w.message) for w in caught]
    eager, compiled = (run.stats(source="grad").query("layer == 'head'") for run in runs)
    assert sorted(eager.step.unique()) == [0, 1, 2] and sorted(compiled.step.unique()) == [2]
    assert (compiled["count"] == 8).all()
    assert sum("cannot be told inside torch.compile" in m for m in messages) == 1
    got, want = (frame.sort_values(["step", "channel"]).query("step == 2") for frame in (compiled, eager))
    np.testing.assert_allclose(got["mean"].to_numpy(), want["mean"].to_numpy(), rtol=1e-6)


def test_a_layer_in_eval_mode_inside_a_training_model_records_its_input_gradient_compiled():
    runs = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        model = tiny_cnn()
        model.head.eval()  # a frozen part: its forward is still a training forward's
        tracker = covshift.attach(model, every=1, gradients=True)
        forward = torch.compile(model, backend="aot_eager") if compile_it else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CovshiftWarning)  # the data's layer has no gradient
            for x, _ in batches(2):
                forward(x).sum().backward()
            runs.append(tracker.detach())
    assert_same_records(runs[1], runs[0], source="grad")


def test_a_graph_compiled_with_covshift_runs_on_after_detach():
    torch._dynamo.reset()
    model = tiny_cnn()
    tracker = covshift.attach(model, every=1)
    forward = torch.compile(model, backend="aot_eager")
    x = batches(1)[0][0]
    forward(x).sum().backward()
    run = tracker.detach()
    assert forward(x).shape == (8, 3)
    assert sorted(run.stats().step.unique()) == [0]


@pytest.mark.parametrize("mode", ["optimizer", "per_forward"])
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_input_gradients_of_a_compiled_model_are_the_eager_ones(order, mode):
    """Micro-batches of one update form one record; the data's layer has no gradient, as in eager."""
    eager = train("eager", mode=mode, accumulate=2, steps=3, gradients=True, probe=True)
    with pytest.warns(CovshiftWarning, match="no input gradient was recorded for") as caught:
        compiled = train(order, mode=mode, accumulate=2, steps=3, gradients=True, probe=True)
    assert "'conv'" in str(caught[0].message)
    grads = sorted_stats(compiled, "grad")
    assert list(grads.layer.unique()) == ["head"] and len(grads.step.unique()) == (3 if mode == "optimizer" else 6)
    assert_same_records(compiled, eager, source="grad")
    assert_same_records(compiled, eager)


class Residual(nn.Module):
    """``lin2``'s input is also the skip path's; ``act`` (selected) changes its input in place."""

    def __init__(self):
        super().__init__()
        self.lin1, self.act, self.lin2, self.head = nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.lin1(x)
        return self.head(self.lin2(h) + h + self.act(self.lin1(x)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_input_gradients_are_the_whole_gradient_of_the_input_and_in_place_layers_train(backend):
    """As in eager, the gradient of a layer's input is the loss's whole gradient with respect to that tensor
    (the skip path's share included), and a selected layer that changes its input in place still trains."""
    runs = []
    for compile_it in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Residual()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = covshift.attach(model, layers=["lin2", "act", "head"], optimizer=opt, every=1, gradients=True)
        forward = torch.compile(model, backend=backend) if compile_it else model
        for x, y in [(torch.randn(5, 6, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 2, 0, 1]))
                     for i in range(2)]:
            nn.functional.cross_entropy(forward(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append(tracker.detach())
    eager, compiled = runs
    assert sorted(compiled.stats(source="grad").layer.unique()) == ["act", "head", "lin2"]
    assert_same_records(compiled, eager, source="grad", rtol=1e-4, atol=1e-6)


def test_input_gradients_under_activation_checkpointing_inside_a_compiled_model_are_counted_once():
    eager = train("eager", checkpointed=True, gradients=True)
    compiled = train("compile_then_attach", checkpointed=True, gradients=True)
    assert (sorted_stats(compiled, "grad")["count"] == 8).all()  # the head's input: 8 rows of 144 channels
    assert_same_records(compiled, eager, source="grad")


def test_input_gradients_of_recorded_and_unrecorded_steps_share_one_graph():
    torch._dynamo.reset()
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = covshift.attach(model, optimizer=opt, every=3, gradients=True)
    forward = torch.compile(model, backend="aot_eager", fullgraph=True)
    data = batches(1)[0]
    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)  # the data's layer has no gradient
        for _ in range(60):
            nn.functional.cross_entropy(forward(data[0]), data[1]).backward()
            opt.step()
            opt.zero_grad()
    grads = tracker.detach().stats(source="grad")
    assert sorted(grads.step.unique()) == list(range(0, 60, 3))


def test_a_compiled_forward_without_grad_records_no_gradient():
    """A forward under no_grad (an evaluation in training mode) compiles without a gradient tap."""
    torch._dynamo.reset()
    model = tiny_cnn()
    tracker = covshift.attach(model, every=1, gradients=True)
    forward = torch.compile(model, backend="aot_eager")
    x = batches(1)[0][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)
        with torch.no_grad():
            forward(x)
        forward(x).sum().backward()
    run = tracker.detach()
    assert sorted(run.stats().step.unique()) == [0, 1]
    assert sorted(run.stats(source="grad").step.unique()) == [1]


def test_a_torch_that_cannot_relay_gradients_records_the_compiled_forwards_and_says_so_once(monkeypatch):
    from covshift.record import compiled

    monkeypatch.setattr(compiled, "GRADIENTS_SUPPORTED", False)
    torch._dynamo.reset()
    model = tiny_cnn()
    tracker = covshift.attach(model, every=1, gradients=True)
    forward = torch.compile(model, backend="aot_eager")
    with pytest.warns(CovshiftWarning, match="input gradients of forwards inside torch.compile are not recorded"):
        for x, _ in batches(3):
            forward(x).sum().backward()
    run = tracker.detach()
    assert "grad" not in run.sources().index and sorted(run.stats().step.unique()) == [0, 1, 2]


def test_torch_export_of_an_attached_model_holds_no_covshift_call():
    model = tiny_cnn()
    tracker = covshift.attach(model, every=1)
    exported = torch.export.export(model, (batches(1)[0][0],))
    tracker.detach()
    assert "covshift" not in str(exported.graph)


def sequential_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.mark.parametrize("make", [tiny_cnn, sequential_cnn])
def test_a_model_that_ran_compiled_before_attach_records_from_the_next_forward(make):
    """Dynamo does not check for hooks added after it compiled (skip_nnmodule_hook_guards): attach() drops
    that code, so the next forward compiles again with covshift's hooks. An nn.Sequential compiles a wrapper
    that all such models share."""
    torch._dynamo.reset()
    x = batches(1)[0][0]
    twin = make()  # another model of the same class, compiled without covshift
    torch.compile(twin, backend="aot_eager")(x).sum().backward()
    model = make()
    forward = torch.compile(model, backend="aot_eager")
    forward(x).sum().backward()
    tracker = covshift.attach(forward, every=1)
    for _ in range(2):
        forward(x).sum().backward()
    stats = tracker.detach().stats()
    first = stats.layer.iloc[0]
    assert sorted(stats.step.unique()) == [0, 1] and (stats.query("layer == @first")["count"] == 8 * 36).all()
    assert twin(x).shape == forward(x).shape == (8, 3)


@pytest.mark.parametrize("make", [tiny_cnn, sequential_cnn])
def test_a_twin_compiled_without_covshift_does_not_take_the_models_place(make):
    """Dynamo's code for a module without hooks would serve every module of its class: an EMA copy or a
    teacher compiled without covshift must not make the watched model skip its hooks."""
    torch._dynamo.reset()
    x = batches(1)[0][0]
    model = make()
    tracker = covshift.attach(model, every=1)
    forward = torch.compile(model, backend="aot_eager")
    forward(x).sum().backward()
    twin = torch.compile(make(), backend="aot_eager")
    for _ in range(2):
        twin(x).sum().backward()
        forward(x).sum().backward()
    stats = tracker.detach().stats()
    first = stats.layer.iloc[0]
    assert sorted(stats.step.unique()) == [0, 1, 2] and (stats.query("layer == @first")["count"] == 8 * 36).all()


def test_a_dynamo_without_the_parts_covshift_uses_warns_at_attach_and_training_runs(monkeypatch):
    """covshift reaches into dynamo's private cache functions at attach() and at steps: where another torch
    lacks them, it says so once and never raises into the user's step."""
    import torch._dynamo.eval_frame as eval_frame

    from covshift.record import compiled

    def gone(code):
        raise AttributeError("no such function in this torch")

    monkeypatch.setattr(eval_frame, "_debug_get_cache_entry_list", gone)
    monkeypatch.setattr(compiled, "_hooks_checked", False)
    model = tiny_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(CovshiftWarning, match="could not prepare torch.compile's code"):
        tracker = covshift.attach(model, optimizer=opt, every=1)
    for x, y in batches(2):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert sorted(tracker.detach().stats().step.unique()) == [0, 1]
