"""Run a test script under ``torchrun --standalone --nproc_per_node 2`` (2 CPU processes, gloo), as
`tests/test_ddp.py` and `tests/test_fsdp.py` do; the script gets ``OUTPUT_DIR`` as its one argument."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, output_dir: Path, timeout: int) -> None:
    """Run ``script`` (relative to the repository root) on 2 ranks; fail the test if it fails or outlasts ``timeout``
    seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               script, str(output_dir)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun with 2 processes did not finish {script} in {timeout} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
