"""Parity of the two front ends: every registered method trained through ``transformers.Trainer`` +
`LorakitCallback` gives lorakit's own trainer's loss curve and final adapter, and resumes bit for bit after a kill.

Both front ends are configured identically: the same batches in the same order (lorakit's seeded batch order, fed
to the Trainer as a sequential data set), constant lr without warm-up, clipping at 1.0, AdamW without weight decay
(the method's `build_optimizer`: `LorakitTrainer`, which resuming needs), data-driven inits run once at attach on the same batches,
and the same loss, ``model(**batch).loss`` (lorakit's default computes the logits of the supervised positions only,
and the Trainer divides a sum by the batch's token count: both round differently, and Adam turns a 1e-7 rounding
difference in a near-zero gradient into a 3e-5 difference of BA-LoRA's adapter after four steps).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import lorakit
import tests.tiny_models as tiny
from lorakit.integrations.hf import LorakitCallback, LorakitTrainer
from lorakit.io.persistence import adapter_tensors
from lorakit.train import data
from lorakit.train.progress import LOG_FILE, read_log
from lorakit.train.trainer import TrainConfig, train
from tests.tiny_models import KINDS, VOCAB

STEPS, BATCH, LR, SAVE_EVERY = 4, 4, 1e-3, 2
LLAMA = KINDS["llama"]


def features(n: int = 8) -> list[dict]:
    """``n`` prompt/completion examples of 6 to 13 tokens (prompt 3 tokens, masked), so batches are padded."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


FEATURES = features()


def in_lorakit_order() -> list[dict]:
    """The examples of lorakit's first ``STEPS`` batches, in order: the Trainer reads them sequentially."""
    batches = data.batch_indices(FEATURES, BATCH, seed=0, group_by_length=False)
    return [FEATURES[i] for _, indices in itertools.islice(batches, STEPS) for i in indices]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return data.collate(rows, pad_token_id=LLAMA.build().config.pad_token_id).inputs


def attached(name: str) -> torch.nn.Module:
    model = tiny.attach(LLAMA.build(0), lorakit.get_method(name), LLAMA)
    if hasattr(lorakit.hooks(model), "set_validation_data"):  # ALoRA scores ranks on held-out batches
        lorakit.hooks(model).set_validation_data(LLAMA.batches(2, seed=300))
    return model


def hf_run(name: str, out: Path, resume_from: Path | None = None) -> tuple[torch.nn.Module, list[float]]:
    model = attached(name)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR,
                             lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                             optim="adamw_torch", train_sampling_strategy="sequential", save_strategy="steps",
                             save_steps=SAVE_EVERY, logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0, dataloader_num_workers=0)
    callbacks = [LorakitCallback(init_batches=0)]
    trainer = LorakitTrainer(model=model, args=args, train_dataset=in_lorakit_order(), data_collator=collate,
                            callbacks=callbacks)
    trainer.model_accepts_loss_kwargs = False  # model(**batch).loss, the mean, as lorakit's trainer below
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", sorted(lorakit.methods()))
def test_hf_trainer_matches_lorakit_trainer_and_resumes_bitwise(tmp_path, monkeypatch, name):
    """The Trainer's logged loss is the objective (task loss + the method's regularizer); lorakit logs both terms.
    The resumed Trainer starts from the uninterrupted run's ``checkpoint-2`` (a kill there leaves the same files;
    `test_hf_checkpoints` kills a run for real)."""
    # lorakit's default loss takes model(**batch).loss (the mean, with the logits BA-LoRA reads), as the Trainer
    # below does, instead of its supervised-positions shortcut (equal up to float rounding)
    monkeypatch.setattr(lorakit.core.loss, "supports_fast_loss", lambda model: False)
    model = attached(name)
    train(model, FEATURES, TrainConfig(steps=STEPS, batch_size=BATCH, lr=LR, schedule="constant", max_grad_norm=1.0,
                                       group_by_length=False, seed=0, progress=False, log_every=1,
                                       output_dir=str(tmp_path / "lorakit"), save_adapter=False))
    expected = adapter_tensors(model)
    objective = [r["loss"] + r.get("regularizer", 0.0) for r in read_log(tmp_path / "lorakit" / LOG_FILE)]

    full, losses = hf_run(name, tmp_path / "full")
    assert losses == pytest.approx(objective, abs=1e-5, rel=0)
    got = adapter_tensors(full)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=key)

    resumed, resumed_losses = hf_run(name, tmp_path / "resumed", resume_from=tmp_path / "full" / "checkpoint-2")
    assert resumed_losses == losses
    final, resumed_state = full.state_dict(), resumed.state_dict()
    assert final.keys() == resumed_state.keys()
    differ = {k: float((final[k] - resumed_state[k]).abs().max()) for k in final
              if not torch.equal(final[k], resumed_state[k])}
    assert not differ  # the base weights too: a data-driven init's W0 offset is not applied twice
    saved = load_file(str(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors"))  # on_train_end
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
