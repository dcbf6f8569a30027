"""The `lorakit` command under bad input, kill -9 and a full disk; writes ``results/reliability-cli.md``.

    OMP_NUM_THREADS=1 python benchmarks/reliability_cli.py            # a few minutes on 2 cores

1. Bad input: every case of issue 15 and more (flags, recipes, data files, adapters, checkpoints).  Each case is
   the real CLI entry point (`lorakit.cli.main`, exactly what ``python -m lorakit.cli`` runs) in its own process,
   forked from one process that imported lorakit once (so that 60 cases do not pay 60 imports), with a memory
   cap; a few cases also run as real ``python -m lorakit.cli`` subprocesses.  A case is *clean* when it exits 2
   with a last stderr line ``lorakit: error: ...`` and no traceback.
2. Kill -9: a tiny-model ``lorakit train`` (real subprocess) is killed at a random moment, then resumed with
   ``--resume`` (half the time after tearing the last line of log.jsonl); the final adapter is compared byte for
   byte with an uninterrupted run's.
3. Disk full: the same run under a 20 KB file-size limit (``RLIMIT_FSIZE``): a one-line error, no traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def tiny_model(out: Path) -> Path:
    """A random 2-layer Llama with MiniLM's WordPiece tokenizer (as tests/test_cli.py builds it)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.models import minilm_dir
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- bad input


def bad_inputs(tmp: Path, model: Path, adapter: Path) -> dict[str, list[str]]:
    """Case name -> argv (files the case needs are written into ``tmp``)."""
    def write(name: str, text: str) -> str:
        (tmp / name).write_text(text)
        return str(tmp / name)

    def recipe(text: str) -> list[str]:
        return ["--config", write(f"recipe-{abs(hash(text))}.yaml", text)]

    out = str(tmp / "run")
    train = ["train", "--model", str(model), "--task", "arith", "--steps", "2", "--batch-size", "2", "--eval-limit",
             "2", "--max-new-tokens", "2", "--method", "lora", "--output-dir", out]
    cases: dict[str, list[str]] = {}
    for key, value in [("steps", "abc"), ("steps", "0"), ("steps", "2.5"), ("steps", "true"), ("lr", "fast"),
                       ("lr", ".nan"), ("lr", "-.inf"), ("lr", "0"), ("seed", "x"), ("seed", "-1"),
                       ("seed", str(2**70)), ("task", "5"), ("task", "[a]"), ("output_dir", "5"),
                       ("method_options", "r=2"), ("method_options", "[1, 2]"), ("method_options", "{r: abc}"),
                       ("method_options", "{alpha: .inf}"), ("metric", "bleu"), ("schedule", "step"),
                       ("dtype", "fp8"), ("batch_size", "-4"), ("max_length", "1"), ("eval_limit", "0"),
                       ("warmup_steps", "-1"), ("weight_decay", ".nan"), ("max_grad_norm", "0"),
                       ("bogus_key", "1"), ("method", "nope"), ("model", "7")]:
        flags = [a for a in train if a not in ("--method", "lora")] if key == "method" else train  # flags win
        cases[f"recipe {key}: {value}"] = [*flags, *recipe(f"{key}: {value}\n")]
    cases["recipe is a list"] = [*train, *recipe("- a\n- b\n")]
    cases["recipe is not YAML"] = [*train, *recipe("a: [1,\n")]
    cases["recipe missing"] = [*train, "--config", str(tmp / "missing.yaml")]
    for flag, value in [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--weight-decay", "nan"),
                        ("--max-grad-norm", "nan"), ("--max-grad-norm", "-1"), ("--max-new-tokens", "0"),
                        ("--seed", "2**70"), ("--seed", str(2**70)), ("--steps", "abc"), ("--steps", "-3"),
                        ("--batch-size", "0"), ("--grad-accum", "0"), ("--eval-every", "-1"),
                        ("--save-every", "-2"), ("--init-samples", "0"), ("--max-length", "0"),
                        ("--metric", "bleu"), ("--eval-limit", "-5"), ("--warmup-steps", "-1")]:
        cases[f"{flag} {value}"] = [*train, flag, value]
    for option in ("r=[1,", "seed=x", "alpha=.nan", "alpha=-1", "r=0", "r=2.5", "dropout=2", "bogus=1", "r",
                   "=3", "target_modules=5"):
        cases[f"-o {option}"] = [*train, "-o", option]
    cases["--method full -o r=2"] = [*train, "--method", "full", "-o", "r=2"]
    cases["--method nope"] = [*train, "--method", "nope"]
    cases["--output-dir is a file"] = [*train, "--output-dir", write("taken", "x")]
    cases["--output-dir under a file"] = [*train, "--output-dir", str(tmp / "taken" / "sub")]
    cases["--output-dir not writable"] = [*train, "--output-dir", "/proc/lorakit-run"]
    cases["--metric accuracy on arith"] = [*train, "--metric", "accuracy"]
    big = "1000000000000"
    cases["label 10**12"] = [*train, "--task", write("big.jsonl", f'{{"text": "a", "label": 0}}\n'
                                                                  f'{{"text": "b", "label": {big}}}\n')]
    cases["label 10**12 (csv)"] = [*train, "--task", write("big.csv", f"text,label\na,0\nb,{big}\n")]
    cases["CSV field over 128 KB"] = [*train, "--task", write("wide.csv", 'text,label\n"' + "x" * 140_000 + '",1\n')]
    cases["deeply nested JSON line"] = [*train, "--task", write("deep.jsonl", "[" * 100_000 + "\n")]
    cases["empty .jsonl"] = [*train, "--task", write("empty.jsonl", "")]
    cases["binary .jsonl"] = [*train, "--task", write("bin.jsonl", "\x00\x01\x02" * 100)]
    cases["data file missing"] = [*train, "--task", str(tmp / "none.jsonl")]
    cases["unsupported data file"] = [*train, "--task", write("data.parquet", "x")]
    cases["jsonl without known fields"] = [*train, "--task", write("odd.jsonl", '{"a": 1}\n')]
    checkpoint = tmp / "ckpt-run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"format": "lorakit-tr')
    cases["corrupt checkpoint JSON on --resume"] = [*train, "--output-dir", str(tmp / "ckpt-run"), "--resume"]
    empty_ckpt = tmp / "ckpt-run2" / "checkpoint"
    empty_ckpt.mkdir(parents=True)
    (empty_ckpt / "trainer_state.json").write_text('{"format": "lorakit-trainer", "version": 1}')
    cases["checkpoint JSON missing keys on --resume"] = [*train, "--output-dir", str(tmp / "ckpt-run2"), "--resume"]

    cases["export --out FILE"] = ["export", str(adapter), "--out", write("out-file", "x")]
    cases["merge --out FILE"] = ["merge", str(adapter), "--out", str(tmp / "out-file")]
    cases["eval --metric bleu"] = ["eval", str(adapter), "--metric", "bleu"]
    cases["eval --metric accuracy on arith"] = ["eval", str(adapter), "--metric", "accuracy"]
    cases["eval --eval-limit 0"] = ["eval", str(adapter), "--eval-limit", "0"]
    cases["eval missing adapter"] = ["eval", str(tmp / "no-adapter")]
    cases["eval --rank on LoRA"] = ["eval", str(adapter), "--rank", "1"]
    broken = tmp / "broken-run"
    (broken / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (broken / "adapter" / name).write_bytes((adapter / name).read_bytes())
    (broken / "run.json").write_text('{"config": {"mod')
    cases["corrupt run.json (eval)"] = ["eval", str(broken / "adapter")]
    cases["corrupt run.json (export)"] = ["export", str(broken / "adapter"), "--out", str(tmp / "peft")]
    (tmp / "bad-adapter").mkdir()
    (tmp / "bad-adapter" / "adapter_config.json").write_text("{")
    cases["corrupt adapter_config.json"] = ["eval", str(tmp / "bad-adapter")]
    cases["compare --methods ,"] = ["compare", "--model", str(model), "--methods", ",", "--out", str(tmp / "cmp")]
    cases["compare -o r=abc"] = ["compare", "--model", str(model), "--methods", "lora", "-o", "r=abc", "--out",
                                 str(tmp / "cmp")]
    cases["methods --r 0"] = ["methods", "--r", "0", "--model", str(model)]
    return cases


def run_forked(argv: list[str], timeout: float = 300, memory_gib: int = 8) -> tuple[int, str]:
    """``lorakit.cli.main(argv)`` in a forked child (as ``python -m lorakit.cli`` runs it): exit code, stderr."""
    from lorakit.cli import main  # imported once, in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: cap memory (a 10**12-class head once took the whole machine), run, report
        os.close(read)
        resource.setrlimit(resource.RLIMIT_AS, (memory_gib * 2**30, memory_gib * 2**30))
        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit_:  # argparse usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # what the interpreter would print for an uncaught exception
                traceback.print_exc()
                code = 1
        os.write(write, err.getvalue().encode()[-20_000:])
        os._exit(code)
    os.close(write)
    chunks, start = [], time.monotonic()
    with os.fdopen(read, "rb") as pipe:
        chunks.append(pipe.read())
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def run_cli(argv: list[str], timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout, **kwargs)


def verdict(code: int, stderr: str) -> str:
    """clean: exit 2 and a last line ``lorakit: error: ...`` (or argparse's ``lorakit train: error: ...``)."""
    lines = stderr.strip().splitlines()
    if "Traceback" in stderr:
        return "traceback"
    if code == 2 and lines and lines[-1].startswith("lorakit") and ": error: " in lines[-1]:
        return "clean"
    if code == 0:
        return "accepted"
    return f"exit {code}"


# ---------------------------------------------------------------------------------------------- kill -9


def adapter_content(directory: Path) -> tuple[bytes, dict[str, object], bytes]:
    """adapter_config.json's bytes, the safetensors header (as JSON) and the tensor bytes.  The header is compared
    parsed: safetensors writes its metadata map in a per-process random order (a Rust HashMap)."""
    raw = (directory / "adapter_model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return (directory / "adapter_config.json").read_bytes(), json.loads(raw[8:8 + size]), raw[8 + size:]


def start_training(args: list[str], out: Path) -> tuple[subprocess.Popen, float]:
    """A ``lorakit train`` process and the moment it created ``out`` (imports and validation done)."""
    process = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args, "--output-dir", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    while not out.exists() and process.poll() is None:
        time.sleep(0.01)
    return process, time.monotonic()


def kill_and_resume(model: Path, tmp: Path, kills: int, seed: int) -> list[dict[str, object]]:
    args = ["train", "--model", str(model), "--task", "arith", "--steps", "60", "--batch-size", "4", "--eval-limit",
            "2", "--max-new-tokens", "2", "--method", "lora", "-o", "r=2", "--warmup-steps", "2"]
    reference, started = start_training(args, tmp / "reference")
    assert reference.wait() == 0
    span = time.monotonic() - started  # model load, eval, 60 steps with 10 checkpoints, eval, save
    expected = adapter_content(tmp / "reference" / "adapter")
    rng = random.Random(seed)
    rows = []
    for i in range(kills):
        out = tmp / f"killed-{i}"
        delay = rng.uniform(0, span)
        victim, _ = start_training(args, out)
        time.sleep(delay)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        state = out / "checkpoint" / "trainer_state.json"
        at = json.loads(state.read_text())["step"] if state.is_file() else 0
        finished = (out / "adapter" / "adapter_model.safetensors").is_file()
        torn = i % 2 == 1 and (out / "log.jsonl").is_file()
        if torn:
            with open(out / "log.jsonl", "a") as log:
                log.write('{"type": "train", "st')
        resumed = run_cli([*args, "--output-dir", str(out), "--resume"])
        same = resumed.returncode == 0 and adapter_content(out / "adapter") == expected
        rows.append({"kill": i + 1, "after_s": round(delay, 1), "span_s": round(span, 1),
                     "killed": victim.returncode == -signal.SIGKILL, "checkpoint_step": at,
                     "finished_before_kill": finished, "torn_log": torn,
                     "resume_exit": resumed.returncode, "bit_exact": same,
                     "error": "" if resumed.returncode == 0 else resumed.stderr.strip().splitlines()[-1]})
        print(rows[-1], flush=True)
    return rows


def disk_full(model: Path, tmp: Path) -> dict[str, object]:
    limit = 20_000

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_cli(["train", "--model", str(model), "--task", "arith", "--steps", "8", "--batch-size", "4",
                      "--eval-limit", "2", "--max-new-tokens", "2", "--method", "lora", "-o", "r=2",
                      "--save-every", "2", "--output-dir", str(tmp / "full")], preexec_fn=cap)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    return {"exit": result.returncode, "traceback": "Traceback" in result.stderr,
            "last_line": last.replace(str(tmp), "TMP")}


# ---------------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subprocess-cases", type=int, default=4, help="cases also run as real subprocesses")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = tiny_model(tmp / "tiny")
        import lorakit.cli
        import lorakit.train.run  # noqa: F401  (imported before forking, so that each case starts at once)
        trained = run_cli(["train", "--model", str(model), "--task", "arith", "--steps", "2", "--batch-size", "2",
                           "--eval-limit", "2", "--max-new-tokens", "2", "--method", "lora", "-o", "r=2",
                           "--output-dir", str(tmp / "trained")])
        assert trained.returncode == 0, trained.stderr
        (tmp / "cases").mkdir()
        cases = bad_inputs(tmp / "cases", model, tmp / "trained" / "adapter")
        outcomes: dict[str, tuple[str, str]] = {}
        for case, argv in cases.items():
            code, err = run_forked(argv)
            outcomes[case] = (verdict(code, err), (err.strip().splitlines() or [""])[-1].replace(name, "TMP")[:160])
            print(f"{outcomes[case][0]:>9}  {case}: {outcomes[case][1]}", flush=True)
        real: dict[str, tuple[str, str]] = {}
        for case in list(cases)[:: max(1, len(cases) // args.subprocess_cases)][: args.subprocess_cases]:
            done = run_cli(cases[case])
            real[case] = (verdict(done.returncode, done.stderr), "")
        kills = kill_and_resume(model, tmp / "kills", args.kills, args.seed)
        full = disk_full(model, tmp)
    seconds = time.monotonic() - began
    write_report(outcomes, real, kills, full, seconds)


def write_report(outcomes: dict[str, tuple[str, str]], real: dict[str, tuple[str, str]],
                 kills: list[dict[str, object]], full: dict[str, object], seconds: float) -> None:
    count: Callable[[str], int] = lambda v: sum(1 for o in outcomes.values() if o[0] == v)  # noqa: E731
    exact = sum(1 for k in kills if k["bit_exact"])
    lines = ["# Reliability of the `lorakit` command", "",
             "Measured by `OMP_NUM_THREADS=1 python benchmarks/reliability_cli.py` "
             f"({seconds / 60:.1f} min on the shared 2-core machine).", "",
             "## Bad input", "",
             f"{len(outcomes)} bad inputs tried: **{count('clean')} clean** (exit 2, one `lorakit: error:` line "
             f"naming the flag, key or file), **{count('traceback')} tracebacks**, {count('accepted')} accepted, "
             f"{len(outcomes) - count('clean') - count('traceback') - count('accepted')} other exits.", "",
             "Each case ran `lorakit.cli.main` in a forked process (8 GiB memory cap) from one process that imported "
             "lorakit once; these also ran as real `python -m lorakit.cli` subprocesses: "
             + ", ".join(f"`{c}` ({v[0]})" for c, v in real.items()) + ".", "",
             "| case | outcome | last stderr line |", "| --- | --- | --- |"]
    lines += [f"| {case} | {v} | {line.replace('|', '/')} |" for case, (v, line) in outcomes.items()]
    lines += ["", "## kill -9 and --resume", "",
              f"{len(kills)} kills at random moments of a tiny-model `lorakit train` (60 steps, checkpoint every 6 "
              f"by default) at a uniform random moment after its imports ({kills[0]['span_s'] if kills else 0} s "
              "for the reference run: model load, eval, training, checkpoints, eval, save), each resumed with "
              f"`--resume` (odd kills after tearing the last log line): **{exact} of {len(kills)}** final adapters "
              "identical to the uninterrupted run's: adapter_config.json byte for byte, every tensor byte for byte "
              "(the safetensors data section), the safetensors header equal as JSON (safetensors writes its "
              "metadata map in a random order per process, so whole-file bytes differ between any two processes, "
              "killed or not).", "",
              "| kill | after (s) | last checkpoint step | torn log | resume exit | bit-exact |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {k['kill']} | {k['after_s']} | {k['checkpoint_step']}"
              f"{' (run had finished)' if k['finished_before_kill'] else ''} | {k['torn_log']} | {k['resume_exit']} "
              f"| {k['bit_exact']} |" for k in kills]
    lines += ["", "## Disk full", "",
              f"`lorakit train` under a 20 KB file-size limit (RLIMIT_FSIZE): exit {full['exit']}, traceback: "
              f"{full['traceback']}; last line: `{full['last_line']}`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reliability-cli.md").write_text("\n".join(lines))
    print(f"written {RESULTS / 'reliability-cli.md'}")


if __name__ == "__main__":
    main()
