"""benchmarks/gpu_check.py keeps working where there is no GPU: its CPU fallback runs end to end."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu():
    args = ["--device", "cpu", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--steps", "2"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "worst relative difference: 0.00e+00" in lines[1]
    assert [line.split()[0] for line in lines[2:6]] == ["plain", "every=1", "defaults", "gradients"]
    assert lines[5].endswith("4 steps recorded, 4 with input gradients")
    assert lines[-1] == "sync check: sync check skipped (CUDA only)"


def test_gpu_check_runs_compiled_on_the_cpu_and_records_every_step():
    args = ["--device", "cpu", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--steps", "2",
            "--compile", "--compile-backend", "aot_eager"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "torch.compile aot_eager" in lines[0]
    assert lines[3].split()[0] == "every=1" and lines[3].endswith("4 steps recorded")  # 2 warm-up steps and 2 timed
    assert lines[5].endswith("4 steps recorded, 4 with input gradients")  # relayed out of the compiled backward
