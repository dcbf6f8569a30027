"""`LorakitCallback` / `LorakitTrainer` checkpoints: the lorakit adapter, the hooks' state and transformers' optimizer
and scheduler state, never the full model; resuming after a kill restores them without re-running any init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

import lorakit
from lorakit.errors import AdapterFileError
from lorakit.integrations.hf import STATE_JSON, LorakitCallback, LorakitTrainer
from lorakit.io.persistence import adapter_tensors
from tests.test_hf_callback import dataset
from tests.tiny_models import KINDS


class StopAt(TrainerCallback):
    """A kill right after step ``step`` (the last checkpoint is older)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def args(out: Path, steps: int = 4) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="linear", warmup_steps=1, optim="adamw_torch", save_strategy="steps",
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)


def lora_ga_run(out: Path, *callbacks: TrainerCallback, resume: bool = False) -> torch.nn.Module:
    """LoRA-GA attached by the callback, its gradient init on the trainer's first two batches."""
    model = KINDS["llama"].build(0)
    trainer = LorakitTrainer(model=model, args=args(out), train_dataset=dataset(16),
                             data_collator=default_data_collator,
                             callbacks=[LorakitCallback(lorakit.LoraGaConfig(r=2), init_batches=2), *callbacks])
    trainer.train(resume_from_checkpoint=resume or None)
    return model


def test_resume_after_a_kill_restores_the_adapter_without_rerunning_the_init(tmp_path):
    full = lora_ga_run(tmp_path / "full")
    lora_ga_run(tmp_path / "killed", StopAt(3))
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", STATE_JSON, "lorakit_state.safetensors",
            "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
    assert not (tmp_path / "killed" / "checkpoint-3").exists()

    resumed = lora_ga_run(tmp_path / "killed", resume=True)  # from checkpoint-2, the last one
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:  # W0 - offset included: LoRA-GA's init moved it once, not twice
        assert torch.equal(expected[key], got[key]), key


def test_checkpoints_load_with_lorakit_and_refuse_from_pretrained(tmp_path):
    """Plain Trainer + callback: ``on_save`` replaces the whole-model weights by the adapter; `lorakit.load` reads
    a checkpoint, ``from_pretrained`` fails loudly instead of re-initialising every targeted weight;
    ``on_train_end`` writes ``output_dir/adapter``."""
    model = KINDS["llama"].build(0)
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=dataset(16),
                      data_collator=default_data_collator, callbacks=[LorakitCallback(lorakit.LoraConfig(r=4))])
    trainer.train()
    trained = adapter_tensors(model)
    for directory in (tmp_path / "checkpoint-4", tmp_path / "adapter"):
        loaded = adapter_tensors(lorakit.load(KINDS["llama"].build(0), directory))
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert not (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    with pytest.raises(OSError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "checkpoint-2"))


def test_resume_from_a_damaged_lorakit_state_is_a_clear_error(tmp_path):
    lora_ga_run(tmp_path, StopAt(2))
    (tmp_path / "checkpoint-2" / STATE_JSON).write_text('{"format": "something-else"}')
    with pytest.raises(AdapterFileError, match="not a lorakit checkpoint state"):
        lora_ga_run(tmp_path, resume=True)
