"""The public surface is small and explicit: a change to it is a deliberate act."""

import pytest

import covshift


def test_public_names_are_pinned():
    assert sorted(covshift.__all__) == [
        "Run", "Tracker", "attach", "drift", "drift_table", "drift_to_noise", "load", "noise_floor", "plot",
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
