"""Training throughput with and without sequence packing: LoRA r=8 on SmolLM2-135M, GSM8K, the lorakit trainer.

    nice -n 10 python benchmarks/packing.py                 # defaults below; about 20 minutes on one busy CPU core
    nice -n 10 python benchmarks/packing.py --steps 2 --rounds 1 --out /tmp/x

Three configurations run the same number of optimizer steps of ``--batch-size`` rows, each from a fresh adapter:
unpacked random batches (``--no-length-grouping``), unpacked length-grouped batches (the trainer's default) and
packed rows of ``--max-length`` tokens (``--packing``; rows then hold several examples each).  They run in turn,
``--rounds`` times (so machine load drifts hit all three alike), after one warm-up step each.  Reported: real
(non-padding) tokens per second (the trainer's count over its step time) per round and their mean, and the
share of computed tokens that are padding.  Data: the first ``--examples`` GSM8K training problems from
``../shared/data`` (the repository's sibling folder), encoded as ``lorakit train --task gsm8k`` does.
Writes ``<out>/packing.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.models import load_model
from lorakit.train.config import TrainConfig
from lorakit.train.data import encode_causal_lm, load_task
from lorakit.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = {"unpacked, random batches": {"group_by_length": False},
           "unpacked, length-grouped (default)": {},
           "packed (--packing)": {"packing": True}}


def run_config(model: torch.nn.Module, features: list[dict], args: argparse.Namespace, steps: int, seed: int,
               **changes: Any) -> dict[str, float]:
    """``steps`` steps from a fresh LoRA r=8 adapter: the trainer's real and computed (padded) tokens per second."""
    lorakit.attach(model, lorakit.LoraConfig(r=8, target_modules="all-linear", seed=seed))
    try:
        packing = changes.get("packing", False)
        config = TrainConfig(steps=steps, batch_size=args.batch_size, lr=1e-4, seed=seed, log_every=0,
                             progress=False, max_length=args.max_length if packing else None, **changes)
        result = train(model, features, config, pad_token_id=args.pad_token_id)
    finally:
        lorakit.detach(model)
        gc.collect()  # the last run's optimizer and activations, before the next one allocates
    return {"tokens_per_second": result.tokens_per_second,
            "computed_tokens_per_second": result.padded_tokens_per_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="examples (unpacked) or rows (packed) per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example and per packed row")
    parser.add_argument("--examples", type=int, default=2000, help="GSM8K training problems to draw batches from")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", "causal-lm")
    args.pad_token_id = tokenizer.pad_token_id
    _, examples = load_task("gsm8k", "train", DATA, limit=args.examples)
    features = encode_causal_lm(examples, tokenizer, args.max_length, chat_template=False)
    lengths = [len(f["input_ids"]) for f in features]
    for changes in CONFIGS.values():  # warm-up: one untimed step each
        run_config(model, features, args, 1, 0, **changes)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for round_ in range(args.rounds):
        for name, changes in CONFIGS.items():
            start = time.perf_counter()
            r = run_config(model, features, args, args.steps, 1 + round_, **changes)
            rounds[name].append(r)
            print(f"round {round_ + 1} {name}: {r['tokens_per_second']:.0f} tokens/s "
                  f"({time.perf_counter() - start:.0f} s wall)", flush=True)
    rows = {name: {"tokens_per_second": sum(r["tokens_per_second"] for r in rs) / len(rs),
                   "per_round": [round(r["tokens_per_second"], 1) for r in rs],
                   "padding_share": 1 - sum(r["tokens_per_second"] for r in rs) / sum(
                       r["computed_tokens_per_second"] for r in rs)} for name, rs in rounds.items()}
    base = rows["unpacked, length-grouped (default)"]["tokens_per_second"]
    command = "nice -n 10 python benchmarks/packing.py " + " ".join(sys.argv[1:])
    report = {"command": command.strip(), "model": "smollm2-135m", "method": "lora r=8 all-linear",
              "data": f"GSM8K train, first {len(features)} problems, mean {sum(lengths) / len(lengths):.0f} tokens "
                      f"(max {max(lengths)})", "settings": {k: v for k, v in vars(args).items() if k != "pad_token_id"},
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other work, "
                         f"torch {torch.__version__}, {args.threads} torch thread(s)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Sequence packing: training throughput (lorakit trainer)", "",
             f"Command: `{report['command']}`. Machine: {report['machine']}; {report['date']}.", "",
             f"SmolLM2-135M, LoRA r=8 on every linear layer, {report['data']}; batches of {args.batch_size} "
             f"(examples unpacked, rows of up to {args.max_length} tokens packed), {args.steps} timed steps per "
             f"configuration in each of {args.rounds} interleaved rounds.", "",
             "| configuration | real tokens/s (mean of rounds) | per round | vs length-grouped | padding share |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tokens_per_second']:.0f} | {', '.join(f'{x:.0f}' for x in r['per_round'])} | "
                     f"{r['tokens_per_second'] / base:.2f}x | {100 * r['padding_share']:.1f}% |")
    (out / "packing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
