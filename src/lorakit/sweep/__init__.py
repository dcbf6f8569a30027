"""`lorakit sweep` and `lorakit auto`: a fair, seeded comparison of methods (each at its best learning rate, over
several seeds, optionally at an equal parameter budget) on Ray Tune, and the winner retrained and exported.

    from lorakit.sweep import SweepConfig, sweep
    rows = sweep(SweepConfig(RunConfig(model="smollm2-135m", task="arith", steps=60), ["lora", "lora-sb"]))

``plan`` says what runs (and checks every input first), ``engine`` runs trials on Ray Tune (ASHA), ``report``
writes the leaderboard and plots, ``forgetting`` scores general text before and after (causal LMs).  Why a sweep:
``benchmarks/results/claims.md`` finds most papers' claims not held once every method gets its best rate and 3
seeds, as "Learning Rate Matters" (arXiv 2602.04998) finds for tuned LoRA variants.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
from pathlib import Path
from typing import Any

from ..core.files import locked_dir, read_json_object
from ..errors import ConfigError, LorakitError
from ..train.run import FULL, RunConfig, check_output_dir, run_training
from . import engine, plan, report
from .plan import SweepConfig

logger = logging.getLogger(__name__)

__all__ = ["SweepConfig", "auto", "sweep", "train_command"]


def _absolute(base: RunConfig) -> RunConfig:
    """Paths made absolute (Ray Tune runs each trial in its own working directory)."""
    changes: dict[str, Any] = {}
    for name in ("model", "data_dir", "task"):
        value = getattr(base, name)
        if value is not None and Path(value).exists():
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(base, **changes)


def prepare(cfg: SweepConfig) -> tuple[SweepConfig, dict[str, int]]:
    """``cfg`` with absolute paths and ASHA's evaluation interval, and the budget's ranks; every bad input raises
    here, before any trial."""
    base = _absolute(cfg.base)
    if cfg.scheduler == "asha" and base.eval_every == 0:  # ASHA needs intermediate scores: ten per trial
        base = dataclasses.replace(base, eval_every=max(1, base.resolved().steps // 10))
    gpus = cfg.gpus_per_trial
    if gpus is None:  # a GPU each when there is one and the run may use it (Ray hides GPUs from a trial without)
        import torch
        gpus = 1.0 if base.device != "cpu" and torch.cuda.is_available() else 0.0
    cfg = dataclasses.replace(cfg, base=base, output_dir=str(Path(cfg.output_dir).resolve()), gpus_per_trial=gpus)
    ranks = plan.check(cfg)
    check_output_dir(cfg.output_dir)
    return cfg, ranks


def sweep(cfg: SweepConfig, command: str = "") -> list[dict[str, Any]]:
    """Run (or, with ``cfg.resume``, finish) the sweep; returns the leaderboard rows and writes
    ``leaderboard.json``/``.md``, ``trials.json`` and the plots into ``cfg.output_dir``."""
    cfg, ranks = prepare(cfg)
    with locked_dir(cfg.output_dir):  # one sweep per output directory; each trial locks its own run directory
        return _sweep(cfg, ranks, command)


def _sweep(cfg: SweepConfig, ranks: dict[str, int], command: str) -> list[dict[str, Any]]:
    out = Path(cfg.output_dir)
    state = out / "sweep.json"
    if state.exists() and not cfg.resume and any((out / "trials").glob("*/*/" + engine.RECORD)):
        raise ConfigError(f"{out} holds a sweep already; pass --resume to finish it, or another --output-dir")
    report.write_json(state, {"command": command, "config": _describe(cfg), "ranks": ranks})
    metric = cfg.base.metric or _task_metric(cfg.base)
    mode = "max" if report.higher_is_better(metric) else "min"
    first = plan.stage1(cfg, ranks)
    seed0 = plan.seeds(cfg)[0] if cfg.scheduler == "asha" else None
    with contextlib.ExitStack() as ray:  # Ray starts only if some trial is left to run
        todo = [t for t in first if not engine.finished(t.dir)]
        if todo:
            ray.enter_context(engine.ray_session(cfg))
        engine.run_stage(cfg, cfg.base, todo, "stage1", mode, done_before=[t for t in first if t not in todo])
        best = {m: lr for m in cfg.methods
                if (lr := report.best_rate(_records([t for t in first if t.method == m]), metric, seed0)) is not None}
        second = plan.stage2(cfg, best, ranks)
        rest = [t for t in second if not engine.finished(t.dir)]
        if rest and not todo:
            ray.enter_context(engine.ray_session(cfg))
        engine.run_stage(cfg, cfg.base, rest, "stage2", mode)
    records = _records(first + second)
    rows = report.leaderboard(records, cfg.methods, metric, cfg.reference, seed0)
    report.write_json(out / "trials.json", records)
    report.write_json(out / "leaderboard.json", rows)
    plots = report.draw(rows, records, lambda row: _losses(cfg, row, ranks), out)
    report.write_text(out / "leaderboard.md", report.markdown(rows, records, command, plots))
    return rows


def _task_metric(base: RunConfig) -> str:
    from ..train.data import load_task
    resolved = base.resolved()
    spec, _ = load_task(resolved.task, "train", resolved.data_dir, seed=resolved.seed, limit=1)
    return spec.metric


def _records(trials: list[plan.Trial]) -> list[dict[str, Any]]:
    records = []
    for t in trials:
        record = engine.read_record(t.dir)
        if record is None:  # never started (e.g. Ray could not place it)
            record = {"id": t.id, "method": t.method, "lr": t.lr, "seed": t.seed, "options": t.options,
                      "status": "failed", "reason": "the trial did not run", "evals": [], "steps": 0}
        records.append(record)
    return records


def _losses(cfg: SweepConfig, row: dict[str, Any], ranks: dict[str, int]) -> list[float]:
    t = plan.trial(cfg, row["method"], row["lr"], row["seeds"][0], ranks)
    try:
        losses = read_json_object(Path(t.dir) / "run.json", engine.MAX_RECORD_BYTES)["train"]["losses"]
    except (LorakitError, KeyError, TypeError):
        return []
    return losses if isinstance(losses, list) and all(isinstance(x, (int, float)) for x in losses) else []


def _describe(cfg: SweepConfig) -> dict[str, Any]:
    return {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "base"},
            "base": dataclasses.asdict(cfg.base)}


def winner(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best mean (ties: fewer trainable parameters)."""
    scored = [r for r in rows if r["n"]]
    if not scored:
        raise LorakitError("no trial of the sweep finished; see leaderboard.md for the reasons")
    sign = 1 if report.higher_is_better(scored[0]["metric"]) else -1
    return max(scored, key=lambda r: (sign * r["mean"], -(r["trainable"] or 0)))


def auto(cfg: SweepConfig, final_steps: int | None = None, command: str = "") -> dict[str, Any]:
    """`sweep`, then the winner retrained at its best rate for ``final_steps`` (default: the sweep's steps) into
    ``<output_dir>/final``, its PEFT adapter exported to ``<output_dir>/peft``; returns what it did, with the
    `lorakit train` command that reproduces the final run."""
    cfg, ranks = prepare(cfg)
    with locked_dir(cfg.output_dir):  # held across the sweep (which takes it again) and the final run
        return _auto(cfg, ranks, final_steps, command)


def _auto(cfg: SweepConfig, ranks: dict[str, int], final_steps: int | None, command: str) -> dict[str, Any]:
    best = winner(_sweep(cfg, ranks, command))
    options = plan.trial(cfg, best["method"], best["lr"], cfg.base.seed, ranks).options
    final = dataclasses.replace(cfg.base, method=best["method"], lr=best["lr"], method_options=options,
                                steps=final_steps or cfg.base.steps, eval_every=0,
                                output_dir=str(Path(cfg.output_dir) / "final"), resume=cfg.resume)
    result = run_training(final)
    peft_dir, note = None, None
    if final.method != FULL and result.adapter_dir:
        peft_dir, note = _export(final, result.adapter_dir, Path(cfg.output_dir) / "peft")
    outcome = {"winner": best["method"], "lr": best["lr"], "rank": best["rank"], "sweep_mean": best["mean"],
               "metric": result.metric, "score": result.score_after, "adapter": result.adapter_dir, "peft": peft_dir,
               "peft_note": note, "command": train_command(final)}
    report.write_json(Path(cfg.output_dir) / "auto.json", outcome)
    return outcome


def _export(run: RunConfig, adapter: str, out: Path) -> tuple[str | None, str | None]:
    from .. import load
    from ..io.peft_export import export_peft
    from ..models import load_model
    from ..train.data import load_task
    spec, _ = load_task(run.task, "train", run.data_dir, seed=run.seed)
    model, _ = load_model(run.model, spec.type, num_labels=spec.num_labels, dtype=run.dtype, device=run.device,
                          quantize=run.quantize)
    load(model, adapter)
    try:
        return str(export_peft(model, out, modules_to_save=spec.type == "classification")), None
    except LorakitError as err:  # a method without an exact PEFT LoRA form: the lorakit adapter is the result
        return None, str(err)


# `lorakit train`'s switches whose names are not the field's (every other field is ``--field-name VALUE``)
_SWITCHES = {"group_by_length": (None, "--no-length-grouping"),
             "chat_template": ("--chat-template", "--no-chat-template")}


def train_command(run: RunConfig) -> str:
    """The `lorakit train` command line that runs ``run``: a flag for every value that differs from the default
    (model, task and method always).  Flags follow the CLI's naming (``--field-name``); the round trip through the
    parser is tested, so a flag renamed there fails that test rather than printing a wrong command."""
    default = RunConfig()
    words = ["lorakit", "train"]
    for field in dataclasses.fields(RunConfig):
        name, value = field.name, getattr(run, field.name)
        if name in ("resume", "method_options") or (value == getattr(default, name)
                                                    and name not in ("model", "task", "method")):
            continue
        if isinstance(value, bool):
            on, off = _SWITCHES.get(name, ("--" + name.replace("_", "-"), None))
            flag = on if value else off
            if flag is None:
                raise ConfigError(f"{name}={value} has no `lorakit train` flag")
            words.append(flag)
        elif value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    for key, value in run.method_options.items():
        words += ["-o", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return shlex.join(words)
