"""Issue 23's surfaces under hostile input; writes ``results/reliability-surfaces.{md,json}``.

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks:. python benchmarks/reliability_surfaces.py   # ~10 min, 2 cores

Surfaces: training checkpoints (``lorakit train --resume`` on a tampered checkpoint), output directories (two runs
on one directory, planted symlinks, FIFOs, file modes), federated client metrics (`LowRankStrategy.aggregate_train`
on crafted replies), pruned model directories (`lorakit.models.load_model` on a tampered ``lorakit prune`` output),
the classification head read by ``lorakit export``/``eval``, and loading cost (20k pattern keys, a 6 GiB extra
tensor, ``lora_alpha: null``).  Each case runs in a forked child (8 GiB address-space cap, a time limit) or as a
real ``lorakit`` process, and is classified:

* clean: a refusal as a user should see it (CLI: exit 2 and one ``lorakit: error:`` line; library: a
  `LorakitError`; fed: the client excluded with a logged reason and a finite round summary);
* correct: the input is legitimate or harmless and the result is right (e.g. an untampered resume);
* silent: a bad input accepted (exit 0, a symlink's target overwritten, a non-finite or different result);
* wrong: any other exception, a traceback or an ``internal error``;  hang: no answer within the time limit.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import reliability_cli as rc

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VERDICTS = ("clean", "correct", "silent", "wrong", "hang")
TIME_LIMIT_S = 60.0


def forked(fn: Callable[[], tuple[str, str]], timeout: float = TIME_LIMIT_S, memory_gib: int = 8) -> tuple[str, str]:
    """``fn()`` -> (verdict, detail) in a forked child with a memory cap; ``hang`` past ``timeout``; an escaped
    exception is ``wrong``."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        resource.setrlimit(resource.RLIMIT_AS, (memory_gib << 30, memory_gib << 30))
        with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            try:
                result = fn()
            except BaseException as err:  # the classification itself
                result = ("wrong", f"{type(err).__name__}: {str(err)[:200]} @ "
                          + traceback.format_tb(err.__traceback__)[-1].strip().splitlines()[0][:120])
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    start, data = time.monotonic(), b""
    os.set_blocking(read, False)
    while True:
        try:
            chunk = os.read(read, 65536)
            data += chunk
        except BlockingIOError:
            chunk = None
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            os.set_blocking(read, True)
            data += os.read(read, 1 << 20)
            os.close(read)
            return tuple(json.loads(data)) if data else ("wrong", "child died without an answer (killed?)")
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read)
            return "hang", f"no answer within {timeout:.0f} s"
        time.sleep(0.05)


def cli(argv: list[str], expect: str = "refusal", timeout: float = TIME_LIMIT_S) -> Callable[[], tuple[str, str]]:
    """A case running ``lorakit.cli.main(argv)``: ``expect`` refusal (clean = exit 2, one line) or success."""
    def run() -> tuple[str, str]:
        from lorakit.cli import main
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
        text = err.getvalue()
        last = (text.strip().splitlines() or [""])[-1][:200]
        verdict = rc.verdict(code, text)
        if verdict == "clean":
            return ("clean" if expect == "refusal" else "wrong"), last
        if verdict == "accepted":
            return ("correct" if expect == "success" else "silent"), "exit 0"
        return "wrong", last
    return run


# ------------------------------------------------------------------------------------------------- checkpoints
def checkpoint_cases(tmp: Path, model: Path) -> dict[str, Callable[[], tuple[str, str]]]:
    args = ["train", "--model", str(model), "--task", "arith", "--steps", "6", "--batch-size", "2", "--eval-limit",
            "2", "--max-new-tokens", "2", "--method", "lora", "-o", "r=2", "--save-every", "3"]
    base = tmp / "ckpt-base"
    done = rc.run_cli([*args, "--output-dir", str(base)])
    assert done.returncode == 0, done.stderr[-2000:]

    resume = [*args[:6], "9", *args[7:]]  # three steps more than the checkpoint holds, so that it is used

    def copy(name: str) -> Path:
        out = tmp / f"ckpt-{name}"
        shutil.copytree(base, out, symlinks=True)
        return out

    def edit_json(name: str, edit: Callable[[dict[str, Any]], None]) -> Callable[[], tuple[str, str]]:
        out = copy(name)
        path = out / "checkpoint" / "trainer_state.json"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
        return cli([*resume, "--output-dir", str(out), "--resume"])

    def edit_tensors(name: str, edit: Callable[[dict[str, Any]], None]) -> Callable[[], tuple[str, str]]:
        from safetensors.torch import load_file, save_file
        out = copy(name)
        path = out / "checkpoint" / "trainer_state.safetensors"
        tensors = load_file(str(path))
        edit(tensors)
        save_file(tensors, str(path))
        return cli([*resume, "--output-dir", str(out), "--resume"])

    import torch

    def put(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
        def edit(meta: dict[str, Any]) -> None:
            node = meta
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        return edit

    cases: dict[str, Callable[[], tuple[str, str]]] = {"untampered (control)": cli(
        [*resume, "--output-dir", str(copy("control")), "--resume"], expect="success")}
    for label, path, value in [("progress.step 5 of 6", ["progress", "step"], 5),
                               ("progress.step -1", ["progress", "step"], -1),
                               ("progress.step 2.5", ["progress", "step"], 2.5),
                               ("step 5 (losses say 6)", ["step"], 5),
                               ("batches_drawn 1e18", ["batches_drawn"], 10 ** 18),
                               ("batches_drawn -1", ["batches_drawn"], -1),
                               ("batches_drawn 'x'", ["batches_drawn"], "x"),
                               ("batches_drawn 2.5", ["batches_drawn"], 2.5),
                               ("base_lr -1", ["optimizer", "param_groups", 0, "base_lr"], -1.0),
                               ("eps 0", ["optimizer", "param_groups", 0, "eps"], 0.0),
                               ("weight_decay 1e3", ["optimizer", "param_groups", 0, "weight_decay"], 1e3),
                               ("hooks before_forward=1", ["hooks", "before_forward"], 1),
                               ("unknown config key", ["config", "bogus_key"], 1),
                               ("progress.losses 'x'", ["progress", "losses"], "x"),
                               ("trainable [1, 2]", ["trainable"], [1, 2])]:
        cases[f"json: {label}"] = edit_json(label.replace(" ", "_").replace("'", ""), put(path, value))
    first = "optimizer.0"
    for label, edit in [("adam step 0", lambda t: t.update({f"{first}.step": torch.tensor(0.0)})),
                        ("adam step 1e9", lambda t: t.update({f"{first}.step": torch.tensor(1e9)})),
                        ("adam step -1", lambda t: t.update({f"{first}.step": torch.tensor(-1.0)})),
                        ("exp_avg int64", lambda t: t.update({f"{first}.exp_avg": t[f"{first}.exp_avg"].long()})),
                        ("exp_avg bf16", lambda t: t.update({f"{first}.exp_avg": t[f"{first}.exp_avg"].bfloat16()})),
                        ("exp_avg wrong shape", lambda t: t.update({f"{first}.exp_avg": torch.zeros(3, 3)})),
                        ("rng missing", lambda t: t.pop("rng.cpu.0")),
                        ("rng short", lambda t: t.update({"rng.cpu.0": t["rng.cpu.0"][:10]}))]:
        cases[f"tensors: {label}"] = edit_tensors(label.replace(" ", "_"), edit)
    fifo = copy("fifo")
    (fifo / "checkpoint" / "trainer_state.safetensors").unlink()
    os.mkfifo(fifo / "checkpoint" / "trainer_state.safetensors")
    cases["FIFO as trainer_state.safetensors"] = cli([*resume, "--output-dir", str(fifo), "--resume"])
    linked = copy("symlinked")
    shutil.move(str(linked / "checkpoint"), str(tmp / "elsewhere-checkpoint"))
    (linked / "checkpoint").symlink_to(tmp / "elsewhere-checkpoint")
    cases["checkpoint dir symlinked elsewhere"] = cli([*resume, "--output-dir", str(linked), "--resume"])
    return cases


# ------------------------------------------------------------------------------------------------ output dirs
def output_cases(tmp: Path, model: Path, adapter: Path) -> dict[str, Callable[[], tuple[str, str]]]:
    train = ["train", "--model", str(model), "--task", "arith", "--steps", "40", "--batch-size", "2", "--eval-limit",
             "2", "--max-new-tokens", "2", "--method", "lora", "-o", "r=2"]

    def two_runs() -> tuple[str, str]:
        """A second run started while the first holds the directory (its pid in the lock file): the second must
        refuse at once; the first, long enough to outlive the second's start, is then stopped."""
        out = tmp / "shared-out"
        first = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *train[:6], "4000", *train[7:],
                                  "--save-every", "0", "--output-dir", str(out)],
                                 env=rc.ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lock = out / ".lorakit.lock"
        deadline = time.monotonic() + TIME_LIMIT_S
        while first.poll() is None and time.monotonic() < deadline and not (
                lock.is_file() and lock.read_text().strip() == str(first.pid)):
            time.sleep(0.05)
        if first.poll() is not None:
            return "wrong", f"the first run ended (exit {first.returncode}) before it held the directory"
        second = rc.run_cli([*train, "--save-every", "0", "--output-dir", str(out)])
        first.terminate()
        first.communicate()
        if second.returncode == 0:
            return "silent", "the second run exited 0 on a directory the first held"
        if second.returncode == 2:
            last = second.stderr.strip().splitlines()[-1][:200]
            return ("clean" if rc.verdict(2, second.stderr) == "clean" else "wrong"), last
        return "wrong", f"the second run exited {second.returncode}"

    def planted(command: list[str], out: Path, name: str) -> Callable[[], tuple[str, str]]:
        target = tmp / f"victim-{name}"
        target.write_text("precious")
        out.mkdir(parents=True, exist_ok=True)
        (out / name).symlink_to(target)

        def run() -> tuple[str, str]:
            verdict, detail = cli(command)()  # a refusal is clean; exit 0 is right only if the target is intact
            if target.read_text() != "precious":
                return "silent", f"the symlink's target was overwritten ({detail})"
            return ("correct" if verdict == "silent" else verdict), detail
        return run

    def mode_check() -> tuple[str, str]:
        out = tmp / "modes"
        verdict, detail = cli([*train[:6], "2", *train[7:], "--output-dir", str(out)], expect="success")()
        if verdict != "correct":
            return verdict, detail
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (out / "adapter").iterdir()}
        expected = oct(0o666 & ~_umask())
        return ("correct" if set(modes.values()) == {expected} else "silent"), f"modes {modes}, umask gives {expected}"

    cases: dict[str, Callable[[], tuple[str, str]]] = {"two train runs on one --output-dir": two_runs}
    cases["export: adapter_config.json planted symlink"] = planted(
        ["export", str(adapter), "--out", str(tmp / "exp-link")], tmp / "exp-link", "adapter_config.json")
    cases["merge: config.json planted symlink"] = planted(
        ["merge", str(adapter), "--out", str(tmp / "merge-link")], tmp / "merge-link", "config.json")
    cases["train: run.json planted symlink"] = planted(
        [*train[:6], "2", *train[7:], "--output-dir", str(tmp / "train-link")], tmp / "train-link", "run.json")
    (tmp / "exp-fifo").mkdir()
    os.mkfifo(tmp / "exp-fifo" / "adapter_config.json")
    cases["export: FIFO as adapter_config.json"] = cli(["export", str(adapter), "--out", str(tmp / "exp-fifo")])
    (tmp / "exp-dir" / "adapter_model.safetensors").mkdir(parents=True)
    cases["export: directory as adapter_model.safetensors"] = cli(["export", str(adapter), "--out",
                                                                   str(tmp / "exp-dir")])
    (tmp / "train-fifo").mkdir()
    os.mkfifo(tmp / "train-fifo" / "run.json")
    cases["train: FIFO as run.json"] = cli([*train[:6], "2", *train[7:], "--output-dir", str(tmp / "train-fifo")])
    if os.geteuid() != 0:  # root writes into a read-only directory: the case means nothing there
        (tmp / "exp-ro").mkdir()
        os.chmod(tmp / "exp-ro", 0o500)
        cases["export: read-only --out"] = cli(["export", str(adapter), "--out", str(tmp / "exp-ro")])
    cases["file modes follow the umask"] = mode_check
    return cases


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------- fed metrics
def fed_cases() -> dict[str, Callable[[], tuple[str, str]]]:
    nan, inf = float("nan"), float("inf")
    crafted: dict[str, tuple[bool, dict[str, Any]]] = {
        "train-loss missing": (False, {"train-loss": None}), "train-loss 'x'": (False, {"train-loss": "x"}),
        "train-loss NaN": (False, {"train-loss": nan}), "train-loss inf": (False, {"train-loss": inf}),
        "train-loss -1": (False, {"train-loss": -1.0}), "train-loss true": (False, {"train-loss": True}),
        "train-loss list": (False, {"train-loss": [0.5, 0.5]}), "num-examples missing": (False, {"num-examples": None}),
        "num-examples NaN": (False, {"num-examples": nan}), "num-examples 1e12": (False, {"num-examples": 1e12}),
        "epsilon missing (DP)": (True, {"epsilon": None}), "epsilon 'x' (DP)": (True, {"epsilon": "x"}),
        "epsilon NaN (DP)": (True, {"epsilon": nan}), "epsilon -1 (DP)": (True, {"epsilon": -1.0}),
        "epsilon above the budget (DP)": (True, {"epsilon": 30.0}), "epsilon inf (DP)": (True, {"epsilon": inf}),
        "metrics record missing": (False, {"__no_metrics__": True}),
        "extra unknown metric": (False, {"accuracy": "high"}),
    }

    def case(dp: bool, change: dict[str, Any]) -> Callable[[], tuple[str, str]]:
        def run() -> tuple[str, str]:
            from types import SimpleNamespace

            import torch
            from flwr.app import ArrayRecord

            from lorakit.fed.checkpoint import ServerState
            from lorakit.fed.config import FedConfig
            from lorakit.fed.server import LowRankStrategy

            cfg = FedConfig(strategy="fed-sb", dp_epsilon=3.0 if dp else None)
            strategy = LowRankStrategy(cfg, ServerState(tensors={"l.lora_R": torch.zeros(2, 2)}), 1.0, 100)

            def reply(node: int, metrics: dict[str, Any]) -> Any:
                content: dict[str, Any] = {"arrays": ArrayRecord({"l.lora_R": torch.full((2, 2), float(node))})}
                if "__no_metrics__" not in metrics:
                    content["metrics"] = {k: v for k, v in metrics.items() if v is not None}
                return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content=content,
                                       has_error=lambda: False)
            good = {"num-examples": 4, "train-loss": 0.5, **({"epsilon": 1.0} if dp else {})}
            replies = [reply(1, good), reply(2, good), reply(3, {**good, **change})]
            _, summary = strategy.aggregate_train(1, replies)
            summary = dict(summary or {})
            finite = all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
            excluded = strategy.excluded.get(1, {})
            harmless = "accuracy" in change
            if harmless:
                return ("correct" if not excluded and finite and summary.get("clients") == 3 else "silent"), \
                    str(excluded)[:200]
            if "3" in excluded and finite and summary.get("clients") == 2:
                return "clean", excluded["3"][:200]
            return "silent", f"client kept; summary {summary}"[:200]
        return run

    return {f"{name}": case(dp, change) for name, (dp, change) in crafted.items()}


# -------------------------------------------------------------------------------------------- pruned models
def pruned_cases(tmp: Path, model: Path) -> dict[str, Callable[[], tuple[str, str]]]:
    pruned = tmp / "pruned"
    done = rc.run_cli(["prune", "--model", str(model), "--out", str(pruned), "--ratio", "0.5", "--first", "0",
                       "--last", "0", "--samples", "4", "--max-length", "64"])
    assert done.returncode == 0, done.stderr[-2000:]

    def logits(directory: Path) -> Any:
        import torch

        from lorakit.models import load_model
        net, _ = load_model(str(directory), "causal-lm")
        with torch.no_grad():
            return net(input_ids=torch.arange(1, 9).unsqueeze(0)).logits

    def case(name: str, edit: Callable[[Path], None]) -> Callable[[], tuple[str, str]]:
        directory = tmp / f"pruned-{len(os.listdir(tmp))}"
        shutil.copytree(pruned, directory)
        edit(directory)

        def run() -> tuple[str, str]:
            import torch

            from lorakit.errors import LorakitError
            reference = logits(pruned)
            try:
                got = logits(directory)
            except LorakitError as err:
                return "clean", str(err)[:200]
            if not torch.isfinite(got).all():
                return "silent", "non-finite logits"
            diff = float((got - reference).abs().max())
            return ("correct" if diff < 1e-5 else "silent"), f"loaded; max logit difference {diff:.3g}"
        return run

    def config(**changes: Any) -> Callable[[Path], None]:
        def edit(directory: Path) -> None:
            data = json.loads((directory / "config.json").read_text())
            data.update(changes)
            (directory / "config.json").write_text(json.dumps(data))
        return edit

    def raw_config(text: str) -> Callable[[Path], None]:
        return lambda directory: (directory / "config.json").write_text(text)

    def weights(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
        def run(directory: Path) -> None:
            from safetensors.torch import load_file, save_file
            tensors = load_file(str(directory / "model.safetensors"))
            edit(tensors)
            save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return run

    def extra_file(directory: Path) -> None:
        from safetensors.torch import load_file, save_file
        tensors = {k: v * 0 for k, v in load_file(str(directory / "model.safetensors")).items()}
        save_file(tensors, str(directory / "zzz.safetensors"), metadata={"format": "pt"})

    def first_weight(fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
        def edit(tensors: dict[str, Any]) -> None:
            key = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
            tensors[key] = fn(tensors[key])
        return edit

    cases = {
        "num_hidden_layers 1e6": config(num_hidden_layers=10 ** 6), "hidden_size 0": config(hidden_size=0),
        "intermediate_size -1": config(intermediate_size=-1), "hidden_act 'nope'": config(hidden_act="nope"),
        "rope_scaling bogus": config(rope_scaling={"type": "bogus", "factor": "x"}),
        "pad_token_id 1e9": config(pad_token_id=10 ** 9), "config is a list": raw_config("[1, 2]"),
        "deeply nested config": raw_config("[" * 100_000), "tie_word_embeddings true": config(tie_word_embeddings=True),
        "extra *.safetensors file": extra_file, "rms_norm_eps -1": config(rms_norm_eps=-1.0),
        "rms_norm_eps NaN": raw_config_nan(pruned),
        "NaN weight": weights(first_weight(lambda t: t.fill_(float("nan")))),
        "int64 weight": weights(first_weight(lambda t: t.long())),
    }
    return {name: case(name, edit) for name, edit in cases.items()}


def raw_config_nan(pruned: Path) -> Callable[[Path], None]:
    data = json.loads((pruned / "config.json").read_text())
    data["rms_norm_eps"] = "NaN_PLACEHOLDER"
    text = json.dumps(data).replace('"NaN_PLACEHOLDER"', "NaN")
    return lambda directory: (directory / "config.json").write_text(text)


# ---------------------------------------------------------------------------------------- classification head
def head_cases(tmp: Path) -> dict[str, Callable[[], tuple[str, str]]]:
    import torch
    sys.path.insert(0, str(ROOT))
    from tests.test_cli_bad_input import _huge_empty_head, head_adapter

    def adapter(name: str, head: Any, peft: bool) -> Path:
        """The tests' classification adapter (`head_adapter`), then this case's damage to its weights file."""
        (tmp / f"head-{name}-{peft}").mkdir(parents=True)
        directory = head_adapter(tmp / f"head-{name}-{peft}", head, peft)
        weights = directory / "adapter_model.safetensors"
        if name == "fifo":
            os.mkfifo(weights)
        elif name == "billion-by-zero":
            _huge_empty_head(weights)
        elif name == "truncated":
            weights.write_bytes(weights.read_bytes()[:-9])
        return directory

    cases = {}
    heads = {"billion-by-zero": torch.zeros(2, 8), "fifo": None, "0-dim": torch.tensor(1.0),
             "truncated": torch.zeros(2, 8), "missing": None, "int64": torch.zeros(2, 8, dtype=torch.int64)}
    for name, head in heads.items():
        for peft in (False, True):
            directory = adapter(name, head, peft)
            fmt = "PEFT" if peft else "lorakit"
            cases[f"export, {fmt}: head {name}"] = cli(["export", str(directory), "--out", str(directory.parent / "o")])
            cases[f"eval, {fmt}: head {name}"] = cli(["eval", str(directory)])
    return cases


# ------------------------------------------------------------------------------------------------ loading cost
def loading_cases(tmp: Path) -> dict[str, Callable[[], tuple[str, str]]]:
    sys.path.insert(0, str(ROOT))
    import lorakit
    from tests.tiny_models import KINDS

    kind = KINDS["llama"]
    keys = {f"layers\\.{i}\\.never_proj": 2 for i in range(2000)}
    keys.update({f"model.layers.{i}.self_attn.x_proj": 2 for i in range(18000)})
    model = lorakit.attach(kind.build(0), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             rank_pattern=keys))
    lorakit.save(model, tmp / "patterns")
    plain = lorakit.attach(kind.build(0), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lorakit.save(plain, tmp / "huge")
    weights = tmp / "huge" / "adapter_model.safetensors"
    raw = weights.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    header["model.layers.0.self_attn.q_proj.extra"] = {"dtype": "F32", "shape": [(6 << 30) // 4],
                                                       "data_offsets": [len(data), len(data) + (6 << 30)]}
    text = json.dumps(header).encode()
    with open(weights, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate(8 + len(text) + len(data) + (6 << 30))
    from lorakit.io.peft_export import export_peft
    export_peft(plain, tmp / "peft-null-alpha")
    config = json.loads((tmp / "peft-null-alpha" / "adapter_config.json").read_text())
    config["lora_alpha"] = None
    (tmp / "peft-null-alpha" / "adapter_config.json").write_text(json.dumps(config))

    def load(directory: Path, expect: str, limit_s: float | None = None) -> Callable[[], tuple[str, str]]:
        def run() -> tuple[str, str]:
            from lorakit.errors import LorakitError
            start = time.monotonic()
            try:
                lorakit.load(kind.build(0), directory)
            except LorakitError as err:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
                return ("clean" if expect == "refusal" else "wrong"), f"{str(err)[:150]} (peak RSS {peak} MiB)"
            seconds = time.monotonic() - start
            if expect == "refusal":
                return "silent", "loaded"
            if limit_s is not None and seconds > limit_s:
                return "hang", f"loaded in {seconds:.1f} s (> {limit_s:g} s)"
            return "correct", f"loaded in {seconds:.1f} s"
        return run

    return {"20k rank_pattern keys (2k regexes) load within 30 s": load(tmp / "patterns", "success", 30.0),
            "6 GiB extra tensor (sparse) refused": load(tmp / "huge", "refusal"),
            "PEFT lora_alpha null refused": load(tmp / "peft-null-alpha", "refusal")}


# ------------------------------------------------------------------------------------------------------ report
def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None,
                        help="rerun the surfaces whose names contain one of these words; keep the others' results")
    args = parser.parse_args()
    began = time.monotonic()
    results: dict[str, dict[str, tuple[str, str]]] = {}
    if args.only:
        kept = json.loads((RESULTS / "reliability-surfaces.json").read_text())
        results = {k: {c: tuple(v) for c, v in cases.items()} for k, cases in kept["results"].items()}
        began -= kept["seconds"]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = rc.tiny_model(tmp / "tiny")
        import lorakit.cli
        import lorakit.fed.server
        import lorakit.train.run  # noqa: F401  (imported once, before forking)
        trained = rc.run_cli(["train", "--model", str(model), "--task", "arith", "--steps", "2", "--batch-size", "2",
                              "--eval-limit", "2", "--max-new-tokens", "2", "--method", "lora", "-o", "r=2",
                              "--output-dir", str(tmp / "trained")])
        assert trained.returncode == 0, trained.stderr[-2000:]
        surfaces = {
            "federated client metrics": fed_cases,
            "classification head (export/eval)": lambda: head_cases(tmp / "hd"),
            "loading cost": lambda: loading_cases(tmp / "lc"),
            "pruned model directories": lambda: pruned_cases(tmp / "pr", model),
            "training checkpoints (train --resume)": lambda: checkpoint_cases(tmp / "ck", model),
            "output directories": lambda: output_cases(tmp / "out", model, tmp / "trained" / "adapter"),
        }
        for surface, build in surfaces.items():
            if args.only and not any(word in surface for word in args.only):
                continue
            for sub in ("ck", "out", "pr", "hd", "lc"):
                (tmp / sub).mkdir(exist_ok=True)
            results[surface] = {}
            try:
                built = build()
            except Exception as err:  # a setup failure is reported, and the other surfaces still run
                results[surface]["(setup)"] = ("wrong", f"setup failed: {type(err).__name__}: {str(err)[-200:]}")
                continue
            for case, fn in built.items():
                verdict, detail = fn() if case == "two train runs on one --output-dir" else forked(fn)
                detail = detail.replace(name, "TMP")
                results[surface][case] = (verdict, detail)
                print(f"{verdict:>8}  {surface} / {case}: {detail}", flush=True)
            write_report(results, time.monotonic() - began)  # partial results survive a later failure
    write_report(results, time.monotonic() - began)


def write_report(results: dict[str, dict[str, tuple[str, str]]], seconds: float) -> None:
    import torch
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability-surfaces.json").write_text(json.dumps(
        {"seconds": round(seconds), "machine": f"{platform.machine()}, Python {platform.python_version()}, torch "
         f"{torch.__version__}", "results": results}, indent=1) + "\n")
    lines = ["# Reliability, round 3: issue 23's surfaces", "",
             "Measured by `OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks:. python benchmarks/reliability_surfaces.py` "
             f"({seconds / 60:.1f} min on the shared 2-core machine); verdicts as in the script's docstring.", "",
             "| surface | tried | " + " | ".join(VERDICTS) + " |", "|---|---|" + "---|" * len(VERDICTS)]
    for surface, cases in results.items():
        counts = [sum(1 for v, _ in cases.values() if v == verdict) for verdict in VERDICTS]
        lines.append(f"| {surface} | {len(cases)} | " + " | ".join(map(str, counts)) + " |")
    for surface, cases in results.items():
        lines += ["", f"## {surface}", "", "| case | verdict | detail |", "| --- | --- | --- |"]
        lines += [f"| {case} | {v} | {d.replace('|', '/')} |" for case, (v, d) in cases.items()]
    (RESULTS / "reliability-surfaces.md").write_text("\n".join(lines) + "\n")
    print(f"written {RESULTS / 'reliability-surfaces.md'}")


if __name__ == "__main__":
    main()
