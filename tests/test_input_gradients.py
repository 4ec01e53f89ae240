"""``attach(..., gradients=True)``: per-channel summaries of ∂loss/∂(layer input), source ``"grad"``.

Each test computes the same statistics by hand from ``Tensor.register_hook`` on the
inputs of the same forward, and compares.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import covshift
from covshift.faults import CovshiftWarning
from covshift.record.layers import select_layers


class Spy:
    """The gradient reaching every given layer's input, by ``register_hook``, per forward (a list per layer)."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.grads: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        self.handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            if x.requires_grad and torch.is_grad_enabled():
                x.register_hook(lambda g: self.grads[name].append(g.detach().clone()))
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def per_channel(grads: list[torch.Tensor], dim: int) -> dict[str, np.ndarray]:
    """count, mean, var (population), min, max per channel of the concatenated gradients."""
    moved = torch.cat([g.movedim(dim, -1).reshape(-1, g.shape[dim]) for g in grads]).double()
    return {"count": np.full(moved.shape[1], moved.shape[0]), "mean": moved.mean(0).numpy(),
            "var": moved.var(0, unbiased=False).numpy(), "min": moved.amin(0).numpy(), "max": moved.amax(0).numpy()}


def assert_matches(run: covshift.Run, layer: str, step: int, expected: dict[str, np.ndarray]) -> None:
    rows = run.stats("grad", layers=layer)
    rows = rows[rows["step"] == step].sort_values("channel")
    assert len(rows) == len(expected["mean"]), f"{layer} step {step}"
    assert rows["count"].tolist() == expected["count"].tolist()
    for column in ("mean", "var", "min", "max"):
        np.testing.assert_allclose(rows[column].to_numpy(), expected[column], rtol=1e-5, atol=1e-12,
                                   err_msg=f"{layer} {column}")


def _train(model, batches, *, optimizer=True, accumulate=1, layers=None, forward=None, **options):
    forward = forward or model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    spied = select_layers(model, layers)
    spy = Spy(spied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)
        with covshift.attach(model, layers, every=1, gradients=True, optimizer=opt if optimizer else None,
                             **options) as tracker:
            for i, (x, y) in enumerate(batches):
                loss = F.cross_entropy(forward(x), y) / accumulate
                loss.backward()
                if (i + 1) % accumulate == 0:
                    opt.step()
                    opt.zero_grad()
    spy.close()
    return tracker.run, spy.grads


def _batches(shape, n=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer-steps", "forward-steps"])
def test_linear_input_gradients_equal_a_hand_computation(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    run, grads = _train(model, _batches((16, 5)), optimizer=optimizer)
    assert "grad" in run.sources().index
    for step in range(4):
        assert_matches(run, "2", step, per_channel([grads["2"][step]], dim=1))
    assert set(run.stats("grad")["layer"].astype(str)) == {"2"}  # the data has no gradient


def test_conv_layernorm_and_attention_inputs():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
            self.norm = nn.LayerNorm(6)
            self.block = nn.TransformerEncoderLayer(6, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = self.conv2(torch.relu(self.conv(x)))  # (N, 6, 4, 4)
            tokens = self.norm(h.flatten(2).transpose(1, 2))  # (N, 16, 6)
            return self.head(self.block(tokens).mean(1))

    model = Net()
    layers = ["conv2", "norm", "block.linear1", "block.norm1", "head"]
    run, grads = _train(model, _batches((4, 2, 4, 4), n=2), layers=layers)
    assert_matches(run, "conv2", 1, per_channel([grads["conv2"][1]], dim=1))  # NCHW: channels on dim 1
    for layer in ("norm", "block.linear1", "block.norm1", "head"):
        assert_matches(run, layer, 1, per_channel([grads[layer][1]], dim=-1))


def test_micro_batches_of_one_update_form_one_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    run, grads = _train(model, _batches((8, 5), n=6), accumulate=3)
    assert sorted(run.stats("grad")["step"].unique()) == [0, 1]
    assert_matches(run, "2", 0, per_channel(grads["2"][:3], dim=1))
    assert_matches(run, "2", 1, per_channel(grads["2"][3:], dim=1))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_records_each_gradient_once(reentrant):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    plain, _ = _train(make(), _batches((8, 5)))
    model = make()
    model[0].weight.requires_grad_(True)

    def forward(x):
        x = x.requires_grad_(True) if reentrant else x  # reentrant checkpointing needs an input that requires grad
        hidden = checkpoint(lambda t: model[3](model[2](model[1](model[0](t)))), x, use_reentrant=reentrant)
        return model[4](hidden)

    checkpointed, _ = _train(model, _batches((8, 5)), forward=forward)
    expected = plain.stats("grad").set_index(["step", "layer", "channel"])
    got = checkpointed.stats("grad").set_index(["step", "layer", "channel"])
    got = got.drop(index="0", level="layer", errors="ignore")  # the reentrant case made the data require grad
    assert list(got.index) == list(expected.index)
    np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(got["count"], expected["count"])


def test_probes_and_eval_forwards_record_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)
        with covshift.attach(model, every=1, gradients=True, optimizer=opt) as tracker:
            tracker.probe(torch.randn(8, 5))
            for x, y in _batches((16, 5), n=3):
                F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                model.eval()
                F.cross_entropy(model(x), y).backward()  # an eval forward and its backward: not training
                model.train()
                opt.zero_grad()
    grad = tracker.run.stats("grad")
    assert set(tracker.run.sources().index) == {"train", "probe", "probe_a", "probe_b", "grad"}
    assert (grad["count"] == 16).all() and sorted(grad["step"].unique()) == [0, 1, 2]


def test_an_input_without_gradient_records_nothing_and_says_so_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    for parameter in model[0].parameters():
        parameter.requires_grad_(False)  # frozen first layer: layer 2's input needs no gradient either
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05)
    with pytest.warns(CovshiftWarning, match=r"no input gradient was recorded for '0', '2'") as caught:
        with covshift.attach(model, every=1, gradients=True, optimizer=opt) as tracker:
            for x, y in _batches((16, 5), n=3):
                F.cross_entropy(model(x), y).backward()
                opt.step()
    assert sum("no input gradient" in str(w.message) for w in caught) == 1
    assert "grad" not in tracker.run.sources().index


def test_gradient_records_feed_drift_and_are_off_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    run, _ = _train(model, _batches((16, 5), n=4))
    drift = covshift.drift(run, "wasserstein", source="grad")
    assert sorted(drift["step"].unique()) == [0, 1, 2, 3] and drift["value"].iloc[0] == 0.0
    plain = covshift.attach(nn.Linear(2, 2), every=1)
    plain.model(torch.randn(3, 2, requires_grad=True)).sum().backward()
    assert "grad" not in plain.detach().sources().index


def test_the_report_draws_input_gradients_and_flags_a_vanishing_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # the gradient reaching layer 2's input: 10,000× smaller than at the head
    run, _ = _train(model, _batches((16, 5), n=4), store=tmp_path / "run")
    page = covshift.report(run, tmp_path / "report")
    html = page.read_text(encoding="utf-8")
    assert (tmp_path / "report" / "input-gradients.png").is_file() and "Input gradients" in html
    verdict = html[html.index("<section id=verdict>"):html.index("</section>")]
    assert "layer 2&#x27;s input gradient is" in verdict and "(vanishing)" in verdict
    assert "layer 4&#x27;s input gradient" not in verdict  # the head reads the loss's gradient directly


def test_a_report_without_gradient_records_has_no_gradient_view(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    with covshift.attach(model, every=1, store=tmp_path / "run"):
        for x, _ in _batches((16, 5), n=3):
            model(x)
    covshift.report(covshift.load(tmp_path / "run"), tmp_path / "report")
    assert not list((tmp_path / "report").glob("input-gradients*.png"))
