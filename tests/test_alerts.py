"""Alerts while training: drift above the floor, scale blow-up, dead channels, non-finite inputs; one per episode."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import covshift
from covshift.faults import CovshiftWarning
from covshift.record.alerts import AlertError, AlertMonitor

STEPS = 40


def _run(make_batch, on_alert, model=None, steps=STEPS, **options):
    """Forward ``make_batch(step)`` through a small MLP for ``steps`` steps, every step recorded."""
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    seen = []
    handler = (lambda alert: seen.append(alert)) if on_alert is None else on_alert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)
        with covshift.attach(model, every=1, on_alert=handler, **options) as tracker:
            with torch.no_grad():
                for step in range(steps):
                    model(make_batch(step))
    return tracker.run, seen


def _gaussian(step, shift=0.0, scale=1.0):
    return torch.randn(64, 6, generator=torch.Generator().manual_seed(step)) * scale + shift


def test_a_stationary_run_gives_no_alert():
    run, seen = _run(_gaussian, None)
    assert seen == [] and run.alerts().empty


def test_a_jump_in_the_input_distribution_is_one_drift_alert():
    run, seen = _run(lambda step: _gaussian(step, shift=4.0 if step >= 25 else 0.0), None)
    drift = [alert for alert in seen if alert.kind == "drift"]
    assert [(alert.step, alert.layer) for alert in drift][:1] == [(25, "0")]
    assert all(alert.step == 25 for alert in drift)  # the shift holds afterwards: no drift step to step
    assert drift[0].ratio >= 8 and drift[0].value == pytest.approx(drift[0].ratio * drift[0].floor)
    stored = run.alerts()
    assert len(stored) == len(seen) and stored["kind"].tolist() == [alert.kind for alert in seen]


def test_a_scale_blow_up_alerts_once_per_episode():
    run, seen = _run(lambda step: _gaussian(step, scale=50.0 if 20 <= step < 30 else 1.0), None)
    scale = [alert for alert in seen if alert.kind == "scale" and alert.layer == "0"]
    assert [alert.step for alert in scale] == [20]  # one alert for the ten steps of the episode
    assert scale[0].metric == "σ" and scale[0].ratio > 10


def test_dying_units_alert_as_dead_channels():
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))

    def batch(step):
        if step == 20:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)  # every unit of the ReLU stops firing
        return _gaussian(step)

    _, seen = _run(batch, None, model=model)
    dead = [alert for alert in seen if alert.kind == "dead"]
    assert [(alert.step, alert.layer) for alert in dead] == [(20, "2")] and dead[0].value == 1.0


def test_non_finite_inputs_alert_at_once_even_in_the_warm_up():
    def batch(step):
        x = _gaussian(step)
        if step in (3, 4, 30):
            x[0, 0] = float("nan")
        return x

    _, seen = _run(batch, None)
    nonfinite = [(alert.step, alert.layer) for alert in seen if alert.kind == "nonfinite" and alert.layer == "0"]
    assert nonfinite == [(3, "0"), (30, "0")]  # steps 3 and 4 are one episode


def test_warn_and_raise():
    with pytest.warns(CovshiftWarning, match=r"covshift alert: step 25, layer '0': drift"):
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        with covshift.attach(model, every=1, on_alert="warn"):
            for step in range(30):
                model(_gaussian(step, shift=4.0 if step >= 25 else 0.0))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(AlertError, match=r"step 25, layer '0': drift") as raised:
        with covshift.attach(model, every=1, optimizer=opt, on_alert="raise"):
            for step in range(30):
                model(_gaussian(step, shift=4.0 if step >= 25 else 0.0)).sum().backward()
                opt.step()  # the step closes here: the alert stops training
    assert raised.value.alert.step == 25


def test_thresholds_are_set_with_a_monitor_and_bad_ones_are_refused():
    seen = []
    _run(lambda step: _gaussian(step, shift=4.0 if step >= 25 else 0.0), AlertMonitor(seen.append, factor=1e6))
    assert not [alert for alert in seen if alert.kind == "drift"]
    with pytest.raises(ValueError, match="on_alert must be"):
        covshift.attach(nn.Linear(2, 2), on_alert="loud")
    with pytest.raises(ValueError, match="factor must be a number above 1"):
        AlertMonitor("warn", factor=0.5)


def test_the_report_leads_with_the_alerts(tmp_path):
    run, seen = _run(lambda step: _gaussian(step, shift=4.0 if step >= 25 else 0.0), None, store=tmp_path / "run")
    html = covshift.report(covshift.load(tmp_path / "run"), tmp_path / "report").read_text(encoding="utf-8")
    box = html[html.index("<div class=alerts"):]
    assert html.index("<div class=alerts") < html.index("<section id=verdict>")
    assert "step 25, layer &#x27;0&#x27;: drift" in box


def test_watch_prints_the_worst_layers_of_a_run_being_written(tmp_path, capsys):
    from covshift.cli import main

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)
        tracker = covshift.attach(model, every=1, on_alert=lambda alert: None, store=tmp_path / "run", flush_every=5)
        for step in range(30):
            model(_gaussian(step, shift=4.0 if step >= 25 else 0.0))
        assert main(["watch", str(tmp_path / "run"), "--once", "--top", "1"]) == 0  # while it is still attached
        tracker.detach()
    lines = capsys.readouterr().out.splitlines()
    run = covshift.load(tmp_path / "run")
    assert lines[0].startswith(f"run 'run' at {tmp_path / 'run'}: 30 recorded steps, newest 29")
    assert lines[1].split() == ["layer", "type", "wasserstein", "now", "alerts"]
    newest = covshift.drift(run).query("step == 29").sort_values("value", ascending=False).iloc[0]
    alerts = run.alerts()
    assert lines[2].split() == [str(newest.layer), "Linear", f"{newest.value:.4g}",
                                str(int((alerts["layer"] == str(newest.layer)).sum()))]
    assert len(lines) == 4 and lines[3].startswith(f"{len(alerts)} alerts; newest: step ")


def test_live_tensorboard_log_while_training(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CovshiftWarning)
        with covshift.attach(model, every=1, tensorboard=tmp_path / "tb") as tracker:
            for step in range(30):
                model(_gaussian(step, shift=4.0 if step >= 25 else 0.0))
            events = EventAccumulator(str(tmp_path / "tb"))
            events.Reload()  # read while training runs: written at each recorded step
            assert [e.step for e in events.Scalars("covshift/live/scale/0")] == list(range(30))
    events.Reload()
    drift = {e.step: e.value for e in events.Scalars("covshift/live/drift/0")}
    assert drift[25] > 8 * drift[24] and sorted(drift) == list(range(1, 30))  # none at the first step
    assert events.Scalars("covshift/live/alerts")[-1].value == len(tracker.run.alerts()) >= 1
    assert "covshift/alerts/text_summary" in events.Tags()["tensors"]
