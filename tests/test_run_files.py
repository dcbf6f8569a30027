"""Issue 23: checkpoints that cannot lie, one run per output directory, and writes that never follow a planted
symlink, block on a FIFO or leave a loadable mix of old and new files.

The CLI runs in-process (`lorakit.cli.main`: its one-line error and exit code) on the tiny Llama of `test_cli`;
the cases a checkpoint's tensors decide run the trainer directly on the tiny Llama of `tiny_models`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.cli import main
from lorakit.core import files
from lorakit.core.checkpoint import MANIFEST, write_manifest
from lorakit.errors import LorakitError, OutputError
from lorakit.train.trainer import TrainConfig, train
from tests import test_cli
from tests.test_cli import train_args
from tests.test_trainer import lm_features
from tests.tiny_models import KINDS

tiny_lm = test_cli.tiny_lm  # the random 2-layer Llama directory (a module fixture)
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"
CLI_RUN = ("--method", "adalora", "-o", "r=2", "--steps", "4", "--save-every", "2")


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (a FIFO read or a skip loop that never ends)."""
    def fire(*_: Any) -> None:
        raise TimeoutError(f"hung for {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args: str) -> tuple[int, str]:
    """``lorakit ARGS`` in this process: exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), alarm(120):
        code = main(list(args))
    return code, err.getvalue()


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` by content (the lock file aside): 'the run directory stays untouched'."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != files.LOCK_NAME}


def tamper(checkpoint: Path, meta: Callable[[dict], Any] | None = None,
           tensors: Callable[[dict], Any] | None = None) -> None:
    """Edit a checkpoint's JSON and/or tensors and re-sign its manifest, as a careful forger would: what is left to
    catch the edit is the schema and consistency checks."""
    if meta is not None:
        data = json.loads((checkpoint / STATE_JSON).read_text())
        meta(data)
        (checkpoint / STATE_JSON).write_text(json.dumps(data))
    if tensors is not None:
        data = load_file(str(checkpoint / STATE_TENSORS))
        tensors(data)
        save_file(data, str(checkpoint / STATE_TENSORS))
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)


@pytest.fixture(scope="module")
def trained(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI AdaLoRA run with checkpoints, into a directory with symlinks planted where run.json and log.jsonl go
    (they must be replaced, not written through), under umask 022."""
    out = tmp_path_factory.mktemp("trained") / "run"
    out.mkdir()
    victim = out.parent / "victim.txt"
    victim.write_text("precious")
    for name in ("run.json", "log.jsonl"):
        (out / name).symlink_to(victim)
    mask = os.umask(0o022)
    try:
        code, err = cli(*train_args(tiny_lm, out, *CLI_RUN))
    finally:
        os.umask(mask)
    assert code == 0, err
    return out


def test_planted_symlinks_are_replaced_and_files_get_the_umask_mode(trained: Path) -> None:
    assert (trained.parent / "victim.txt").read_text() == "precious"
    for name in ("run.json", "log.jsonl"):
        assert not (trained / name).is_symlink() and (trained / name).is_file()
    assert json.loads((trained / "run.json").read_text())["train"]["steps"] == 4
    written = [*(trained / "adapter").iterdir(), *(trained / "checkpoint").iterdir(), trained / "run.json"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {"0o644"}  # not mkstemp's 0600


@pytest.fixture()
def run_copy(trained: Path, tmp_path: Path) -> Path:
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(meta: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            meta = meta[int(key)] if key.isdigit() else meta[key]
        meta[last] = value
    return edit


# A reproducer of issue 23 per row: (the JSON edit, the key the error must name).
JSON_CASES = {
    "progress.step behind step": (_set("progress.step", 3), "progress.step"),
    "negative step": (_set("step", -1), "step"),
    "fractional step": (_set("step", 2.5), "step"),
    "batches_drawn 1e18 (endless skip loop)": (_set("batches_drawn", 10**18), "batches_drawn"),
    "batches_drawn -1": (_set("batches_drawn", -1), "batches_drawn"),
    "batches_drawn 'x'": (_set("batches_drawn", "x"), "batches_drawn"),
    "batches_drawn 2.5": (_set("batches_drawn", 2.5), "batches_drawn"),
    "7 losses for 4 steps": (_set("progress.losses", [1.0] * 7), "progress.losses"),
    "NaN loss": (_set("progress.losses", [1.0, 1.0, float("nan"), 1.0]), "progress.losses"),
    "wrong progress type": (_set("progress.real_tokens", "many"), "progress.real_tokens"),
    "unknown config key": (_set("config.bogus", 1), "config.bogus"),
    "bad trainable list": (_set("trainable", [1, 2]), "trainable"),
    "hooks not an object": (_set("hooks", []), "hooks"),
    "optimizer not an object": (_set("optimizer", "adam"), "optimizer"),
    "wrong version": (_set("version", 99), "version"),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_cli_resume_refuses_a_checkpoint_that_lies(tiny_lm: Path, run_copy: Path, case: str) -> None:
    """Each edit is one clear error (exit 2) naming the file and the key, before the model is built; nothing in the
    run directory changes."""
    edit, key = JSON_CASES[case]
    tamper(run_copy / "checkpoint", meta=edit)
    before = snapshot(run_copy)
    code, err = cli(*train_args(tiny_lm, run_copy, *CLI_RUN, "--resume"))
    message = err.strip().splitlines()[-1]
    assert code == 2 and message.startswith("lorakit: error:"), err
    assert STATE_JSON in message and key in message, message
    assert snapshot(run_copy) == before


MANIFEST_CASES: dict[str, Callable[[Path], None]] = {
    "a byte flipped": lambda c: (c / STATE_TENSORS).write_bytes(
        (c / STATE_TENSORS).read_bytes()[:-1] + bytes([(c / STATE_TENSORS).read_bytes()[-1] ^ 1])),
    "torn copy (truncated)": lambda c: (c / STATE_TENSORS).write_bytes((c / STATE_TENSORS).read_bytes()[:100]),
    "edited JSON, manifest not updated": lambda c: (c / STATE_JSON).write_text(
        (c / STATE_JSON).read_text().replace('"step": 4', '"step": 3', 1)),
    "manifest missing": lambda c: (c / MANIFEST).unlink(),
    "an extra file": lambda c: (c / "extra.safetensors").write_bytes(b"x"),
    "a FIFO in place of the tensors": lambda c: ((c / STATE_TENSORS).unlink(), os.mkfifo(c / STATE_TENSORS)),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_cli_resume_detects_tampering_torn_copies_and_fifos(tiny_lm: Path, run_copy: Path, case: str) -> None:
    checkpoint = run_copy / "checkpoint"
    MANIFEST_CASES[case](checkpoint)
    before = snapshot(run_copy)
    code, err = cli(*train_args(tiny_lm, run_copy, *CLI_RUN, "--resume"))
    message = err.strip().splitlines()[-1]
    assert code == 2 and str(checkpoint) in message, err
    assert snapshot(run_copy) == before


def test_cli_symlinked_checkpoint_and_a_second_run_get_the_right_message(tiny_lm: Path, run_copy: Path,
                                                                         tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (run_copy / "checkpoint").rename(elsewhere)
    (run_copy / "checkpoint").symlink_to(elsewhere)
    code, err = cli(*train_args(tiny_lm, run_copy, *CLI_RUN, "--resume"))
    assert code == 2 and "is a symlink" in err and "disk" not in err, err
    with pytest.raises(OutputError, match="checkpoint is a symlink"):  # a fresh run: refused before its first step
        train(lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2)), lm_features(4),
              TrainConfig(steps=1, batch_size=4, save_every=1, output_dir=str(run_copy), progress=False))

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_copy / files.LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code, err = cli(*train_args(tiny_lm, run_copy, "--save-every", "0"))
        assert code == 2 and str(run_copy) in err and f"pid {holder.pid}" in err and "disk" not in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with files.locked_dir(run_copy):  # the kernel dropped the killed holder's lock
        pass


# Another process holding an output directory's lock the way `lorakit.core.files.locked_dir` does.
HOLD_LOCK = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()}\\n'.encode())\nprint('locked', flush=True)\n"
             "time.sleep(120)\n")


def test_one_run_per_output_directory_in_process_and_for_fed(tmp_path: Path) -> None:
    """A second holder (another thread: `run_training`, sweep trials and `train` share `locked_dir`) is refused at
    once with the directory and the pid; the lock is re-entrant in its thread and released on any exit."""
    from lorakit.fed.config import FedConfig
    from lorakit.fed.runner import output_lock

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with files.locked_dir(tmp_path):
            held.set()
            release.wait(30)
    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(30)
    try:
        with pytest.raises(OutputError, match=f"{tmp_path}.*in use by another lorakit run \\(pid {os.getpid()}\\)"):
            with files.locked_dir(tmp_path):
                pass
        with pytest.raises(OutputError, match="in use"):
            with output_lock(FedConfig(output_dir=str(tmp_path))):
                pass
        with pytest.raises(OutputError, match="in use"):
            train(lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2)), lm_features(4),
                  TrainConfig(steps=1, batch_size=4, output_dir=str(tmp_path), progress=False))
    finally:
        release.set()
        thread.join()
    with pytest.raises(RuntimeError), files.locked_dir(tmp_path), files.locked_dir(tmp_path):  # re-entrant
        raise RuntimeError
    with files.locked_dir(tmp_path):  # released after the error
        pass


def test_fed_and_hf_checkpoints_refuse_a_fifo_instead_of_hanging(tmp_path: Path) -> None:
    from lorakit.fed import checkpoint as fed_checkpoint
    from lorakit.fed.config import FedConfig
    from lorakit.integrations import hf

    server = tmp_path / fed_checkpoint.DIRNAME
    server.mkdir()
    (server / fed_checkpoint.META).write_text("{}")
    os.mkfifo(server / fed_checkpoint.TENSORS)
    (tmp_path / hf.WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / hf.STATE_JSON).write_text("{}")
    os.mkfifo(tmp_path / hf.STATE_TENSORS)
    with alarm(30):
        with pytest.raises(LorakitError, match="is a FIFO"):
            fed_checkpoint.load(tmp_path, FedConfig(output_dir=str(tmp_path)))
        with pytest.raises(LorakitError, match="is a FIFO"):
            hf.load_checkpoint_hooks(torch.nn.Linear(1, 1), tmp_path)


# ---------------------------------------------------------------------------------------------- tensor-level state

@pytest.fixture(scope="module")
def adalora_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AdaLoRA run stopped at step 2 of 4 (its importance EMAs are live), with a checkpoint there."""
    out = tmp_path_factory.mktemp("adalora")
    train(adalora_model(), lm_features(8), TrainConfig(**TRAIN, output_dir=str(out), stop_after=2))
    return out


TRAIN = dict(steps=4, batch_size=4, lr=1e-3, save_every=2, progress=False)


def adalora_model() -> torch.nn.Module:
    return lorakit.attach(KINDS["llama"].build(0), lorakit.AdaLoraConfig(r=2, target_r=1, tinit=0, tfinal=1))


def _hooks(attr: str, value: Any) -> Callable[[dict], None]:
    return _set(f"hooks.{attr}", value)


def _tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        key = next(k for k in tensors if k.startswith(name))
        tensors[key] = change(tensors[key])
    return edit


# (JSON edit, tensor edit, the key the error must name)
STATE_CASES: dict[str, tuple[Any, Any, str]] = {
    "negative base_lr": (_set("optimizer.param_groups.0.base_lr", -1e-3), None, "base_lr"),
    "eps 0": (_set("optimizer.param_groups.0.eps", 0.0), None, "eps"),
    "weight_decay 1e3": (_set("optimizer.param_groups.0.weight_decay", 1e3), None, "weight_decay"),
    "Adam step 0": (None, _tensor("optimizer.0.step", lambda t: t * 0), "optimizer.0.step"),
    "Adam step 1e9": (None, _tensor("optimizer.0.step", lambda t: t * 0 + 1e9), "optimizer.0.step"),
    "Adam step -1": (None, _tensor("optimizer.0.step", lambda t: t * 0 - 1), "optimizer.0.step"),
    "exp_avg int64": (None, _tensor("optimizer.0.exp_avg", lambda t: t.long()), "optimizer.0.exp_avg"),
    "exp_avg bf16": (None, _tensor("optimizer.0.exp_avg", lambda t: t.bfloat16()), "optimizer.0.exp_avg"),
    "exp_avg wrong shape": (None, _tensor("optimizer.0.exp_avg", lambda t: t.flatten()[:3].clone()),
                            "optimizer.0.exp_avg"),
    "RNG missing": (None, lambda t: t.pop("rng.cpu.0"), "rng.cpu.0"),
    "RNG short": (None, _tensor("rng.cpu.0", lambda t: t[:10].clone()), "rng.cpu.0"),
    "RNG garbage": (None, _tensor("rng.cpu.0", lambda t: t.float()), "rng.cpu.0"),
    "hook ema NaN": (None, _tensor("hooks.ema/", lambda t: t * float("nan")), "ema"),
    "hook ema x unc overflows": (None, lambda t: t.update({k: v * 0 + 1e30 for k, v in t.items()
                                                           if k.startswith("hooks.")}), "ema"),
    "hook tinit -100": (_hooks("tinit", -100), None, "tinit"),
    "hook delta_t 0": (_hooks("delta_t", 0), None, "delta_t"),
    "hook budget a string": (_hooks("budget", "all"), None, "budget"),
    "undeclared hook attribute": (_hooks("before_forward", 1), None, "before_forward"),
}


@pytest.mark.parametrize("case", STATE_CASES)
def test_resume_checks_optimizer_rng_and_hook_state_before_restoring(adalora_checkpoint: Path, tmp_path: Path,
                                                                      case: str) -> None:
    import shutil
    out = tmp_path / "run"
    shutil.copytree(adalora_checkpoint, out)
    meta_edit, tensor_edit, key = STATE_CASES[case]
    tamper(out / "checkpoint", meta=meta_edit, tensors=tensor_edit)
    model = adalora_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(LorakitError, match=key) as caught, alarm(60):
        train(model, lm_features(8), TrainConfig(**TRAIN, output_dir=str(out), resume=True))
    assert "checkpoint" in str(caught.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is as it was
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_cli_resume_refuses_bad_optimizer_and_hook_state(tiny_lm: Path, run_copy: Path) -> None:
    """Two of the cases above as a user meets them: one line, exit 2, nothing written."""
    for edit, key in ((_set("optimizer.param_groups.0.eps", 0.0), "eps"), (_hooks("delta_t", 0), "delta_t")):
        tamper(run_copy / "checkpoint", meta=edit)
        before = snapshot(run_copy)
        code, err = cli(*train_args(tiny_lm, run_copy, *CLI_RUN, "--resume"))
        message = err.strip().splitlines()[-1]
        assert code == 2 and key in message and STATE_JSON in message, err
        assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------- writers

def test_cli_export_and_merge_replace_planted_symlinks(tiny_lm: Path, trained: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    for command, name in (("export", "adapter_config.json"), ("merge", "config.json")):
        out = tmp_path / command
        out.mkdir()
        (out / name).symlink_to(victim)
        code, err = cli(command, str(trained / "adapter"), "--out", str(out))
        assert code == 0, err
        assert victim.read_text() == "precious" and not (out / name).is_symlink()
        assert json.loads((out / name).read_text())


@pytest.mark.parametrize(("name", "blocker"), [("log.jsonl", "fifo"), ("run.json", "fifo"), ("run.json", "directory")])
def test_cli_train_refuses_a_blocked_result_file_before_training(tiny_lm: Path, tmp_path: Path, name: str,
                                                                 blocker: str) -> None:
    """A FIFO or directory where ``log.jsonl`` or ``run.json`` goes: exit 2 before any step (no adapter saved)."""
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / name) if blocker == "fifo" else (out / name).mkdir()
    code, err = cli(*train_args(tiny_lm, out, "--method", "lora", "--save-every", "0"))
    kind = "a FIFO" if blocker == "fifo" else "a directory"
    assert code == 2 and f"{out / name}: it is {kind}" in err, err
    assert not (out / "adapter").exists()


@pytest.mark.parametrize("blocker", ["fifo", "directory"])
def test_cli_export_refuses_a_fifo_or_directory_in_place_of_an_output_file(tiny_lm: Path, trained: Path,
                                                                           tmp_path: Path, blocker: str) -> None:
    out = tmp_path / "export"
    out.mkdir()
    target = out / "adapter_config.json"
    os.mkfifo(target) if blocker == "fifo" else target.mkdir()
    code, err = cli("export", str(trained / "adapter"), "--out", str(out))
    assert code == 2 and str(target) in err and ("FIFO" if blocker == "fifo" else "directory") in err, err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json"]  # nothing else written


def test_write_files_never_leaves_a_loadable_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that fails leaves the old pair; a crash between the moves leaves no config (so nothing loads),
    never new weights beside the old config."""
    def pair(weights: str, config: str) -> Callable[[Path], None]:
        def write(tmp: Path) -> None:
            (tmp / "weights").write_text(weights)
            (tmp / "config").write_text(config)
        return write

    files.write_files(tmp_path / "out", pair("old", "old"), last="config")
    with pytest.raises(ZeroDivisionError):
        files.write_files(tmp_path / "out", lambda tmp: ((tmp / "weights").write_text("new"), 1 / 0), last="config")
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {"weights": "old", "config": "old"}
    real_replace, calls = os.replace, []

    def crash_on_second(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two files
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        files.write_files(tmp_path / "out", pair("new", "new"), last="config")
    assert {p.name: p.read_text() for p in (tmp_path / "out").iterdir()} == {"weights": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


@pytest.mark.parametrize("errno_name", ["EACCES", "EROFS", "ENOSPC"])
def test_atomic_write_failures_are_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   errno_name: str) -> None:
    """Read-only or full targets (simulated: the tests may run as root, who may write anywhere)."""
    import errno as errno_module
    code = getattr(errno_module, errno_name)

    def refuse(*_: Any, **__: Any) -> Any:
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="not writable" if code != errno_module.ENOSPC else "free disk space"):
        files.write_text(tmp_path / "run.json", "{}")
    assert not (tmp_path / "run.json").exists()


def test_save_gives_files_the_umask_mode(tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    mask = os.umask(0o002)
    try:
        lorakit.save(model, tmp_path / "a")
        lorakit.save(model, tmp_path / "a")  # into an existing directory too
    finally:
        os.umask(mask)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "a").iterdir()} == {"0o664"}
    assert oct(stat.S_IMODE((tmp_path / "a").stat().st_mode)) == "0o775"
