"""`lorakit compare`: several methods on the same model, task, seed and step budget, one after another.

Writes ``report.md`` (method, trainable parameters, metric before/after, steps to reach a target loss,
wall time, peak memory), ``results.json``, and PNG plots: loss curves, the eval metric over steps,
parameters against the final metric, and for adaptive-rank methods the final rank allocation (block x
module type) and its evolution over steps.  Each method's run (checkpoints, logs, adapter) lands in
``<out>/<method>/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, locked_dir, write_text
from ..errors import LorakitError
from .progress import read_log
from .rank_plots import draw_rank_allocation
from .run import RunConfig, run_training

logger = logging.getLogger(__name__)


def steps_to_reach(losses: list[float], target: float, window: int = 10) -> int | None:
    """First step at which the running mean of the last ``window`` losses is at or below ``target``."""
    for i in range(len(losses)):
        recent = losses[max(0, i - window + 1): i + 1]
        if sum(recent) / len(recent) <= target:
            return i + 1
    return None


def _final_loss(losses: list[float], window: int = 10) -> float:
    tail = losses[-window:]
    return sum(tail) / len(tail)


def compare(base: RunConfig, methods: list[str], out: Path, target_loss: float | None = None,
            method_options: dict[str, dict[str, Any]] | None = None) -> Path:
    """Run every method with ``base``'s settings; ``method_options`` adds per-method options.  ``out`` is locked
    for the whole comparison (one per directory), each method's run directory in it by its own run."""
    if len(set(methods)) != len(methods):
        raise LorakitError(f"methods listed twice: {methods}")
    out.mkdir(parents=True, exist_ok=True)
    with locked_dir(out):
        return _compare(base, methods, out, target_loss, method_options)


def _compare(base: RunConfig, methods: list[str], out: Path, target_loss: float | None,
             method_options: dict[str, dict[str, Any]] | None) -> Path:
    rows: list[dict[str, Any]] = []
    for name in methods:
        options = {**base.method_options, **(method_options or {}).get(name, {})}
        run = dataclasses.replace(base, method=name, method_options=options, output_dir=str(out / name))
        logger.info("== %s", name)
        result = run_training(run)
        rows.append({"method": name, **result.summary()})
        write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    if target_loss is None:
        reference = next((r for r in rows if r["method"] == "lora"), rows[0])
        target_loss = _final_loss(reference["train"]["losses"])
    for row in rows:
        row["steps_to_target"] = steps_to_reach(row["train"]["losses"], target_loss)
    write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    plots = draw(rows, out)
    for row in rows:  # adaptive-rank methods log their ranks: heatmap + evolution per method
        log = out / row["method"] / "log.jsonl"
        if log.is_file():
            plots += draw_rank_allocation(read_log(log), out, prefix=f"{row['method']}_", title=row["method"])
    report = out / "report.md"
    write_text(report, markdown(rows, base, target_loss, plots))
    return report


def markdown(rows: list[dict[str, Any]], base: RunConfig, target_loss: float, plots: list[str]) -> str:
    cfg = rows[0]["config"]
    metric = rows[0]["metric"]
    lines = [f"# lorakit compare: {cfg['model']} on {cfg['task']}", "",
             f"{cfg['steps']} steps of {cfg['batch_size']}, seed {cfg['seed']}, metric {metric} on "
             f"{cfg['eval_split']} (limit {cfg['eval_limit']}). Steps to target: first step whose 10-step mean "
             f"training loss <= {target_loss:.4f}.", "",
             f"| method | trainable params | {metric} before | {metric} after | final loss | steps to target | "
             "wall time s | s/step | peak memory MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["train"]
        reached = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['score_before']:.4f} | "
                     f"{r['score_after']:.4f} | {_final_loss(t['losses']):.4f} | {reached} | {r['seconds']:.0f} | "
                     f"{t['seconds'] / max(1, len(t['losses'])):.3f} | {t['peak_memory_mib']:.0f} |")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def draw(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Loss curves, eval metric vs steps, and parameters vs metric, as PNG files in ``out``."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'lorakit[plots]'): report without plots")
        return []
    metric = rows[0]["metric"]
    files = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        losses = r["train"]["losses"]
        smooth = [sum(losses[max(0, i - 9): i + 1]) / len(losses[max(0, i - 9): i + 1]) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=r["method"])
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", title="Loss curves")
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    files.append("loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        points = [(0, r["score_before"])] + [(e["step"], e["score"]) for e in r["train"]["evals"]]
        points.append((len(r["train"]["losses"]), r["score_after"]))
        xs, ys = zip(*sorted(set(points)))
        ax.plot(xs, ys, marker="o", label=r["method"])
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} over training")
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "metric.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    files.append("metric.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.scatter(max(1, r["trainable_params"]), r["score_after"])
        ax.annotate(r["method"], (max(1, r["trainable_params"]), r["score_after"]), fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=metric, title="Parameters vs final metric")
    fig.tight_layout()
    atomic_write(out / "params.png", lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    files.append("params.png")
    plt.close("all")
    return files
