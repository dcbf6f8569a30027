"""Peak memory and step time of LoRA training on SmolLM2-135M with and without gradient checkpointing.

One process per setting (peak RSS only grows): ``python benchmarks/gradient_checkpointing.py 0`` then ``... 1``.
16 random sequences of 256 tokens, batch 8, LoRA r=8 on all linear layers, 2 steps, one thread.
"""

from __future__ import annotations

import resource
import sys

import torch

import lorakit
from lorakit.models import load_model
from lorakit.train.trainer import TrainConfig, train


def main(checkpointing: bool) -> None:
    torch.set_num_threads(1)
    model, _ = load_model("smollm2-135m", "causal-lm")
    lorakit.attach(model, lorakit.LoraConfig(r=8))
    g = torch.Generator().manual_seed(0)
    features = []
    for _ in range(16):
        ids = torch.randint(10, 1000, (256,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": ids})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = train(model, features, TrainConfig(steps=2, batch_size=8, lr=1e-4, progress=False, group_by_length=False,
                                                gradient_checkpointing=checkpointing))
    print(f"gradient_checkpointing={checkpointing}: RSS before training {before:.0f} MiB, peak "
          f"{result.peak_memory_mib:.0f} MiB, {result.seconds / 2:.1f} s/step, losses "
          f"{[round(x, 4) for x in result.losses]}")


if __name__ == "__main__":
    main(sys.argv[1] == "1")
