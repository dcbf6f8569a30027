"""RankAdaptor on SmolLM2-135M pruned 20% and 50% (run by hand; reads GSM8K from --data-dir).

    python benchmarks/rankadaptor.py                       # the full budget below (hours on 2 CPU cores)
    python benchmarks/rankadaptor.py --small               # the committed run: minutes, see results/rankadaptor.md

For each ratio: `lorakit.prune.prune_llama` (Taylor scores on 10 arith examples, blocks 4..27 of 30 pruned), then
the RankAdaptor search (`search_ranks`: uniform rank 8 first, then ``per_round`` random and model-proposed
configurations per round, each a ``search_steps`` LoRA fine-tune scored by minus the mean answer NLL on held-out
arith and GSM8K items), then the recovery fine-tune (``steps`` steps on an arith + GSM8K mix) with the chosen
per-block ranks and with uniform LoRA rank 8 (the same parameter budget: the search never exceeds it), over
``seeds``.  Reported: answer NLL (lower is better) on the arith test split and the first GSM8K test items, for
the unpruned model, the pruned model, and both recoveries (mean ± std over seeds), plus the search's own cost.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.methods.rankadaptor import RankAdaptorConfig, block_costs, search_ranks
from lorakit.models import load_model
from lorakit.prune import calibration_batches, prune_llama
from lorakit.train.data import encode_causal_lm, load_task
from lorakit.train.evaluate import answer_nll
from lorakit.train.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
FULL = {"ratios": [0.2, 0.5], "seeds": [0, 1, 2], "steps": 300, "search_steps": 40, "rounds": 4, "per_round": 6,
        "train_n": 2000, "eval_n": 100, "batch_size": 8}
SMALL = {"ratios": [0.2, 0.5], "seeds": [0, 1], "steps": 10, "search_steps": 4, "rounds": 2, "per_round": 1,
         "train_n": 64, "eval_n": 12, "batch_size": 2}
R_UNIFORM, LR, MAX_LENGTH = 8, 1e-3, 96


def encoded(tokenizer: Any, budget: dict[str, Any], data_dir: Path) -> dict[str, list[dict[str, list[int]]]]:
    n, k = budget["train_n"], budget["eval_n"]
    enc = lambda examples: encode_causal_lm(examples, tokenizer, MAX_LENGTH, chat_template=False)  # noqa: E731
    arith_train = enc(load_task("arith", "train", limit=n)[1])
    gsm_train = enc(load_task("gsm8k", "train", data_dir, limit=n + k)[1])
    return {"train": arith_train + gsm_train[:n], "search_arith": enc(load_task("arith", "dev", limit=k)[1]),
            "search_gsm8k": gsm_train[n:n + k], "arith": enc(load_task("arith", "test", limit=k)[1]),
            "gsm8k": enc(load_task("gsm8k", "test", data_dir, limit=k)[1])}


def nll(model: torch.nn.Module, data: dict[str, Any], keys: tuple[str, ...] = ("arith", "gsm8k")) -> dict[str, float]:
    return {key: answer_nll(model, data[key], batch_size=8) for key in keys}


def recover(model: torch.nn.Module, ranks: tuple[int, ...], data: dict[str, Any], steps: int, seed: int,
            batch_size: int) -> None:
    """Attach per-block-rank LoRA (uniform when all ranks are equal) and train ``steps`` steps."""
    lorakit.attach(model, RankAdaptorConfig(r=max(ranks), block_ranks=ranks, seed=seed))
    train(model, data["train"], TrainConfig(steps=steps, batch_size=batch_size, lr=LR, seed=seed, log_every=0,
                                            save_adapter=False, progress=False, warmup_ratio=0.1))


def run_ratio(base: torch.nn.Module, tokenizer: Any, ratio: float, data: dict[str, Any],
              budget: dict[str, Any]) -> dict[str, Any]:
    model = copy.deepcopy(base)
    report = prune_llama(model, calibration_batches(tokenizer, "arith", 10), ratio)
    out: dict[str, Any] = {"ratio": ratio, "params_before": report.params_before,
                           "params_after": report.params_after, "removed_share": report.removed_share,
                           "layers": list(report.layers), "pruned": nll(model, data)}
    shapes = [(n, m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    costs = block_costs(shapes)
    fixed = [b for b in range(len(costs)) if b not in report.pruned_blocks]

    def score(ranks: tuple[int, ...]) -> float:
        recover(model, ranks, data, budget["search_steps"], 0, budget["batch_size"])
        value = -statistics.mean(nll(model, data, ("search_arith", "search_gsm8k")).values())
        lorakit.detach(model)
        return value

    start = time.perf_counter()
    result = search_ranks(score, costs, R_UNIFORM, fixed_blocks=fixed, rounds=budget["rounds"],
                          per_round=budget["per_round"], seed=0)
    out["search"] = {"seconds": time.perf_counter() - start, "fine_tunes": len(result.history),
                     "steps": len(result.history) * budget["search_steps"], "best": list(result.best),
                     "best_score": result.best_score, "uniform_score": result.history[0][1],
                     "history": [[list(c), s] for c, s in result.history], "predictor_mse": result.predictor_fit,
                     "budget": R_UNIFORM * sum(costs),
                     "best_params": sum(c * k for c, k in zip(costs, result.best))}
    for name, ranks in (("uniform", (R_UNIFORM,) * len(costs)), ("rankadaptor", result.best)):
        runs = []
        for seed in budget["seeds"]:
            recovered = copy.deepcopy(model)
            start = time.perf_counter()
            recover(recovered, ranks, data, budget["steps"], seed, budget["batch_size"])
            runs.append({**nll(recovered, data), "seconds": time.perf_counter() - start})
        out[name] = runs
    return out


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def markdown(results: dict[str, Any]) -> str:
    budget = results["budget"]
    lines = ["# RankAdaptor on SmolLM2-135M (pruned), answer NLL (lower is better)", "",
             f"Budget: `{json.dumps(budget)}`; uniform LoRA rank {R_UNIFORM}, lr {LR}, alpha = r (scale 1).",
             f"Command: `{results['command']}` ({results['seconds']:.0f} s wall, 2 shared CPU cores).", "",
             f"Unpruned: arith {results['unpruned']['arith']:.3f}, GSM8K {results['unpruned']['gsm8k']:.3f}.", "",
             "| pruned | params removed (of all, embeddings incl.) | method | arith NLL | GSM8K NLL |",
             "|---|---|---|---|---|"]
    for r in results["ratios"]:
        share = f"{100 * r['removed_share']:.1f}%"
        lines.append(f"| {r['ratio']:.0%} | {share} | none (pruned) | {r['pruned']['arith']:.3f} | "
                     f"{r['pruned']['gsm8k']:.3f} |")
        for name in ("uniform", "rankadaptor"):
            runs = r[name]
            lines.append(f"| {r['ratio']:.0%} | {share} | {name} | {mean_std([x['arith'] for x in runs])} | "
                         f"{mean_std([x['gsm8k'] for x in runs])} |")
    lines += ["", "Search cost and choice:", ""]
    for r in results["ratios"]:
        s = r["search"]
        lines.append(f"- {r['ratio']:.0%}: {s['fine_tunes']} short fine-tunes ({s['steps']} steps), "
                     f"{s['seconds']:.0f} s; score (−mean held-out NLL) uniform {s['uniform_score']:.3f} -> best "
                     f"{s['best_score']:.3f}; ranks {s['best']}; {s['best_params']:,} of {s['budget']:,} "
                     "trainable parameters.")
    lines += ["", "What this budget cannot show: with " + f"{len(budget['seeds'])} seeds, {budget['steps']} recovery "
              f"steps and {budget['eval_n']} evaluation items per task, differences of a few hundredths of NLL are "
              "within noise; a search of "
              f"{1 + budget['rounds'] * budget['per_round']} fine-tunes of {budget['search_steps']} steps fits its "
              "predictor on a handful of noisy points, so whether the performance model beats random sampling, "
              "and the paper's claim (RankAdaptor > uniform LoRA on pruned LLaMA), need the full budget "
              "(`python benchmarks/rankadaptor.py`, hours on CPU). Exact-match accuracy (generation) is not "
              "measured here, only answer NLL."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small budget (minutes, CPU)")
    parser.add_argument("--markdown-only", action="store_true", help="only rebuild rankadaptor.md from the json")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="folder holding gsm8k/")
    args = parser.parse_args()
    if args.markdown_only:  # rewrite results/rankadaptor.md from results/rankadaptor.json
        (RESULTS / "rankadaptor.md").write_text(markdown(json.loads((RESULTS / "rankadaptor.json").read_text())))
        return
    budget = SMALL if args.small else FULL
    torch.manual_seed(0)
    start = time.perf_counter()
    base, tokenizer = load_model("smollm2-135m", "causal-lm")
    data = encoded(tokenizer, budget, args.data_dir)
    command = f"python benchmarks/rankadaptor.py{' --small' if args.small else ''} --data-dir {args.data_dir}"
    results: dict[str, Any] = {"budget": budget, "command": command, "unpruned": nll(base, data), "ratios": []}
    for ratio in budget["ratios"]:
        results["ratios"].append(run_ratio(base, tokenizer, ratio, data, budget))
        results["seconds"] = time.perf_counter() - start
        RESULTS.mkdir(parents=True, exist_ok=True)  # after each ratio: an interrupted run keeps what it measured
        (RESULTS / "rankadaptor.json").write_text(json.dumps(results, indent=1))
        (RESULTS / "rankadaptor.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
