"""RankAdaptor on SmolLM2-135M pruned at the paper's settings (run by hand; reads GSM8K from --data-dir).

    nice -n 10 python benchmarks/rankadaptor.py --small    # the committed run (~1 h on 2 shared CPU cores)
    python benchmarks/rankadaptor.py                       # the full budget below (many hours on 2 CPU cores)

The paper's "20%" and "50%" are LLM-Pruner's per-block ratios 0.25 and 0.635 (the official
``dataset/model_settings.json``: ``pruning_rate_list`` 0.25 and 0.635 for "llama7b-0.20" and "-0.50").  For each
ratio: `lorakit.prune.prune_llama` (Taylor scores on LLM-Pruner's calibration, `general_calibration`: 10 windows of
64 tokens of shipped prose; blocks 4..27 of 30 pruned), saved with `save_pruned` under ``--cache`` and loaded back
through `lorakit.models.load_model` (as ``lorakit train --model DIR`` does); then the RankAdaptor search
(`search_ranks` with the official reward and the budget's ``predictor``; the committed ``--small`` run used the
LSTM over ranks, pruning rates and SVD features, before the comparison below made the MLP the default:
uniform rank 8 first, then ``per_round`` random configurations, then ``rounds − 1`` rounds of ``per_round``
proposed by the performance model, each a
``search_steps`` LoRA fine-tune (seed 0 for all, so configurations differ only by their ranks) scored by minus the
mean answer NLL on held-out arith (dev) and GSM8K (train tail) items); then the recovery fine-tune (``steps`` steps
on an arith + GSM8K mix) with the chosen per-block ranks and with uniform LoRA rank 8 (the same parameter budget:
the search never exceeds it), over ``seeds``.  Reported: answer NLL (lower is better) on the arith test split and
the first GSM8K test items, for the unpruned model, the pruned model and both recoveries (mean ± std over seeds,
and the seed-paired difference), plus the search's own cost.  The two predictors (``lstm``, ``mlp``) are compared
on each search's history by leave-one-out: fit on all other measured configurations, predict the left-out one, and
report the Spearman correlation of predictions with measurements.

Resumable: results/rankadaptor.json is rewritten after every measurement, and a rerun with the same budget skips
what it holds (the pruned models stay in ``--cache``); ``--fresh`` starts over.
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
from scipy.stats import spearmanr

import lorakit
from lorakit.methods.rankadaptor import (
    PREDICTORS,
    RankAdaptorConfig,
    block_costs,
    fit_predictor,
    layer_features,
    pruning_rates,
    search_ranks,
)
from lorakit.models import load_model
from lorakit.prune import general_calibration, load_pruned, prune_llama, save_pruned
from lorakit.stats import fmt
from lorakit.train.data import encode_causal_lm, load_task
from lorakit.train.evaluate import answer_nll
from lorakit.train.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
FULL = {"ratios": [0.25, 0.635], "predictor": "mlp", "seeds": [0, 1, 2], "steps": 300, "search_steps": 40,
        "rounds": 4, "per_round": 6, "train_n": 2000, "eval_n": 100, "batch_size": 8}
SMALL = {"ratios": [0.25, 0.635], "predictor": "lstm", "seeds": [0, 1, 2], "steps": 16, "search_steps": 6,
         "rounds": 3, "per_round": 2, "train_n": 64, "eval_n": 12, "batch_size": 4}
R_UNIFORM, LR, MAX_LENGTH = 8, 1e-3, 96


def encoded(tokenizer: Any, budget: dict[str, Any], data_dir: Path) -> dict[str, list[dict[str, list[int]]]]:
    n, k = budget["train_n"], budget["eval_n"]
    enc = lambda examples: encode_causal_lm(examples, tokenizer, MAX_LENGTH, chat_template=False)  # noqa: E731
    arith_train = enc(load_task("arith", "train", limit=n)[1])
    gsm_train = enc(load_task("gsm8k", "train", data_dir, limit=n + 3 * k)[1])  # room for dropped long prompts
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


class Bench:
    """The results dict, rewritten to results/rankadaptor.{json,md} after every measurement."""

    def __init__(self, budget: dict[str, Any], command: str, data_dir: Path, cache: Path, fresh: bool) -> None:
        file = RESULTS / "rankadaptor.json"
        old = json.loads(file.read_text()) if file.is_file() and not fresh else {}
        self.results: dict[str, Any] = old if old.get("budget") == budget else {"budget": budget, "ratios": []}
        self.results.update(command=command)
        self.results.setdefault("seconds", 0.0)
        self.budget, self.data_dir, self.cache = budget, data_dir, cache
        self.start = time.perf_counter()
        self.elapsed = self.results["seconds"]  # wall seconds of earlier, interrupted runs
        self.base: tuple[torch.nn.Module, Any] | None = None

    def save(self) -> None:
        self.results["seconds"] = self.elapsed + time.perf_counter() - self.start
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "rankadaptor.json").write_text(json.dumps(self.results, indent=1))
        (RESULTS / "rankadaptor.md").write_text(markdown(self.results))

    def base_model(self) -> tuple[torch.nn.Module, Any]:
        if self.base is None:
            self.base = load_model("smollm2-135m", "causal-lm")
        return self.base

    def run(self) -> None:
        if "unpruned" not in self.results:
            base, tokenizer = self.base_model()
            self.results["unpruned"] = nll(base, encoded(tokenizer, self.budget, self.data_dir))
            self.save()
        for ratio in self.budget["ratios"]:
            entry = next((r for r in self.results["ratios"] if r["ratio"] == ratio), None)
            if entry is None:
                entry = {"ratio": ratio}
                self.results["ratios"].append(entry)
            self.run_ratio(entry)

    def pruned(self, entry: dict[str, Any]) -> Path:
        """The pruned model's directory (pruned and saved if the cache does not hold it)."""
        directory = self.cache / f"smollm2-135m-pruned-{entry['ratio']}"
        report_file = directory / "prune_report.json"
        if not report_file.is_file():
            base, tokenizer = self.base_model()
            model = copy.deepcopy(base)
            start = time.perf_counter()
            report = prune_llama(model, general_calibration(tokenizer), entry["ratio"])
            save_pruned(model, directory, tokenizer)
            report_file.write_text(json.dumps({
                "params_before": report.params_before, "params_after": report.params_after,
                "removed_share": report.removed_share, "layers": list(report.layers), "calibration": "text 10x64",
                "prune_seconds": time.perf_counter() - start}))
        entry.update(json.loads(report_file.read_text()))
        return directory

    def run_ratio(self, entry: dict[str, Any]) -> None:
        budget = self.budget
        model, tokenizer = load_model(str(self.pruned(entry)), "causal-lm")  # the `lorakit train --model` path
        data = encoded(tokenizer, budget, self.data_dir)
        entry["items"] = {key: len(features) for key, features in data.items()}  # prompts over MAX_LENGTH dropped
        if "pruned" not in entry:
            entry["pruned"] = nll(model, data)
            self.save()
        if "search" not in entry:
            entry["search"] = self.search(model, data)
            self.save()
        best = tuple(entry["search"]["best"])
        uniform = (R_UNIFORM,) * len(best)
        for name, ranks in (("uniform", uniform), ("rankadaptor", best)):
            runs = entry.setdefault(name, [])
            for seed in budget["seeds"]:
                if any(run["seed"] == seed for run in runs):
                    continue
                if name == "rankadaptor" and ranks == uniform:  # the search kept uniform: the same fine-tune
                    runs.append({**next(run for run in entry["uniform"] if run["seed"] == seed), "same_as_uniform":
                                 True})
                    continue
                recovered = copy.deepcopy(model)
                start = time.perf_counter()
                recover(recovered, ranks, data, budget["steps"], seed, budget["batch_size"])
                runs.append({"seed": seed, **nll(recovered, data), "seconds": time.perf_counter() - start})
                self.save()
        self.save()

    def search(self, model: torch.nn.Module, data: dict[str, Any]) -> dict[str, Any]:
        budget = self.budget
        shapes = [(n, m.out_features, m.in_features) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
        costs = block_costs(shapes)
        widths = [(layer.self_attn.q_proj.out_features, layer.mlp.up_proj.out_features)
                  for layer in model.model.layers]
        fixed = [b for b, w in enumerate(widths) if w == widths[0]]  # the unpruned blocks keep r_uniform
        features = layer_features(model.model.layers)
        rates = pruning_rates(model.model.layers, model.config.intermediate_size)

        def score(ranks: tuple[int, ...]) -> float:
            recover(model, ranks, data, budget["search_steps"], 0, budget["batch_size"])
            value = -statistics.mean(nll(model, data, ("search_arith", "search_gsm8k")).values())
            lorakit.detach(model)
            return value

        start = time.perf_counter()
        result = search_ranks(score, costs, R_UNIFORM, fixed_blocks=fixed, rounds=budget["rounds"],
                              per_round=budget["per_round"], seed=0, features=features, rates=rates,
                              predictor=budget["predictor"])
        seconds = time.perf_counter() - start
        loo = loo_spearman([c for c, _ in result.history], [v for _, v in result.history], features, rates)
        return {"seconds": seconds, "loo_spearman": loo, "fine_tunes": len(result.history),
                "steps": len(result.history) * budget["search_steps"], "best": list(result.best),
                "best_score": result.best_score, "uniform_score": result.history[0][1],
                "history": [[list(c), s] for c, s in result.history], "predictor_mse": result.predictor_fit,
                "budget": R_UNIFORM * sum(costs), "best_params": sum(c * k for c, k in zip(costs, result.best))}


def loo_spearman(configs: list[tuple[int, ...]], scores: list[float], features: list[list[float]],
                 rates: list[float], seeds: range = range(5)) -> dict[str, list[float]]:
    """Per predictor and predictor seed, the Spearman correlation of leave-one-out predictions (fit on all other
    measured configurations of the search) with the measured scores."""
    out = {}
    for predictor in PREDICTORS:
        out[predictor] = [float(spearmanr([
            fit_predictor(configs[:i] + configs[i + 1:], scores[:i] + scores[i + 1:], features, rates, predictor,
                          seed)[0]([configs[i]])[0] for i in range(len(configs))], scores).statistic) for seed in seeds]
    return out


def redo_loo(cache: Path) -> None:
    """Recompute every search's `loo_spearman` from results/rankadaptor.json and the cached pruned models."""
    file = RESULTS / "rankadaptor.json"
    results = json.loads(file.read_text())
    for entry in results["ratios"]:
        if "search" not in entry:
            continue
        model = load_pruned(cache / f"smollm2-135m-pruned-{entry['ratio']}")
        features = layer_features(model.model.layers)
        rates = pruning_rates(model.model.layers, model.config.intermediate_size)
        history = entry["search"]["history"]
        entry["search"]["loo_spearman"] = loo_spearman([tuple(c) for c, _ in history], [v for _, v in history],
                                                       features, rates)
    file.write_text(json.dumps(results, indent=1))
    (RESULTS / "rankadaptor.md").write_text(markdown(results))


def mean_std(values: list[float]) -> str:
    """NLL as ``mean ± std`` over seeds (`spread.fmt`, in nats, 3 decimals)."""
    return fmt(values, scale=1, digits=3, count=False)


def label(entry: dict[str, Any]) -> str:
    """Both figures every result is labelled with: LLM-Pruner's per-block ratio and the parameter share removed."""
    return f"per-block {entry['ratio']} ({100 * entry['removed_share']:.1f}% of parameters removed)"


def markdown(results: dict[str, Any]) -> str:
    budget = results["budget"]
    lines = ["# RankAdaptor on SmolLM2-135M (pruned), answer NLL (lower is better)", "",
             f"Budget: `{json.dumps(budget)}`; uniform LoRA rank {R_UNIFORM}, lr {LR}, alpha = r (scale 1).",
             f"Command: `{results['command']}` ({results['seconds']:.0f} s wall, at nice 10 on 2 CPU cores shared "
             "with other jobs; one intra-op thread).", ""]
    if "note" in results:
        lines += [results["note"], ""]
    lines += [f"Pruning: LLM-Pruner's block-wise Taylor pruning of blocks 4..27 of 30, calibrated as LLM-Pruner does "
              "(10 windows of 64 tokens of general text, here lorakit's shipped prose, loss on every token).  Search "
              f"predictor: {budget['predictor']}; proposals ranked by the official reward.", ""]
    if "unpruned" in results:
        lines += [f"Unpruned: arith {results['unpruned']['arith']:.3f}, GSM8K {results['unpruned']['gsm8k']:.3f}.",
                  ""]
    lines += ["| LLM-Pruner per-block ratio | params removed (of all, embeddings incl.) | method | seeds | arith NLL "
              "| GSM8K NLL |", "|---|---|---|---|---|---|"]
    for r in results["ratios"]:
        if "pruned" not in r:
            continue
        share = f"{100 * r['removed_share']:.1f}%"
        lines.append(f"| {r['ratio']} | {share} | none (pruned) | - | {r['pruned']['arith']:.3f} | "
                     f"{r['pruned']['gsm8k']:.3f} |")
        for name in ("uniform", "rankadaptor"):
            runs = r.get(name, [])
            if runs:
                lines.append(f"| {r['ratio']} | {share} | {name} | {len(runs)} | "
                             f"{mean_std([x['arith'] for x in runs])} | {mean_std([x['gsm8k'] for x in runs])} |")
    lines += ["", "LLM-Pruner's count (`lorakit.prune.removed_groups`) on SmolLM2-135M's 3 KV groups of 64 channels "
              "removes no KV group at 0.25 (192 - int(0.75 * 192) = 48 channels, less than one group) and one of "
              "three at 0.635, so at 0.25 only MLP channels go; LLaMA-7B (32 standard heads) loses 8 and 20 heads."]
    items = next((r["items"] for r in results["ratios"] if "items" in r), None)
    if items:
        lines += ["", "Items: " + ", ".join(f"{k} {v}" for k, v in items.items()) + f" (examples whose prompt "
                  f"alone reaches {MAX_LENGTH} tokens are dropped)."]
    lines += ["", "RankAdaptor − uniform, paired by seed (negative: RankAdaptor better):", ""]
    for r in results["ratios"]:
        pairs = [(u, a) for u in r.get("uniform", []) for a in r.get("rankadaptor", []) if u["seed"] == a["seed"]]
        if pairs:
            diff = {k: mean_std([a[k] - u[k] for u, a in pairs]) for k in ("arith", "gsm8k")}
            same = " (the search kept uniform: the same fine-tune)" if pairs[0][1].get("same_as_uniform") else ""
            lines.append(f"- {label(r)}: arith {diff['arith']}, GSM8K {diff['gsm8k']} over {len(pairs)} "
                         f"seeds{same}.")
    lines += ["", "Search cost and choice (score: −mean NLL on held-out arith dev and GSM8K items):", ""]
    for r in results["ratios"]:
        if "search" not in r:
            continue
        s, k = r["search"], budget["per_round"]
        scores = [x[1] for x in s["history"]]
        pruned = r["layers"][len(r["layers"]) // 2]
        lines.append(f"- {label(r)}: pruned blocks keep {pruned['heads']} query heads in {pruned['kv_heads']} KV "
                     f"groups and MLP width {pruned['intermediate']}; pruning {r['prune_seconds']:.0f} s; "
                     f"search {s['fine_tunes']} short "
                     f"fine-tunes ({s['steps']} steps), {s['seconds']:.0f} s; score uniform {s['uniform_score']:.4f}, "
                     f"best random {max(scores[1:1 + k]):.4f}, best model-proposed {max(scores[1 + k:]):.4f} -> "
                     f"chosen {s['best_score']:.4f}; ranks {s['best']}; {s['best_params']:,} of {s['budget']:,} "
                     "trainable parameters.")
        if "loo_spearman" in s:
            loo = s["loo_spearman"]
            lines.append("  Leave-one-out Spearman of predicted vs measured score over the search's "
                         f"{s['fine_tunes']} configurations (mean ± std over {len(next(iter(loo.values())))} "
                         "predictor seeds): " + ", ".join(f"{name} {mean_std(v)}" for name, v in loo.items()) + ".")
    loo = [r["search"]["loo_spearman"] for r in results["ratios"] if "loo_spearman" in r.get("search", {})]
    if loo and all(isinstance(x, list) for entry in loo for x in entry.values()):
        means = {name: statistics.mean(statistics.mean(entry[name]) for entry in loo) for name in loo[0]}
        lines += ["", "Predictors, mean leave-one-out Spearman over the searches above: " + ", ".join(
            f"{name} {value:.2f}" for name, value in means.items()) + f"; `search_ranks` defaults to the better, "
            f"{max(means, key=means.get)}" + (f".  With {budget['rounds'] * budget['per_round'] + 1} noisy points per "
                                              "search neither predicts reliably (a mean under 0.5)."
                                              if max(means.values()) < 0.5 else ".")]
    lines += ["", f"What this budget cannot show: {len(budget['seeds'])} seeds, {budget['steps']} recovery steps of "
              f"{budget['batch_size']} examples and {budget['eval_n']} evaluation items per task are far from a "
              "converged recovery; a difference inside the seed spread is no win.  The search scores each "
              f"configuration after {budget['search_steps']} steps, where rank barely matters yet, and fits its "
              f"predictor on {1 + budget['rounds'] * budget['per_round']} noisy points, so whether the performance "
              "model beats random sampling, and the paper's claim (RankAdaptor > uniform LoRA on pruned LLaMA), "
              "need the full budget (`python benchmarks/rankadaptor.py`, many hours on CPU).  Exact-match accuracy "
              "(generation) is not measured here, only answer NLL."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small budget (~1 h, CPU)")
    parser.add_argument("--markdown-only", action="store_true", help="only rebuild rankadaptor.md from the json")
    parser.add_argument("--data-dir", type=Path, default=DATA, help="folder holding gsm8k/")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/lorakit-rankadaptor-llmpruner"),
                        help="pruned models")
    parser.add_argument("--fresh", action="store_true", help="ignore results/rankadaptor.json and start over")
    parser.add_argument("--loo-only", action="store_true", help="only recompute the predictors' leave-one-out "
                        "comparison from the json and the cached pruned models")
    args = parser.parse_args()
    if args.loo_only:
        torch.set_num_threads(1)
        redo_loo(args.cache)
        return
    if args.markdown_only:  # rewrite results/rankadaptor.md from results/rankadaptor.json
        (RESULTS / "rankadaptor.md").write_text(markdown(json.loads((RESULTS / "rankadaptor.json").read_text())))
        return
    torch.set_num_threads(1)  # several threads on shared cores spend their time waking each other
    torch.manual_seed(0)
    command = f"python benchmarks/rankadaptor.py{' --small' if args.small else ''} --data-dir {args.data_dir}"
    bench = Bench(SMALL if args.small else FULL, command, args.data_dir, args.cache, args.fresh)
    bench.run()
    print(markdown(bench.results))


if __name__ == "__main__":
    main()
