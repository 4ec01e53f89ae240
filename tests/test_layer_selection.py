"""Which layers ``attach()`` selects: parametrized layers, and modules registered under two names."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import covshift
from covshift.faults import CovshiftWarning


def record(model, x, **options):
    """``(tracker, run, CovshiftWarning messages)`` after three training forwards."""
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with covshift.attach(model, every=1, **options) as tracker:
            for _ in range(3):
                model(x)
    return tracker, tracker.run, [str(w.message) for w in caught if issubclass(w.category, CovshiftWarning)]


@pytest.mark.parametrize("parametrization", [weight_norm, spectral_norm])
@pytest.mark.parametrize("bias", [False, True])
def test_a_parametrized_layer_is_selected_and_recorded_itself(parametrization, bias):
    model = nn.Sequential(
        parametrization(nn.Conv2d(3, 4, 1, bias=bias)), nn.Flatten(), parametrization(nn.Linear(4 * 5 * 5, 2, bias=bias)),
    )
    tracker, run, messages = record(model, torch.randn(2, 3, 5, 5))
    assert list(tracker.layers) == ["0", "2"]
    layers = run.layers.set_index("layer")
    assert (layers.loc["0", "channels"], layers.loc["2", "channels"]) == (3, 100)
    assert messages == []
    assert len(covshift.drift(run)) > 0


def test_a_parametrized_layer_on_its_own_is_recorded():
    model = weight_norm(nn.Linear(4, 2, bias=False))
    tracker, run, messages = record(model, torch.randn(3, 4))
    assert list(run.layers.layer) == [""] and messages == []


def test_a_module_under_two_names_answers_to_either():
    shared = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = shared
            self.b = shared

        def forward(self, x):
            return self.b(self.a(x))

    model = Twice()
    for spec, name in [(["b"], "b"), ("a", "a"), (["b", "a"], "a"), ("*", "a")]:
        tracker, run, messages = record(model, torch.randn(2, 3), layers=spec)
        assert list(tracker.layers) == [name], spec
        assert set(run.stats().groupby("step")["count"].first()) == {4}, "two calls of one module per step, once each"
        assert messages == []
    with pytest.raises(ValueError, match="valid names: 'a', 'b'"):
        covshift.attach(model, layers=["c"])
