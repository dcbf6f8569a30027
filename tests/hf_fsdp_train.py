"""Train a tiny Llama with each of `METHODS` through ``transformers.Trainer`` + `LorakitCallback` +
`LorakitTrainer`, one method after another; `tests/test_hf_fsdp.py` runs this file under
``torchrun --nproc_per_node 2`` with ``TrainingArguments(fsdp=True)`` (one launch for all methods) and calls `run`
in-process for the single-process references.

Both sides see the same optimizer steps: 8 examples a step in micro-batches of 2 read sequentially (one process
accumulating 4 micro-batches, or 2 ranks accumulating 2 each), and a data-driven init on the first micro-batch
(the single process's, rank 0's under FSDP, which every rank takes).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_fsdp_train.py OUTPUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorakit
import tests.tiny_models as tiny
from lorakit.integrations.hf import LorakitCallback, LorakitTrainer
from tests.fsdp_train import ranks_agree
from tests.test_hf_callback import dataset
from tests.tiny_models import KINDS

LLAMA = KINDS["llama"]
METHODS = ("lora", "pissa", "lora-ga", "adalora", "xgblora")
# Non-trivial starts (B random), AdaLoRA pruning within the run, XGBLoRA merging a round into the sharded W0 at step 2.
OPTIONS = {"lora": {"init_weights": False}, "adalora": {"target_r": 2, "tinit": 0, "tfinal": 1, "delta_t": 1},
           "xgblora": {"kappa": 2}}
STEPS, MICRO, EXAMPLES_PER_STEP, LR, SAVE_EVERY = 4, 2, 8, 3e-3, 2
RESUMED = "adalora"  # also resumed from its sharded run's checkpoint-2, under FSDP
CHECKPOINTED = "lora"  # trained with gradient_checkpointing=True (both sides)


def run(name: str, output_dir: str, world: int = 1, resume_from: str | None = None) -> LorakitTrainer:
    """``name``'s run on ``world`` processes (FSDP when more than one); the adapter is attached by the callback."""
    torch.set_num_threads(1)
    fsdp = {"fsdp": True, "fsdp_config": {"version": 2}} if world > 1 else {}
    args = lorakit_args(output_dir, world, gradient_checkpointing=name == CHECKPOINTED, **fsdp)
    config = tiny.make_config(lorakit.get_method(name), LLAMA, **OPTIONS.get(name, {}))
    trainer = LorakitTrainer(model=LLAMA.build(0), args=args, train_dataset=dataset(), callbacks=[
        LorakitCallback(config, init_batches=1)])
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def lorakit_args(output_dir: str, world: int, **changes):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=EXAMPLES_PER_STEP // (MICRO * world), learning_rate=LR,
                             lr_scheduler_type="constant", train_sampling_strategy="sequential",
                             save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0, **changes)


def losses(trainer: LorakitTrainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main(out: Path) -> None:
    report = {}
    for name in METHODS:
        trainer = run(name, str(out / name), world=int(os.environ["WORLD_SIZE"]))
        model = trainer.model
        weight = lorakit.adapter_layers(model)["model.layers.0.self_attn.q_proj"].base.weight
        report[name] = {"type": type(weight).__name__, "local_rows": weight.to_local().shape[0],
                        "ranks_agree": ranks_agree(model), "losses": losses(trainer)}
    resumed = run(RESUMED, str(out / f"{RESUMED}-resumed"), world=int(os.environ["WORLD_SIZE"]),
                  resume_from=str(out / RESUMED / f"checkpoint-{SAVE_EVERY}"))
    report["resumed_losses"] = losses(resumed)
    if dist.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
