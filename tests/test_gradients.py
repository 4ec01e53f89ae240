"""Gradient ICS (Santurkar et al. 2018, Definition 2.1): closed form, invariants, no side effects."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import covshift
from covshift.reporting.plots import plot_gradient_ics
from covshift.science.gradient_ics import GRADIENTS_FILE, GradientICS, GradientICSWarning, load_gradient_ics


def squared_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((output - target) ** 2).sum()


def test_two_layer_linear_network_matches_the_closed_form(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    w1, w2 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    with GradientICS(model, opt, squared_loss, every=1, directory=tmp_path) as ics:
        opt.zero_grad()
        squared_loss(model(x), y).backward()
        ics.batch(x, y)
        opt.step()
    # L = ½‖X W1ᵀ W2ᵀ − Y‖²: ∂L/∂W2 = Rᵀ H with H = X W1ᵀ, R = H W2ᵀ − Y; ∂L/∂W1 = W2ᵀ Rᵀ X.
    h = x @ w1.T
    r = h @ w2.T - y
    g2, g1 = r.T @ h, w2.T @ r.T @ x
    h_new = x @ (w1 - lr * g1).T  # layer 1 after the SGD step, layer 2 still old
    g2_prime = (h_new @ w2.T - y).T @ h_new
    frame = ics.frame().set_index("layer")
    assert frame.loc["1", "grad_norm"] == pytest.approx(float(g2.norm()), rel=1e-12)
    assert frame.loc["1", "ics_norm"] == pytest.approx(float((g2 - g2_prime).norm()), rel=1e-10)
    cos = float((g2 * g2_prime).sum() / (g2.norm() * g2_prime.norm()))
    assert frame.loc["1", "cosine"] == pytest.approx(cos, rel=1e-12)
    assert frame.loc["0", "grad_norm"] == pytest.approx(float(g1.norm()), rel=1e-12)
    assert frame.loc["0", "ics_norm"] == 0.0  # the first layer has no earlier layer
    assert frame.loc["1", "ics_norm"] > 0
    stored = load_gradient_ics(tmp_path)
    assert stored.equals(ics.frame())


def test_ics_is_zero_when_the_earlier_layers_are_frozen():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    with GradientICS(model, opt, F.cross_entropy, every=1) as ics:
        for _ in range(3):
            x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            ics.batch(x, y)
            opt.step()
    frame = ics.frame()
    assert list(frame["layer"].cat.categories) == ["0", "2", "4"]
    assert (frame["ics_norm"] == 0).all()
    last = frame[frame["layer"] == "4"]
    assert (last["grad_norm"] > 0).all()
    assert list(last["cosine"]) == pytest.approx([1.0] * 3)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 4))


def _train(model: nn.Module, measure: bool, steps: int = 5):
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = torch.Generator().manual_seed(3)
    ics = GradientICS(model, opt, F.cross_entropy, every=2) if measure else None
    torch.manual_seed(7)
    losses = []
    with covshift.attach(model, optimizer=opt, every=1) as tracker:
        for _ in range(steps):
            x, y = torch.randn(12, 6, generator=data), torch.randint(0, 4, (12,), generator=data)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if ics is not None:
                ics.batch(x, y)
            opt.step()
            losses.append(loss.item())
    grads = [p.grad.clone() for p in model.parameters()]
    return opt, losses, grads, torch.get_rng_state(), ics, tracker.run


def test_model_buffers_rng_optimizer_state_and_records_are_bit_identical_to_a_twin():
    torch.manual_seed(0)
    measured = _net()
    twin = copy.deepcopy(measured)
    opt_m, losses_m, grads_m, rng_m, ics, run_m = _train(measured, measure=True)
    opt_t, losses_t, grads_t, rng_t, _, run_t = _train(twin, measure=False)
    assert len(ics.frame()) == 3 * 3  # steps 0, 2, 4; layers 0, 1 (BatchNorm) and 4
    assert losses_m == losses_t
    for (name, a), b in zip(measured.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(grads_m, grads_t))
    assert torch.equal(rng_m, rng_t)
    state_m, state_t = opt_m.state_dict()["state"], opt_t.state_dict()["state"]
    assert state_m.keys() == state_t.keys()
    for key in state_m:
        for field in state_m[key]:
            assert torch.equal(torch.as_tensor(state_m[key][field]), torch.as_tensor(state_t[key][field]))
    # a covshift tracker on the same model does not see the extra passes
    assert run_m.stats().drop(columns=[]).equals(run_t.stats())


def test_layers_cover_every_module_with_parameters_and_can_be_chosen():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert GradientICS(model, opt, F.cross_entropy).layers == ["0", "1", "4"]
    assert GradientICS(model, opt, F.cross_entropy, layers=["4"]).layers == ["4"]
    with pytest.raises(ValueError, match=r"layers \['2'\] own no parameters"):
        GradientICS(model, opt, F.cross_entropy, layers=["2"])
    with pytest.raises(ValueError, match="every must be a positive int"):
        GradientICS(model, opt, F.cross_entropy, every=0)


def test_every_and_a_missing_batch_warn_once_and_never_raise(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ics = GradientICS(model, opt, squared_loss, every=3, directory=tmp_path)
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.warns(GradientICSWarning, match="call ics.batch"):
        for step in range(7):
            opt.zero_grad()
            squared_loss(model(x), y).backward()
            if step != 3:
                ics.batch(x, y)
            opt.step()
    assert sorted(set(ics.frame()["step"])) == [0, 6]
    ics.close()
    ics.close()  # idempotent
    opt.step()  # no hooks left


def test_a_failing_loss_switches_measurement_off_without_touching_training():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken(output, target):
        raise RuntimeError("bad loss")

    ics = GradientICS(model, opt, broken, every=1)
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.warns(GradientICSWarning, match="RuntimeError: bad loss"):
        for _ in range(2):
            opt.zero_grad()
            squared_loss(model(x), y).backward()
            ics.batch(x, y)
            opt.step()
    assert ics.frame().empty and ics.step == 2


def test_figure_takes_an_ax(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientICS(model, opt, F.cross_entropy, every=1) as ics:
        for _ in range(2):
            x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            ics.batch(x, y)
            opt.step()
    ax = Figure().subplots()
    assert plot_gradient_ics(ics.frame(), "relative", ax=ax) is ax
    assert len(ax.lines) == 2
    assert not math.isnan(ics.frame()["cosine"].iloc[-1])
    with pytest.raises(ValueError, match="value must be one of"):
        plot_gradient_ics(ics.frame(), "nope", ax=ax)
    assert not (tmp_path / GRADIENTS_FILE).exists()
