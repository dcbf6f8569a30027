"""`lorakit sweep` / `lorakit auto` on Ray Tune with the tiny random Llama: a grid killed mid-sweep and resumed
(leaderboard = recomputation from the trial logs, no finished trial run twice, trials equal uninterrupted runs),
ASHA + budget + a diverging trial + `auto` against a real Ray head on loopback, and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorakit.cli import build_parser, main, run_config
from lorakit.stats import mean_std
from lorakit.sweep import plan, report, train_command
from lorakit.train.data import load_task
from lorakit.train.run import RunConfig, run_training
from tests import test_cli

tiny_lm = test_cli.tiny_lm  # the random 2-layer Llama directory (a module fixture)

COMMON = ["--task", "arith", "--steps", "4", "--eval-limit", "4", "--metric", "nll", "--batch-size", "4",
          "--warmup-steps", "0"]


# Ray kills workers when the whole machine's memory is 95% used, whoever uses it; tests on a shared machine turn that
# off so that only the sweep's own failures show (a killed worker is recorded as a failed trial, as designed).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_memory_monitor_refresh_ms": "0"}


def start(args: list[str]) -> subprocess.Popen:
    env = ENV
    return subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def records(out: Path) -> dict[str, dict]:
    found = {}
    for path in out.glob("trials/*/*/trial.json"):
        with open(path) as f:
            record = json.load(f)
        found[record["id"]] = record
    return found


def run_jsons(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/*/run.json"))]


def recompute(out: Path, methods: list[str]) -> dict[str, tuple[float, int, float, float]]:
    """method -> (best lr, n, mean, std) from the trials' run.json files (lower NLL is better)."""
    by = {}
    for run in run_jsons(out):
        by.setdefault((run["config"]["method"], run["config"]["lr"]), []).append(run["score_after"])
    best = {}
    for m in methods:
        lr = min((lr for (mm, lr) in by if mm == m), key=lambda lr: mean_std(by[(m, lr)])[0])
        best[m] = (lr, len(by[(m, lr)]), *mean_std(by[(m, lr)]))
    return best


def test_grid_killed_then_resumed_equals_recomputation_and_uninterrupted_runs(tiny_lm: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_lm), *COMMON, "--methods", "lora,lora-sb", "--lrs", "1e-3,3e-3",
            "--seeds", "2", "--scheduler", "grid", "-o", "r=2", "--output-dir", str(out)]
    victim = start(args)
    deadline = time.monotonic() + 300
    while sum(r["status"] == "done" for r in records(out).values()) < 2 and victim.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the driver and the Ray it started
    victim.communicate()
    before = {i: r for i, r in records(out).items() if r["status"] == "done"}
    assert 2 <= len(before) < 8, "the sweep ended before it could be killed"
    stamps = {i: (out / "trials" / i / "run.json").stat().st_mtime_ns for i in before}
    interrupted = [i for i in (f"{m}/lr{lr}-seed{s}" for m in ("lora", "lora-sb") for lr in ("0.001", "0.003")
                               for s in (0, 1)) if i not in before]

    resumed = start([*args, "--resume"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert {i: (out / "trials" / i / "run.json").stat().st_mtime_ns for i in before} == stamps  # not run again
    rows = json.loads((out / "leaderboard.json").read_text())
    expected = recompute(out, ["lora", "lora-sb"])
    assert [r["method"] for r in rows] == ["lora", "lora-sb"]
    for row in rows:
        lr, n, mean, std = expected[row["method"]]
        assert (row["lr"], row["n"], row["mean"], row["std"]) == (lr, n, mean, std) and n == 2
        assert row["trainable"] > 0 and row["wall_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_mem"] > 0
        assert row["forgetting_nll_before"] > 0 and row["forgetting_nll_after"] > 0
    assert rows[0]["verdict"] == "reference" and rows[1]["verdict"] in ("better", "worse", "not distinguishable")
    for name in ("leaderboard.md", "pareto.png", "lr.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    # the trials the kill interrupted (or never started) equal uninterrupted runs of the same configuration
    for trial_id in interrupted[:2]:
        run = json.loads((out / "trials" / trial_id / "run.json").read_text())
        fields = {f.name for f in dataclasses.fields(RunConfig)}
        config = RunConfig(**{k: v for k, v in run["config"].items() if k in fields})
        fresh = run_training(dataclasses.replace(config, output_dir=str(tmp_path / "fresh" / trial_id),
                                                 resume=False))
        assert fresh.score_after == run["score_after"] and fresh.train.losses == run["train"]["losses"]

    # everything finished: a second --resume rebuilds the results from the trial logs without starting Ray
    experiments = sorted((out / "tune").iterdir())
    again = start([*args, "--resume"])
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert sorted((out / "tune").iterdir()) == experiments
    assert json.loads((out / "leaderboard.json").read_text()) == rows


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A real Ray head node on 127.0.0.1, its GCS address; ``ray start --block`` in its own process group, so that
    the teardown stops this head's processes only (``ray stop`` would stop every Ray on the machine)."""
    temp = tempfile.mkdtemp(prefix="lkray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                             "--temp-dir", temp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not reachable(port):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head failed"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def checkpoint_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoint" / "trainer_state.json").read_text())["step"]


def test_auto_on_a_ray_cluster_asha_budget_and_a_diverging_trial(tiny_lm: Path, tmp_path: Path, ray_head: str
                                                                  ) -> None:
    out, budget, steps = tmp_path / "auto", 1500, 6
    args = ["auto", "--model", str(tiny_lm), "--task", "arith", "--steps", str(steps), "--eval-every", "2",
            "--eval-limit", "4", "--metric", "nll", "--batch-size", "4", "--warmup-steps", "0",
            "--methods", "lora,lora-sb", "--lrs", "1e-2,1e-5,1e30", "--seeds", "2", "--budget", str(budget),
            "--address", ray_head, "--output-dir", str(out)]
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True,
                            timeout=900, env=ENV)
    assert result.returncode == 0, result.stderr
    found = records(out)
    spec, _ = load_task("arith", "train", None, limit=1)
    from lorakit.models import load_model
    model, _ = load_model(str(tiny_lm), "causal-lm")
    for method in ("lora", "lora-sb"):
        good, slow, wild = (found[f"{method}/lr{lr}-seed0"] for lr in ("0.01", "1e-05", "1e+30"))
        assert good["status"] == "done" and checkpoint_step(out / "trials" / method / "lr0.01-seed0") == steps
        # ASHA stopped the slow rate at its first rung: it trained fewer steps than the grid would
        assert slow["status"] == "stopped" and checkpoint_step(out / "trials" / method / "lr1e-05-seed0") < steps
        assert wild["status"] == "failed" and "nan" in wild["reason"]  # recorded, and the sweep went on
        assert found[f"{method}/lr0.01-seed1"]["status"] == "done"  # the second seed only for the survivor
        assert f"{method}/lr1e-05-seed1" not in found and f"{method}/lr1e+30-seed1" not in found
        # budget: the chosen rank's count is the closest to the budget, and the trial trained exactly that many
        counts = plan.rank_counts(model, RunConfig(model=str(tiny_lm), task="arith").resolved(), spec, method, {})
        r = good["options"]["r"]
        assert abs(counts[r] - budget) == min(abs(c - budget) for c in counts.values())
        assert good["trainable"] == counts[r]
    rows = json.loads((out / "leaderboard.json").read_text())
    assert [(r["method"], r["lr"], r["n"], r["failed"], r["stopped"]) for r in rows] == [
        ("lora", 0.01, 2, 1, 1), ("lora-sb", 0.01, 2, 1, 1)]
    outcome = json.loads((out / "auto.json").read_text())
    assert outcome["winner"] == min(rows, key=lambda r: r["mean"])["method"]
    assert (out / "peft" / "adapter_config.json").is_file() and (out / "final" / "adapter").is_dir()
    # the printed command reproduces the final run's configuration
    command = result.stdout.strip().splitlines()[-1].strip()
    assert command == outcome["command"]
    final = json.loads((out / "final" / "run.json").read_text())["config"]
    parsed = run_config(build_parser().parse_args(shlex.split(command)[1:])).resolved()
    assert dataclasses.asdict(parsed) == final


def test_train_command_round_trips() -> None:
    run = RunConfig(model="m", task="sst2", method="dora", method_options={"r": 4, "alpha": 8.0}, lr=3e-4, steps=7,
                    group_by_length=False, chat_template=False, bf16=True, seed=3, output_dir="x/y")
    assert run_config(build_parser().parse_args(shlex.split(train_command(run))[1:])) == run
    # every field away from its default (the bools flipped), so every flag's name is checked against the parser
    changed = {"data_dir": "d", "batch_size": 3, "grad_accum": 2, "weight_decay": 0.1, "warmup_steps": 1,
               "schedule": "cosine", "max_grad_norm": 0.5, "max_length": 9, "eval_every": 2, "eval_limit": 5,
               "eval_split": "validation", "metric": "accuracy", "max_new_tokens": 4, "init_samples": 3,
               "chat_template": True, "dtype": "bf16", "quantize": "nf4", "gradient_checkpointing": True,
               "fsdp": True, "packing": True, "compile": True, "device": "cpu", "save_every": 2}
    missing = {f.name for f in dataclasses.fields(RunConfig)} - set(changed) - {
        "model", "task", "method", "method_options", "lr", "steps", "group_by_length", "bf16", "seed",
        "output_dir", "resume"}
    assert not missing, f"add {missing} to this test"
    run = dataclasses.replace(run, **changed)
    parsed = run_config(build_parser().parse_args(shlex.split(train_command(run))[1:]))
    assert parsed == run


@pytest.mark.parametrize(("extra", "message"), [
    (["--methods", "lora,nope"], "unknown method nope"),
    (["--methods", "lora", "--lrs", ","], "the grid has no learning rate"),
    (["--methods", "lora", "--metric", "accuracy"], "does not fit task arith"),
    (["--methods", "lora", "--budget", "1"], "cannot be met by lora"),
    (["--methods", "lora", "--address", "127.0.0.1:1"], "cannot reach a Ray cluster"),
    (["--methods", "lora", "-o", "r=64"], "lora: r=64 does not fit this model; its targets admit ranks 1 to 16"),
])
def test_bad_input_is_one_line_exit_2_before_any_trial(tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       extra: list[str], message: str) -> None:
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_lm), "--task", "arith", "--steps", "4", "--output-dir", str(out),
                 *extra])
    err = capsys.readouterr().err  # (besides transformers' progress bar while the budget loads the model)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and errors[0].startswith("lorakit: error:"), err
    assert not (out / "trials").exists()


def test_leaderboard_best_rate_spread_and_verdicts_from_records() -> None:
    """Best rate by mean (ties: the rate tried first), mean ± sample std of its seeds, and the ±2 SE verdict turned
    round for a lower-is-better metric."""
    def rec(method: str, lr: float, seed: int, score: float, status: str = "done") -> dict:
        return {"id": f"{method}/{lr}/{seed}", "method": method, "lr": lr, "seed": seed, "options": {"r": 2},
                "status": status, "score": score, "trainable": 10, "wall_s": 1.0, "peak_mem": 5.0,
                "tokens_per_s": 100.0}
    records = [rec("lora", 1e-3, 0, 0.50), rec("lora", 1e-3, 1, 0.52), rec("lora", 1e-3, 2, 0.51),
               rec("lora", 3e-3, 0, 0.40), rec("lora", 3e-3, 1, 0.41), rec("lora", 3e-3, 2, 0.42),
               rec("dora", 2e-3, 0, 0.30), rec("dora", 2e-3, 1, 0.31), rec("dora", 2e-3, 2, 0.32),
               rec("dora", 1e-3, 0, 0.30), rec("dora", 1e-3, 1, 0.31), rec("dora", 1e-3, 2, 0.32),
               rec("pissa", 1e-3, 0, 0.0, "failed")]
    rows = {r["method"]: r for r in report.leaderboard(records, ["lora", "dora", "pissa"], "nll", "lora", None)}
    assert rows["lora"]["lr"] == 3e-3 and rows["lora"]["n"] == 3  # lower NLL wins
    assert (rows["lora"]["mean"], rows["lora"]["std"]) == mean_std([0.40, 0.41, 0.42])
    assert rows["dora"]["lr"] == 2e-3  # a tie goes to the rate tried first
    assert rows["dora"]["verdict"] == "better" and rows["lora"]["verdict"] == "reference"
    assert rows["pissa"]["n"] == 0 and rows["pissa"]["failed"] == 1 and rows["pissa"]["mean"] is None
    as_accuracy = {r["method"]: r for r in report.leaderboard(records, ["lora", "dora"], "accuracy", "lora", None)}
    assert as_accuracy["lora"]["lr"] == 1e-3 and as_accuracy["dora"]["verdict"] == "worse"
    close = [rec("lora", 1e-3, s, x) for s, x in enumerate((0.5, 0.6, 0.4))] + \
        [rec("dora", 1e-3, s, x) for s, x in enumerate((0.55, 0.45, 0.5))]
    rows = report.leaderboard(close, ["lora", "dora"], "accuracy", "lora", None)
    assert rows[1]["verdict"] == "not distinguishable"


def test_a_second_sweep_on_an_output_dir_in_use_is_refused(tiny_lm: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """One run per output directory: while another holder (a thread here, as a second process would) has the
    directory's lock, `lorakit sweep` refuses before any trial, naming the directory and the holder's pid."""
    import threading

    from lorakit.core.files import locked_dir
    out = tmp_path / "sweep"
    out.mkdir()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locked_dir(out):
            held.set()
            release.wait(60)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        code = main(["sweep", "--model", str(tiny_lm), "--task", "arith", "--steps", "4", "--methods", "lora",
                     "--output-dir", str(out)])
    finally:
        release.set()
        holder.join()
    err = capsys.readouterr().err
    assert code == 2 and f"the output directory {out} is in use by another lorakit run (pid {os.getpid()})" in err
    assert not (out / "trials").exists() and not (out / "sweep.json").exists()


def test_a_default_rank_the_model_cannot_hold_is_lowered_to_the_largest_that_fits(tiny_lm: Path) -> None:
    """LoRA-SB's default r=32 on the 32-wide toy model (k/v projections 16 wide): the sweep trains it at r=16 and
    says so; LoRA's default r=8 fits and is left alone (no entry: the trial takes the method's default)."""
    base = RunConfig(model=str(tiny_lm), task="arith", steps=4, eval_limit=4)
    cfg = plan.SweepConfig(base=base, methods=["lora", "lora-sb"], scheduler="grid", output_dir="unused")
    ranks = plan.check(cfg)
    assert ranks == {"lora-sb": 16}
    assert plan.trial(cfg, "lora-sb", 1e-3, 0, ranks).options["r"] == 16
    assert "r" not in plan.trial(cfg, "lora", 1e-3, 0, ranks).options


def test_a_trial_record_is_checked_before_the_sweep_trusts_it(tmp_path: Path) -> None:
    """`engine.read_record` takes only a regular ``trial.json`` holding the fields of its status with their types;
    anything else (a FIFO, a list, a ``done`` without its score, a string step) is None: the trial runs again."""
    from lorakit.sweep import engine
    good = {"id": "lora/lr0.001-seed0", "method": "lora", "lr": 1e-3, "seed": 0, "options": {}, "status": "done",
            "evals": [{"step": 2, "score": 0.5}], "metric": "nll", "score": 0.4, "score_before": 0.9, "steps": 4,
            "trainable": 10, "wall_s": 1.0, "peak_mem": None, "tokens_per_s": 5.0}
    engine.write_record(tmp_path, good)
    assert engine.read_record(tmp_path) == good and engine.finished(tmp_path)
    bad = [[good], {**good, "status": "finished"}, {k: v for k, v in good.items() if k != "score"},
           {**good, "score": "0.4"}, {**good, "seed": True}, {**good, "evals": [{"step": "2", "score": 0.5}]},
           {**good, "status": "failed"}]  # a failed record needs its reason
    for record in bad:
        (tmp_path / engine.RECORD).write_text(json.dumps(record))
        assert engine.read_record(tmp_path) is None and not engine.finished(tmp_path), record
    (tmp_path / engine.RECORD).unlink()
    os.mkfifo(tmp_path / engine.RECORD)
    assert engine.read_record(tmp_path) is None  # refused at once, not a blocked read
