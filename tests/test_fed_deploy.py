"""Deployment-shaped run: a real SuperLink and two SuperNodes on loopback, driven by ``flwr run``."""

from __future__ import annotations

import pytest

from lorakit.fed import checkpoint, runner
from tests.test_fed_common import save_tiny_classifier, tiny_config


def test_loopback_superlink_and_two_supernodes(tmp_path) -> None:
    model_dir = save_tiny_classifier(tmp_path / "tiny-bert")
    cfg = tiny_config(model_dir, tmp_path, strategy="fedex-lora", clients=2, rounds=2, mode="deployment")
    # Bounded, but generously: every round starts a ClientApp process per client (torch, the model), which a slow
    # or loaded machine makes slow; the processes are stopped in a finally whatever happens.
    result = runner.deploy(cfg, workdir=tmp_path / "work", timeout=900)
    assert [h["round"] for h in result["history"]] == [0, 1, 2]
    assert all(h.get("clients") == 2 and not h["excluded"] for h in result["history"][1:]), \
        [h["excluded"] for h in result["history"]]  # each excluded client with its reason
    comm = {int(k): v for k, v in result["comm"].items()}
    assert comm[1]["up"] == comm[2]["up"] > 0
    assert comm[2]["down"] > comm[1]["down"]  # round 2 also carries FedEx-LoRA's folded residuals
    state = checkpoint.load(cfg.output_dir, cfg)
    assert state is not None and state.round == 2 and state.offsets
    for name in ("superlink.log", "supernode-0.log", "supernode-1.log"):
        assert (tmp_path / "work" / name).is_file()
