"""Running a multi-process training script from a test: a hard deadline, and every process it started ends.

A helper module, not a test file. Launchers (Lightning's ``ddp``, ``torchrun``)
start the other ranks themselves; the script runs in a session of its own, so
when it overruns the deadline the whole session is ended (SIGTERM, which
torchrun passes on to its workers, then SIGKILL), not only the launcher, and
the test fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_job(command: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` with this checkout importable and one thread per process; fail the test on a
    non-zero exit or after ``timeout`` seconds (killing every process of the job)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)  # torchrun passes it on to its workers, in sessions of their own
        try:
            output, _ = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} still running after {timeout}s (a hang); output:\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    return subprocess.CompletedProcess(command, process.returncode, output)


def python_script(path: str | Path, *args: str) -> list[str]:
    """The command running ``path`` with this interpreter."""
    return [sys.executable, str(path), *args]


def torchrun(path: str | Path, *args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node=nproc path args`` with this interpreter's torchrun."""
    launcher = Path(sys.executable).with_name("torchrun")
    command = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*command, "--standalone", f"--nproc_per_node={nproc}", str(path), *args]


def start_rank(out: Path, rank: int) -> None:
    """In a job's process: its own temporary directory ``out/tmp-{rank}`` (so what a rank writes there shows)
    and its own directory for torch's compile cache (made by importing DDP)."""
    import tempfile

    tempfile.tempdir = str(out / f"tmp-{rank}")
    Path(tempfile.tempdir).mkdir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out / f"tmp-{rank}-inductor")


def finish_rank(out: Path, rank: int, result: dict) -> None:
    """In a job's script: write ``rank{rank}.json`` for the test, then leave the process group (without
    it, gloo's threads sometimes abort the interpreter's exit)."""
    import torch.distributed as dist

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def one_run_written(out: Path, directory: Path) -> list[dict]:
    """The ranks' results, once it is checked that rank 0 alone wrote a run (at ``directory``) and that
    rank 1 has none and says where the records are."""
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [str(p.parent) for p in out.rglob("meta.json")] == [ranks[0]["directory"]] == [str(directory)]
    assert ranks[1]["directory"] == "None" and "rank 0" in ranks[1]["reading"] and ranks[0]["reading"] is None
    return ranks

