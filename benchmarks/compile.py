"""Training step time with and without ``--compile`` (`lorakit.train.compiled`) on SmolLM2-135M, CPU.

    nice -n 10 python benchmarks/compile.py                 # LoRA r=8 and LoRA-SB r=32, 6 timed steps each
    python benchmarks/compile.py --methods lora --steps 3 --out /tmp/x

One process, one model per method (all linear layers of SmolLM2 adapted): the eager step and the compiled step
(the trainer's own `CompiledForward`, inductor) alternate on the same model and the same GSM8K batches, so machine
load hits both alike.  Every batch is padded to one length (``--length``), as a packed run's rows are: one compile.
Batches of varying length (the trainer's default) cost one more compile with dynamic shapes at the second length.
The first compiled step, which compiles, is reported apart: the compile time is that step minus a compiled step.
A step is forward, backward, optimizer step and zero_grad.  Writes ``<out>/compile.json`` and ``<out>/compile.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from speed import gsm8k_batches

import lorakit
from lorakit.core.driver import build_optimizer, step_loss
from lorakit.models import load_model
from lorakit.train.compiled import CompiledForward

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"lora": lambda: lorakit.LoraConfig(r=8, target_modules="all-linear"),
           "lora-sb": lambda: lorakit.LoraSbConfig(r=32, target_modules="all-linear", init_lr=1e-6)}


def bench(method: str, steps: int, batch_size: int, length: int) -> dict[str, Any]:
    model, tok = load_model("smollm2-135m", "causal-lm")
    batches = gsm8k_batches(tok, 4, batch_size, length, fixed=True)
    data = batches[:1] if lorakit.get_method(method).needs_data else None
    lorakit.attach(model, CONFIGS[method](), data=data)
    model.train()
    hooks = lorakit.hooks(model)
    optimizer = build_optimizer(model, hooks, 1e-4, 0.0)
    compiled = CompiledForward(model, "inductor")

    def step(i: int, compile: bool) -> float:
        start = time.perf_counter()
        with compiled.active() if compile else contextlib.nullcontext():
            task, reg = step_loss(model, batches[i % len(batches)], hooks)
        (task if reg is None else task + reg).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    eager_first = step(0, False)
    compile_step = step(0, True)  # traces and compiles forward and backward
    eager, comp = [], []
    for i in range(steps):
        eager.append(step(i, False))
        comp.append(step(i, True))
    median_compiled = statistics.median(comp)
    return {"method": method, "first_eager_step_s": eager_first, "first_compiled_step_s": compile_step,
            "compile_s": compile_step - median_compiled, "eager_steps_s": eager, "compiled_steps_s": comp,
            "eager_median_s": statistics.median(eager), "compiled_median_s": median_compiled,
            "speedup": statistics.median(eager) / median_compiled,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = ["# `--compile` on CPU: SmolLM2-135M step time, eager vs torch.compile (inductor)", "",
             f"Machine: {env['cpu_cores']} CPU cores visible, {env['threads']} torch thread(s), torch {env['torch']}, "
             f"transformers {env['transformers']}; batch {env['batch_size']} x {env['length']} tokens (GSM8K, one "
             f"padded length), {env['steps']} timed steps of each, alternating.  Command: `{env['command']}`.", "",
             "| method | trainable | eager median s/step | compiled median s/step | eager / compiled | first compiled "
             "step s | compile s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['eager_median_s']:.2f} | "
                     f"{r['compiled_median_s']:.2f} | {r['speedup']:.2f}x | {r['first_compiled_step_s']:.0f} | "
                     f"{r['compile_s']:.0f} |")
    if env.get("load_average"):
        lines += ["", f"Machine load: {env['load_average']}.  Wall-clock times, so the compile time and both step "
                  "times include waiting for a core; the alternation spreads the load over eager and compiled alike."]
    if env.get("note"):
        lines += ["", f"Note: {env['note']}."]
    lines += ["", "Each step: forward (the compiled decoder; the output head on the supervised positions, eager), "
              "backward, AdamW step.  The compile time is the first compiled step minus the median compiled step; "
              "batches of varying length add one compile with dynamic shapes.  No target on CPU: these are the "
              "figures measured, on a machine shared with other work (the alternation puts its load on both)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,lora-sb")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    env = {"torch": torch.__version__, "transformers": importlib.metadata.version("transformers"),
           "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
           "length": args.length, "steps": args.steps, "command": "python " + " ".join(sys.argv),
           "load_average": f"{os.getloadavg()[0]:.1f} (1-minute load average at the start)"}
    result: dict[str, Any] = {"environment": env, "runs": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        result["runs"].append(bench(method, args.steps, args.batch_size, args.length))
        torch._dynamo.reset()
        (out / "compile.json").write_text(json.dumps(result, indent=2) + "\n")  # after each method: a kill keeps it
        (out / "compile.md").write_text(markdown(result))
        print(json.dumps(result["runs"][-1]), flush=True)
    print(markdown(result))


if __name__ == "__main__":
    main()
