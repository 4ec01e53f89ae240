"""The public surface is small and explicit: a change to it is a deliberate act."""

import pytest

import covshift


def test_public_names_are_pinned():
    assert sorted(covshift.__all__) == [
        "Alert", "Run", "Tracker", "attach", "drift", "drift_table", "drift_to_noise", "load", "noise_floor", "plot",
        "report", "to_tensorboard",
    ]
    for name in covshift.__all__:
        assert getattr(covshift, name).__doc__, f"covshift.{name} has no docstring"


def test_version_is_a_string():
    assert isinstance(covshift.__version__, str) and covshift.__version__.count(".") == 2


@pytest.mark.parametrize("name", ["attach", "drift", "report", "load", "plot", "to_tensorboard"])
def test_public_functions_are_annotated(name):
    annotations = getattr(covshift, name).__annotations__
    assert "return" in annotations and len(annotations) > 1



def test_using_covshift_imports_no_optional_framework():
    import subprocess
    import sys

    code = (
        "import sys, torch, covshift, covshift.integrations\n"
        "model = torch.nn.Linear(3, 2)\n"
        "with covshift.attach(model, every=1):\n"
        "    model(torch.randn(4, 3)); model(torch.randn(4, 3))\n"
        "loaded = [m for m in ('lightning', 'transformers', 'timm', 'tensorboard', 'wandb', 'duckdb', 'accelerate')"
        " if m in sys.modules]\n"
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "module, names",
    [
        ("covshift.noise", ["NullFloor", "drift_to_null", "load_null_floor", "null_distribution"]),
        ("covshift.gradients", ["GradientICS", "load_gradient_ics", "plot_gradient_ics"]),
        ("covshift.verdict", ["compare", "compare_runs"]),
        ("covshift.distributed", ["DistributedError", "NonWriterRun"]),
        ("covshift.store", ["RunFileError"]),
        ("covshift.metrics", ["ks", "psi", "js", "N_PSI_BINS", "PSI_EPSILON", "register", "names", "Pair"]),
        ("covshift.schedule", ["LogSpaced", "Every"]),
        ("covshift.faults", ["CovshiftWarning"]),
        ("covshift.experiments", ["reference_pair", "model_table"]),
    ],
)
def test_documented_import_paths_keep_working(module, names):
    import importlib

    loaded = importlib.import_module(module)
    for name in names:
        assert getattr(loaded, name) is not None, f"{module}.{name}"


def test_attach_and_tracker_declare_their_settings_once():
    import dataclasses
    import inspect

    from covshift.record.settings import Settings

    fields = [field.name for field in dataclasses.fields(Settings)]
    for public in (covshift.attach, covshift.Tracker):
        parameters = inspect.signature(public).parameters
        assert list(parameters) == ["model", "layers", *fields]
        assert all(parameters[f.name].default == f.default for f in dataclasses.fields(Settings))
    documented = covshift.attach.__doc__.split("Args:")[1].split("Returns:")[0]
    assert [name for name in fields if f"\n        {name}:" not in documented] == []  # each one documented


def test_a_mistyped_setting_is_named_with_the_valid_ones():
    import torch

    with pytest.raises(TypeError, match=r"attach\(\) got an unexpected keyword argument 'evry'; .*every, sample_size"):
        covshift.attach(torch.nn.Linear(2, 2), evry=3)
    with pytest.raises(TypeError, match=r"Tracker\(\) got an unexpected keyword argument 'evry'"):
        covshift.Tracker(torch.nn.Linear(2, 2), evry=3)
