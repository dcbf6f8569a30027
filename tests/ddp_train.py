"""Train a tiny Llama with LoRA through `lorakit.train.trainer.train`; `tests/test_ddp.py` runs this file under
``torchrun --nproc_per_node 2`` and calls `run` in-process for the single-process reference.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_train.py OUTPUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorakit
from lorakit.train.trainer import TrainConfig, TrainResult, train
from tests.tiny_models import KINDS


def features(n: int = 16) -> list[dict]:
    """Prompt/completion examples of 5 to 15 tokens, so that ranks see different numbers of loss terms."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 16, (1,), generator=g))
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def build_model() -> torch.nn.Module:
    """The tiny Llama with a LoRA adapter whose B is random too (init_weights=False), identical on every rank."""
    return lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=4, init_weights=False))


def run(output_dir: str) -> TrainResult:
    torch.set_num_threads(1)
    model = build_model()
    config = TrainConfig(steps=4, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1, log_every=1,
                         save_every=2, output_dir=output_dir, progress=False)
    return train(model, features(), config)


if __name__ == "__main__":
    run(sys.argv[1])
