"""Data parallelism under torchrun: 2 CPU processes (gloo) train the same adapter as one process with the same
global batch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lorakit.io.persistence import adapter_tensors
from tests.ddp_train import build_model, run
from tests.torchrun import torchrun


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single = run(str(tmp_path / "single"))
    torchrun("tests/ddp_train.py", tmp_path / "ddp", timeout=180)

    a = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    initial = adapter_tensors(build_model())
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), key
        assert not torch.allclose(a[key], initial[key], rtol=0, atol=1e-3), key  # training moved every tensor
    records = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # rank 0 alone writes the log
    assert [r["loss"] for r in records] == pytest.approx(single.losses, abs=1e-5)
    assert (tmp_path / "ddp" / "checkpoint" / "trainer_state.json").is_file()
