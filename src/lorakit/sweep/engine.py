"""The trials on Ray Tune: one `run_training` per trial with declared resources, intermediate evaluations reported
to Tune, and ASHA (Li et al., "A System for Massively Parallel Hyperparameter Tuning", arXiv 1810.05934; Ray Tune's
`AsyncHyperBandScheduler`, one bracket per method) stopping the losers.

Each trial leaves ``trial.json`` in its run directory (`read_record`): ``running`` while it reports, then
``done`` (scores, cost, forgetting), ``failed`` (with the reason) or ``stopped`` (by ASHA, written by the driver).
A record holds ``id``, ``method``, ``lr``, ``seed``, ``options``, ``status``, ``evals`` (``{"step", "score"}``) and
``steps``; ``done`` adds ``metric``, ``score``, ``score_before``, ``trainable``, ``wall_s``, ``peak_mem``,
``tokens_per_s`` and the two forgetting NLLs; ``failed`` adds ``reason``.

The records are the sweep's state: a resumed sweep never runs a trial whose record is finished, and an interrupted
trial continues from `run_training`'s own checkpoint (trials run with ``resume=True``).  Ray Tune's experiment
restore is not used because it unpickles the experiment's state; lorakit reads JSON only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..core.files import read_json_object
from ..errors import LorakitError
from ..train.run import RunConfig, run_training
from .forgetting import forgetting
from .plan import SweepConfig, Trial
from .report import write_json

logger = logging.getLogger(__name__)

RECORD = "trial.json"
FINISHED = ("done", "failed", "stopped")


MAX_RECORD_BYTES = 16 << 20
_NUMBER = (int, float)
# the fields each status must hold, with their types (the ones every record holds, then the status's own)
_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "*": {"id": (str,), "method": (str,), "lr": _NUMBER, "seed": (int,), "options": (dict,), "evals": (list,)},
    "running": {},
    "done": {"metric": (str,), "score": _NUMBER, "score_before": _NUMBER, "steps": (int,), "trainable": (int,),
             "wall_s": _NUMBER, "peak_mem": (*_NUMBER, type(None)), "tokens_per_s": (*_NUMBER, type(None))},
    "failed": {"reason": (str,), "steps": (int,)},
    "stopped": {"steps": (int,)},
}


def record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with a ``trial.json`` object (None: nothing): the fields of its status, of their types, and
    ``evals`` as ``{"step": int, "score": number}`` records."""
    status = record.get("status")
    if status not in _FIELDS or status == "*":
        return f"status {str(status)[:40]!r} is none of {', '.join(k for k in _FIELDS if k != '*')}"
    for key, types in {**_FIELDS["*"], **_FIELDS[status]}.items():
        value = record.get(key)
        if key not in record or isinstance(value, bool) or not isinstance(value, types):
            return f"{key} must be {' or '.join(t.__name__ for t in types)}, got {str(value)[:40]}"
    for e in record["evals"]:
        if not (isinstance(e, dict) and type(e.get("step")) is int and isinstance(e.get("score"), _NUMBER)
                and not isinstance(e.get("score"), bool)):
            return f"evals must hold {{'step': int, 'score': number}} records, got {str(e)[:60]}"
    return None


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """A trial's ``trial.json``, or None when it has none, or one that is not a regular file holding a JSON object
    (`read_json_object`) with the fields of its status (`record_problem`), logged: the trial runs again."""
    path = Path(directory) / RECORD
    if not path.exists() and not path.is_symlink():
        return None
    try:
        record = read_json_object(path, MAX_RECORD_BYTES)
    except LorakitError as err:
        logger.warning("%s is unreadable (%s); the trial runs again", path, str(err)[:200])
        return None
    problem = record_problem(record)
    if problem is not None:
        logger.warning("%s: %s; the trial runs again", path, problem)
        return None
    return record


def write_record(directory: str | Path, record: dict[str, Any]) -> None:
    write_json(Path(directory) / RECORD, record)


def finished(directory: str | Path) -> bool:
    record = read_record(directory)
    return record is not None and record.get("status") in FINISHED


# -- inside a trial (a Ray worker) -------------------------------------------------------------------------
def run_trial(config: dict[str, Any]) -> None:
    """Ray Tune's trainable: one trial (``config["trial"]``), reporting ``{"step", "score"}`` at each
    intermediate evaluation; a failure (divergence, out of memory, bad option) is recorded, not raised."""
    from ray import tune
    spec = config["trial"]
    import torch
    torch.set_num_threads(spec["threads"])
    out = Path(spec["run"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    head = {k: spec[k] for k in ("id", "method", "lr", "seed", "options")}
    evals: list[dict[str, float]] = []
    steps = spec["steps"]

    def on_eval(record: dict[str, float]) -> None:
        evals.append({"step": record["step"], "score": record["score"]})
        write_record(out, {**head, "status": "running", "evals": evals})
        if record["step"] < steps:  # the final score comes after training, with run.json
            tune.report({"step": record["step"], "score": record["score"]})

    run = RunConfig(**spec["run"])
    start = time.perf_counter()
    try:
        result = run_training(run, on_eval=on_eval)
    except Exception as err:
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"
        write_record(out, {**head, "status": "failed", "reason": reason, "evals": evals,
                           "steps": len(evals) and evals[-1]["step"], "wall_s": time.perf_counter() - start})
        tune.report({"step": steps, "failed": 1})
        return
    record = {**head, "status": "done", "metric": result.metric, "score": result.score_after,
              "score_before": result.score_before,
              "evals": [{"step": e["step"], "score": e["score"]} for e in result.train.evals],
              "steps": result.train.steps,
              "trainable": result.trainable_params, "wall_s": result.seconds,
              "peak_mem": result.train.peak_memory_mib, "tokens_per_s": result.train.tokens_per_second,
              **forgetting(run.resolved(), result)}
    write_record(out, record)
    tune.report({"step": steps, "score": result.score_after, "done": 1})


# -- the driver --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(cfg: SweepConfig) -> Iterator[None]:
    """Ray for the sweep: an embedded instance on loopback (`lorakit.ray_loopback`), or ``cfg.address``."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray
    kwargs: dict[str, Any] = {"include_dashboard": False, "configure_logging": False, "log_to_driver": False}
    from ..ray_loopback import ray_on_loopback
    if cfg.address is None:
        with ray_on_loopback():
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    else:
        # a cluster on loopback (`ray start --head --node-ip-address 127.0.0.1`) listens there only: this driver
        # must take 127.0.0.1 as its node address too, or Ray swaps the loopback address for the machine's
        joining = ray_on_loopback() if is_loopback(cfg.address) else contextlib.nullcontext()
        try:
            with joining:
                ray.init(address=cfg.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise LorakitError(f"--address {cfg.address}: could not join the Ray cluster ({err})") from None
    try:
        yield
    finally:
        ray.shutdown()


def is_loopback(address: str) -> bool:
    """Whether a Ray address (``auto``: the cluster `ray start` left on this machine) is on 127.0.0.0/8 or ::1."""
    import ipaddress
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        address = canonicalize_bootstrap_address("auto") or ""
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def method_asha(mode: str, max_t: int, grace: int, reduction_factor: int) -> Any:
    """Ray Tune's ASHA with one bracket per method: each method's rates compete only with each other (`method_queue`
    runs them one at a time, so a rung's cutoff is always set by the rates before it)."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    class MethodASHA(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.by_method: dict[str, AsyncHyperBandScheduler] = {}

        def asha(self, trial: Any) -> AsyncHyperBandScheduler:
            method = trial.config["trial"]["method"]
            if method not in self.by_method:
                self.by_method[method] = AsyncHyperBandScheduler(
                    time_attr="step", metric="score", mode=mode, max_t=max_t, grace_period=grace,
                    reduction_factor=reduction_factor, stop_last_trials=False)
            return self.by_method[method]

        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            self.asha(trial).on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            return self.asha(trial).on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            self.asha(trial).on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
            self.asha(trial).on_trial_remove(tune_controller, trial)

        def preload(self, method: str, trial_id: str, evals: list[dict[str, float]]) -> None:
            """Put a finished trial's (of a resumed sweep) intermediate scores into its method's rungs."""
            ghost = type("Ghost", (), {"trial_id": trial_id, "config": {"trial": {"method": method}}})()
            self.asha(ghost).on_trial_add(None, ghost)
            for e in evals:
                self.asha(ghost).on_trial_result(None, ghost, {"step": e["step"], "score": e["score"]})
            self.asha(ghost).on_trial_remove(None, ghost)

    return MethodASHA()


def method_queue(specs: list[dict[str, Any]]) -> Any:
    """A Ray Tune searcher handing out ``specs`` in order, at most one running trial per method (methods side by
    side).  Tune starts every trial it has been given as soon as resources allow, so the order is enforced here,
    by not suggesting a method's next rate until its previous trial has ended (done, stopped by ASHA or failed)."""
    from ray.tune.search import Searcher

    class MethodQueue(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.queues: dict[str, list[dict[str, Any]]] = {}
            for spec in specs:
                self.queues.setdefault(spec["method"], []).append(spec)
            self.running: dict[str, str] = {}  # Tune's trial id -> method

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if not any(self.queues.values()):
                return Searcher.FINISHED
            busy = set(self.running.values())
            for method, queue in self.queues.items():
                if queue and method not in busy:
                    self.running[trial_id] = method
                    return {"trial": queue.pop(0)}
            return None  # every method with rates left has one running: Tune asks again later

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.running.pop(trial_id, None)

        def save(self, checkpoint_path: str) -> None:
            """Nothing: a sweep resumes from its trials' ``trial.json`` files, never Tune's pickled state."""

        def restore(self, checkpoint_path: str) -> None:
            """Nothing (see `save`)."""

    return MethodQueue()


def run_stage(cfg: SweepConfig, base: RunConfig, trials: list[Trial], name: str, mode: str,
              done_before: list[Trial] = ()) -> None:
    """Run ``trials`` (those not finished yet) on Ray Tune; ``done_before``: finished trials of the same stage,
    whose intermediate scores ASHA's rungs start from."""
    todo = [t for t in trials if not finished(t.dir)]
    if not todo:
        return
    from ray import tune
    resolved = base.resolved()
    steps = resolved.steps
    eval_every = resolved.eval_every
    threads = max(1, int(cfg.cpus_per_trial))
    specs = [{"id": t.id, "method": t.method, "lr": t.lr, "seed": t.seed, "options": t.options, "steps": steps,
              "threads": threads, "run": dataclasses.asdict(t.run_config(resolved))} for t in todo]
    scheduler = None
    if cfg.scheduler == "asha" and name == "stage1":
        scheduler = method_asha(mode, steps, eval_every, cfg.reduction_factor)
        for t in done_before:
            record = read_record(t.dir) or {}
            scheduler.preload(t.method, t.id, record.get("evals", []))
    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    watch = watcher()
    storage = Path(cfg.output_dir).resolve() / "tune"
    while specs:
        # under ASHA, each method's rates one at a time (ASHA promotes the first trial to reach a rung: two rates of
        # one method side by side would race for it); else every trial as resources allow
        search = {"search_alg": method_queue(specs), "num_samples": len(specs)} if scheduler is not None else {}
        tuner = tune.Tuner(
            tune.with_resources(run_trial, resources),
            param_space={} if scheduler is not None else {"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True, **search),
            run_config=tune.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                      verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[watch]))
        try:
            tuner.fit()
            break
        except Exception as err:
            reason = f"Ray Tune stopped while the trial ran: {' '.join(str(err).split())[:400]}"
            logger.warning("%s; the trials that had not started go on", reason)
            for spec in specs:  # the trials in flight are failed with the reason; the others run in a new Tuner
                if Path(spec["run"]["output_dir"]).exists() and not finished(spec["run"]["output_dir"]):
                    watch.errors[spec["id"]] = reason
            specs = [s for s in specs if not Path(s["run"]["output_dir"]).exists()]
    for t in todo:  # what Tune knows of trials whose own record is not final
        record = read_record(t.dir) or {}
        if record.get("status") in FINISHED:
            continue
        head = {"id": t.id, "method": t.method, "lr": t.lr, "seed": t.seed, "options": t.options}
        evals = record.get("evals", [])
        if t.id in watch.errors or not evals:  # the worker died (killed for memory, ...) or never reported
            reason = watch.errors.get(t.id, "the trial ended without a result")
            write_record(t.dir, {**head, "status": "failed", "reason": reason, "evals": evals,
                                 "steps": evals[-1]["step"] if evals else 0})
        else:  # ASHA stopped it after its last report
            write_record(t.dir, {**head, "status": "stopped", "evals": evals, "steps": evals[-1]["step"]})
    for t in todo:
        record = read_record(t.dir) or {}
        logger.info("trial %s: %s%s", t.id, record.get("status", "?"),
                    f" ({record['reason']})" if record.get("reason") else
                    f", {record['metric']} {record['score']:.4f}" if record.get("status") == "done" else "")


def watcher() -> Any:
    """A Ray Tune callback that keeps each errored trial's reason (the last line of Tune's ``error.txt``)."""
    from ray import tune

    class Watch(tune.Callback):
        def __init__(self) -> None:
            self.errors: dict[str, str] = {}

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            lines = []
            with contextlib.suppress(OSError, TypeError):
                lines = [x for x in Path(trial.error_file).read_text().splitlines() if x.strip()]
            self.errors[trial.config["trial"]["id"]] = " ".join(lines[-1].split())[:500] if lines else "Ray error"

    return Watch()
