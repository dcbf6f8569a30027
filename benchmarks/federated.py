"""Federated fine-tuning: accuracy against bytes communicated for Fed-SB, FedIT, FFA-LoRA and FedEx-LoRA,
and centralised LoRA-SB, on MiniLM-L6 + SST-2 split over 10 clients (IID and Dirichlet 0.5).

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/federated.py      # about 35 minutes on one CPU core
    OMP_NUM_THREADS=1 python benchmarks/federated.py --only fed-sb/iid,fedit/iid,fed-sb/dirichlet,fedit/dirichlet
    OMP_NUM_THREADS=1 python benchmarks/federated.py --seeds 0,1,2   # Fed-SB and FedIT over 3 seeds (+40 min)

Every federated run goes through Flower's simulation engine (`lorakit.fed.runner.simulate`, one client
actor); the global model is scored on the first ``--eval-limit`` SST-2 dev sentences after every round.
Fed-SB's init follows ``--init-source`` (default ``server``, the official protocol: the server builds it
from the first ``--init-samples`` training examples, nothing is uploaded; B and A go down once and are
counted as download), with LoRA-SB's η rule (``lr / (rounds × local_steps)``).  Every strategy averages
unweighted (the official code's mean).  Centralised LoRA-SB trains on the pooled data with the same
compute: ``rounds × local_steps`` steps of ``clients × batch`` examples, its init from the same
``--init-samples`` examples and η.  Writes ``results/federated.json``, ``federated.md`` and
``federated.png``; a run already in the JSON (same settings) is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lorakit.fed import runner
from lorakit.fed.comm import core_upload_bytes, lora_upload_bytes
from lorakit.fed.config import FedConfig
from lorakit.stats import fmt, verdict
from lorakit.train.run import RunConfig, run_training

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
STRATEGIES = ("fed-sb", "fedit", "ffa-lora", "fedex-lora")
# MiniLM-L6's adapted matrices (query, key, value, attention.output.dense, intermediate.dense,
# output.dense in 6 layers) and its 384 -> 2 head (weight + bias), trained and sent by every strategy.
SHAPES = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
MATRICES = 6 * len(SHAPES)
HEAD_BYTES = (384 * 2 + 2) * 4


def fed_config(args: argparse.Namespace, strategy: str, partition: str, out: Path, seed: int = 0) -> FedConfig:
    lr = args.sb_lr if strategy == "fed-sb" else args.lora_lr
    return FedConfig(strategy=strategy, clients=args.clients, rounds=args.rounds, model="minilm-l6", task="sst2",
                     data_dir=args.data_dir, partition=partition, alpha=0.5, r=args.r, lora_alpha=2.0 * args.r, lr=lr,
                     local_steps=args.local_steps, batch_size=args.batch_size, max_length=64, eval_split="dev",
                     eval_limit=args.eval_limit, init_source=args.init_source, init_samples=args.init_samples,
                     seed=seed, output_dir=str(out))


def run_fed(args: argparse.Namespace, strategy: str, partition: str, seed: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = runner.simulate(fed_config(args, strategy, partition, Path(tmp), seed))
        result["wall_seconds"] = time.perf_counter() - start
    cumulative, points = 0, []
    comm = {int(k): v for k, v in result["comm"].items()}
    for h in result["history"]:
        cumulative += comm.get(h["round"], {}).get("up", 0) + comm.get(h["round"], {}).get("down", 0)
        points.append({"round": h["round"], "accuracy": h["accuracy"], "loss": h["loss"], "total_bytes": cumulative})
    uploads = [row["up"] for h in result["history"] if h["round"] > 0 for row in h["bytes_per_client"].values()]
    return {"strategy": strategy, "partition": partition, "seed": seed, "points": points,
            "final_accuracy": points[-1]["accuracy"],
            "round0_loss": points[0]["loss"], "upload_bytes": sum(v["up"] for v in comm.values()),
            "download_bytes": sum(v["down"] for v in comm.values()),
            "init_upload_bytes": comm.get(0, {}).get("up", 0),
            "upload_per_client_round": sorted(set(uploads)), "seconds": result["wall_seconds"]}


def run_central(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        eta = fed_config(args, "fed-sb", "iid", Path(tmp)).sb_init_lr
        run = RunConfig(model="minilm-l6", task="sst2", method="lora-sb",
                        method_options={"r": args.r, "init_lr": eta}, data_dir=args.data_dir,
                        steps=args.rounds * args.local_steps, batch_size=args.clients * args.batch_size,
                        lr=args.sb_lr, warmup_steps=0, schedule="constant", max_length=64, eval_split="dev",
                        eval_limit=args.eval_limit, init_samples=args.init_samples, seed=0,
                        device="cpu", output_dir=tmp)
        start = time.perf_counter()
        result = run_training(run)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"strategy": "central lora-sb", "partition": "pooled", "final_accuracy": result.score_after,
            "accuracy_before": result.score_before, "seconds": time.perf_counter() - start}


SEEDED = ("fed-sb", "fedit")  # the pair the seed claim compares: Fed-SB against FedIT


def seeded(runs: dict[str, dict[str, Any]], strategy: str, partition: str) -> list[dict[str, Any]]:
    """The runs of one strategy and partition over every seed run so far (seed 0 keeps its old key)."""
    return [r for k, r in runs.items() if k.split("@")[0] == f"{strategy}/{partition}"]


def said(held: bool) -> str:
    return "held" if held else "not held"


def targets(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for partition in ("iid", "dirichlet"):
        sb, it = runs.get(f"fed-sb/{partition}"), runs.get(f"fedit/{partition}")
        if not sb or not it:
            continue
        per_client = sb["upload_per_client_round"]
        expected = core_upload_bytes(args.r, MATRICES) + HEAD_BYTES
        out.append({"target": f"Fed-SB upload per client and round is the same for every client ({partition})",
                    "measured": f"{per_client} bytes; r² × {MATRICES} matrices × 4 B + head = {expected}",
                    "held": said(per_client == [expected])})
        ratio_all = it["upload_bytes"] / sb["upload_bytes"]
        better = sb["final_accuracy"] >= it["final_accuracy"]
        out.append({"target": f"Fed-SB total upload (its init included) >= 50x smaller than FedIT's at equal or "
                              f"better accuracy ({partition})",
                    "measured": f"{ratio_all:.1f}x ({sb['upload_bytes']:,} B vs {it['upload_bytes']:,} B, of which "
                                f"{sb['init_upload_bytes']:,} B for Fed-SB's init); accuracy (seed 0) "
                                f"{100 * sb['final_accuracy']:.1f} vs {100 * it['final_accuracy']:.1f}",
                    "held": said(ratio_all >= 50 and better)})
        accs = {st: [r["final_accuracy"] for r in seeded(runs, st, partition)] for st in SEEDED}
        out.append({"target": f"Fed-SB accuracy >= FedIT's over seeds ({partition})",
                    "measured": f"Fed-SB {fmt(accs['fed-sb'])} vs FedIT {fmt(accs['fedit'])} (mean ± std, n = seeds)",
                    "held": verdict(accs["fed-sb"], accs["fedit"], 0.0)})
    sb, central = runs.get("fed-sb/iid"), runs.get("central")
    if sb and central:
        gap = 100 * (central["final_accuracy"] - sb["final_accuracy"])
        out.append({"target": "Fed-SB within 1 point of centralised LoRA-SB (IID)",
                    "measured": f"Fed-SB {100 * sb['final_accuracy']:.1f} vs central "
                                f"{100 * central['final_accuracy']:.1f} ({gap:+.1f} points)", "held": said(gap <= 1.0)})
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, partition in zip(axes, ("iid", "dirichlet")):
        for strategy in STRATEGIES:
            run = runs.get(f"{strategy}/{partition}")
            if not run:
                continue
            points = [p for p in run["points"] if p["total_bytes"] > 0]  # 0 bytes: off a log axis
            ax.plot([p["total_bytes"] for p in points], [100 * p["accuracy"] for p in points], marker="o",
                            label=strategy)
        if "central" in runs:
            ax.axhline(100 * runs["central"]["final_accuracy"], color="k", ls="--", label="central LoRA-SB")
        ax.set_xscale("log")
        ax.set_xlabel("total bytes communicated (up + down, all clients)")
        ax.set_title(f"SST-2, 10 clients, {'IID' if partition == 'iid' else 'Dirichlet(0.5)'}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev accuracy (%)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    lines = ["# Federated fine-tuning: accuracy vs bytes (MiniLM-L6, SST-2, 10 clients)", "",
             f"Scale (sized for one CPU core): {args.rounds} rounds x {args.local_steps} local steps of "
             f"{args.batch_size} examples per client, all {args.clients} clients every round, rank {args.r} for "
             f"every strategy (LoRA alpha = 2r), lr {args.sb_lr:g} (Fed-SB) / {args.lora_lr:g} (LoRA strategies), "
             "unweighted means (the official Fed-SB code's aggregation for every strategy). "
             f"Fed-SB init: `--init-source {args.init_source}`"
             + (f" (the official protocol: the server builds B, R, A from the first {args.init_samples} SST-2 "
                "training sentences; no upload; B and A are counted as download with each client's first round)"
                if args.init_source == "server" else f" from {args.init_samples} examples") +
             f", LoRA-SB's η = lr / (rounds x local steps) = {args.sb_lr / (args.rounds * args.local_steps):g}. "
             f"Accuracy on the first {args.eval_limit} SST-2 dev sentences. "
             "Centralised LoRA-SB: the same compute on the pooled data "
             f"({args.rounds * args.local_steps} steps of {args.clients * args.batch_size}), the same init sample "
             "and η. Bytes are tensor payloads (elements x 4 B) as `lorakit.fed.comm` counts them; upload includes "
             "any init upload.", "",
             "| strategy | partition | round-0 loss | final accuracy (%) | upload (MB) | download (MB) "
             "| upload per client and round (B) | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in [f"{s}/{p}" for p in ("iid", "dirichlet") for s in STRATEGIES]:
        run = runs.get(key)
        if run:
            lines.append(f"| {run['strategy']} | {run['partition']} | {run['round0_loss']:.3f} | "
                         f"{100 * run['final_accuracy']:.1f} | "
                         f"{run['upload_bytes'] / 1e6:.3f} | {run['download_bytes'] / 1e6:.3f} | "
                         f"{', '.join(map(str, run['upload_per_client_round']))} | {run['seconds']:.0f} |")
    if "central" in runs:
        c = runs["central"]
        lines.append(f"| central LoRA-SB | pooled | - | {100 * c['final_accuracy']:.1f} | - | - | - | "
                     f"{c['seconds']:.0f} |")
    lines += ["", "Fed-SB against FedIT over seeds (seed 0 is the row above; each seed reseeds the whole run: the "
              "client split, the data order and the random parts of the init):", "",
              "| strategy | partition | seeds | final accuracy (%) |",
              "| --- | --- | --- | --- |"]
    for partition in ("iid", "dirichlet"):
        for strategy in SEEDED:
            seed_runs = seeded(runs, strategy, partition)
            if seed_runs:
                lines.append(f"| {strategy} | {partition} | {', '.join(str(r.get('seed', 0)) for r in seed_runs)} | "
                             f"{fmt([r['final_accuracy'] for r in seed_runs])} |")
    missing = [key for key in [f"{s}/{p}" for p in ("iid", "dirichlet") for s in STRATEGIES] + ["central"]
               if key not in runs]
    if missing:
        lines += ["", f"Not run in this pass (`--only`): {', '.join(missing)}."]
    lines += ["", f"Fed-SB's upload per client and round is r² x {MATRICES} matrices x 4 B + the head, whatever the "
              f"number of clients (FedIT / FedEx-LoRA: {lora_upload_bytes(args.r, SHAPES * 6)} B + head; "
              "`tests/test_fed_strategies.py` checks the independence from the client count).", "",
              "| target | measured | held |", "| --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['target']} | {row['measured']} | {row['held']} |")
    lines += ["", "![accuracy vs bytes](federated.png)", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--sb-lr", type=float, default=5e-3)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--init-samples", type=int, default=128, help="the init sample (per client with clients)")
    p.add_argument("--init-source", default="server", choices=("server", "client", "clients"))
    p.add_argument("--eval-limit", type=int, default=400)
    p.add_argument("--data-dir", default=str(DATA), help="folder holding sst2/ (default: ../shared/data)")
    p.add_argument("--only", help="comma-separated run keys (e.g. fed-sb/iid,central)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds for Fed-SB and FedIT (the other runs: seed 0)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "federated.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    # the settings that decide a run's result (`--only` and `--seeds` choose runs, `--out` where they go)
    settings = {k: v for k, v in vars(args).items() if k not in ("only", "seeds", "out")}
    runs: dict[str, dict[str, Any]] = saved.get("runs", {}) if {
        k: v for k, v in saved.get("settings", {}).items() if k not in ("only", "seeds", "out")} == settings else {}
    keys = [f"{s}/{p}" for p in ("iid", "dirichlet") for s in STRATEGIES] + ["central"]
    keys += [f"{s}/{p}@{seed}" for seed in map(int, args.seeds.split(",")) if seed for p in ("iid", "dirichlet")
             for s in SEEDED]
    wanted = args.only.split(",") if args.only else keys
    for key in keys:
        if key in runs or key not in wanted:
            continue
        print(f"running {key}", flush=True)
        name, _, seed = key.partition("@")
        runs[key] = run_central(args) if key == "central" else run_fed(args, *name.split("/"), int(seed or 0))
        print(f"{key}: accuracy {runs[key]['final_accuracy']:.4f} in {runs[key]['seconds']:.0f} s", flush=True)
        rows = targets(runs, args)
        path.write_text(json.dumps({"settings": settings, "runs": runs, "targets": rows}, indent=1) + "\n")
    rows = targets(runs, args)
    plot(runs, out / "federated.png")
    (out / "federated.md").write_text(report(runs, args, rows))
    print((out / "federated.md").read_text())


if __name__ == "__main__":
    main()
