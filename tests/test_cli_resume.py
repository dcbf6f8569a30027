"""`lorakit train --resume` after a kill -9 (real subprocesses), a torn log and a failing disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

import lorakit
from lorakit.errors import TrainingError
from lorakit.train import state as state_module
from lorakit.train.progress import read_log
from lorakit.train.run import RunConfig
from lorakit.train.trainer import TrainConfig, train
from tests import test_cli
from tests.test_cli import train_args
from tests.test_trainer import llama_with, lm_features

STEPS = 30  # default save_every: every 3 steps


tiny_lm = test_cli.tiny_lm  # the random 2-layer Llama directory (a module fixture)


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: same float reductions
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def adapter_content(directory: Path) -> tuple[bytes, dict, bytes]:
    """adapter_config.json's bytes, the safetensors header (parsed: safetensors writes its metadata map in a
    per-process random order) and every tensor's bytes."""
    raw = (directory / "adapter_model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return (directory / "adapter_config.json").read_bytes(), json.loads(raw[8:8 + size]), raw[8 + size:]


def checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError):  # not written yet, or between the two renames of a swap
        return 0


def test_killed_cli_train_resumes_bit_for_bit(tiny_lm: Path, tmp_path: Path) -> None:
    """kill -9 mid-run, a torn last log line, then ``--resume``: the adapter equals the uninterrupted run's."""
    common = ["--method", "lora", "-o", "r=2", "--steps", str(STEPS), "--eval-limit", "1", "--max-new-tokens", "1"]
    reference = start(train_args(tiny_lm, tmp_path / "ref", *common))
    killed_dir = tmp_path / "killed"
    victim = start(train_args(tiny_lm, killed_dir, *common))
    deadline = time.monotonic() + 120
    while checkpoint_step(killed_dir) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 3 <= checkpoint_step(killed_dir) < STEPS and not (killed_dir / "adapter").exists()
    with open(killed_dir / "log.jsonl", "a") as log:
        log.write('{"type": "train", "step": 2')  # the disk filled up mid-record
    resumed = start(train_args(tiny_lm, killed_dir, *common, "--resume"))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in err and "dropped 1 unreadable line" in err
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    assert adapter_content(killed_dir / "adapter") == adapter_content(tmp_path / "ref" / "adapter")
    steps = [json.loads(line)["step"] for line in (killed_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    run = json.loads((killed_dir / "run.json").read_text())
    assert run["config"]["save_every"] == 3 and len(run["train"]["losses"]) == STEPS


def test_default_checkpoint_interval() -> None:
    assert RunConfig(steps=30).resolved().save_every == 3
    assert RunConfig(steps=5).resolved().save_every == 1
    assert RunConfig(steps=30, save_every=0).resolved().save_every == 0
    assert RunConfig(task="arith").resolved().save_every == 6  # arith's 60 steps


def test_read_log_drops_a_torn_tail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n{"type": "tr')
    assert read_log(log) == [{"step": 1}, {"step": 2}]
    assert "dropped 1 unreadable line(s) (4)" in caplog.text


def test_a_failed_checkpoint_write_is_one_clear_error_and_keeps_the_last_one(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full while writing the step-4 checkpoint: a `TrainingError` naming the intact step-2 checkpoint."""
    real_save_file = state_module.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):  # the second checkpoint hits a full disk
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(state_module, "save_file", full_disk)
    config = TrainConfig(steps=6, batch_size=4, save_every=2, output_dir=str(tmp_path), progress=False)
    with pytest.raises(TrainingError, match=r"checkpoint of step 4 .*No space left.*last good checkpoint "
                                            r"\(step 2\).*is intact"):
        train(llama_with(lorakit.LoraConfig(r=4)), lm_features(8), config)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    assert not (tmp_path / ".checkpoint-tmp").exists()
    monkeypatch.setattr(state_module, "save_file", real_save_file)
    resumed = train(llama_with(lorakit.LoraConfig(r=4)), lm_features(8),
                    TrainConfig(steps=6, batch_size=4, save_every=2, output_dir=str(tmp_path), progress=False,
                                resume=True))
    assert resumed.steps == 6 and len(resumed.losses) == 6
