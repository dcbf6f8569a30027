"""FSDP through the Hugging Face Trainer: 2 CPU processes (gloo) with ``TrainingArguments(fsdp=True)`` and
`LorakitTrainer` hold half of every frozen base weight each and write the same adapter as one process, for each
method of `tests.hf_fsdp_train.METHODS` (one launch for all), and resume from a sharded run's checkpoint bit for bit.
The configurations the mixin cannot honour are refused with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import lorakit
from lorakit.integrations.hf import LorakitCallback, LorakitTrainer, _check_fsdp_arguments
from tests.hf_fsdp_train import METHODS, RESUMED, SAVE_EVERY, STEPS, losses, run
from tests.test_hf_callback import dataset
from tests.tiny_models import KINDS
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = Path("adapter") / "adapter_model.safetensors"


def test_trainer_under_fsdp_matches_one_process_and_writes_the_same_adapter(tmp_path):
    torchrun("tests/hf_fsdp_train.py", tmp_path / "fsdp", timeout=300)
    report = json.loads((tmp_path / "fsdp" / "report.json").read_text())

    for name in METHODS:
        # q_proj is 32 x 32: each rank held 16 rows of the base weight, as a DTensor; the ranks' adapters agree
        assert {k: v for k, v in report[name].items() if k != "losses"} == \
            {"type": "DTensor", "local_rows": 16, "ranks_agree": True}, name
        single = run(name, str(tmp_path / "single" / name))
        one, two = tmp_path / "single" / name, tmp_path / "fsdp" / name
        a, b = load_file(str(one / ADAPTER)), load_file(str(two / ADAPTER))
        assert a.keys() == b.keys(), name
        initial = load_file(str(one / f"checkpoint-{SAVE_EVERY}" / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=f"{name} {key}")
        moved = [k for k in a if k not in initial  # XGBLoRA: an offset of a layer first boosted after the checkpoint
                 or a[k].shape != initial[k].shape or not torch.allclose(a[k], initial[k], atol=1e-6)]
        assert moved, name  # steps 3 and 4 trained it
        config_one = json.loads((one / "adapter" / "adapter_config.json").read_text())
        config_two = json.loads((two / "adapter" / "adapter_config.json").read_text())
        assert config_two == config_one, name  # same method, config and fingerprints of the (unsharded) base
        assert report[name]["losses"] == pytest.approx(losses(single), abs=1e-5, rel=0), name
        assert len(report[name]["losses"]) == STEPS
        checkpoint = sorted(p.name for p in (two / f"checkpoint-{SAVE_EVERY}").iterdir())
        assert "adapter_model.safetensors" in checkpoint and "lorakit_state.json" in checkpoint
        assert "model.safetensors" not in checkpoint, name  # the adapter, not the whole model
    # Resumed under FSDP from the sharded run's checkpoint: the hooks' state (AdaLoRA's importance) comes back
    resumed = load_file(str(tmp_path / "fsdp" / f"{RESUMED}-resumed" / ADAPTER))
    full = load_file(str(tmp_path / "fsdp" / RESUMED / ADAPTER))
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
    assert report["resumed_losses"] == report[RESUMED]["losses"]


def _args(tmp_path, **changes) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, **changes)


@pytest.mark.parametrize("changes, named", [
    ({"fsdp_config": {"version": 1}}, "fsdp_version 1"),
    ({"fsdp_config": {"cpu_offload": True}}, "cpu_offload"),
    ({"fsdp_config": {"activation_checkpointing": True}}, "FSDP activation_checkpointing"),
    ({"bf16": True}, "mixed precision"),
])
def test_fsdp_settings_the_mixin_does_not_honour_are_refused(tmp_path, changes, named):
    with pytest.raises(lorakit.LorakitError, match=f"supports no {named}"):
        _check_fsdp_arguments(_args(tmp_path, fsdp=True, **changes))
    _check_fsdp_arguments(_args(tmp_path, fsdp=True))


def test_fsdp_needs_several_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    model = KINDS["llama"].build(0)
    trainer = LorakitTrainer(model=model, args=_args(tmp_path), train_dataset=dataset(4),
                             callbacks=[LorakitCallback(lorakit.LoraConfig(r=2))])
    with pytest.raises(lorakit.LorakitError, match="FSDP shards the model across processes: launch with torchrun"):
        trainer.train()
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
