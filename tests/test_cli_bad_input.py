"""Bad input to `lorakit`: a one-line error naming the flag, key or file, exit code 2, no traceback (but under
``-v``), and nothing loaded first.  In-process (`lorakit.cli.main`) for the many cases, subprocesses for the
exit code and the traceback as a user sees them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit.models
import lorakit.train.run
from lorakit.cli import main
from lorakit.core.checkpoint import write_manifest
from tests import test_cli
from tests.test_cli import train_args

tiny_lm = test_cli.tiny_lm  # the random 2-layer Llama directory (a module fixture)


def recipe(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "recipe.yaml").write_text(text)
        return ["--config", str(tmp / "recipe.yaml")]
    return make


def data_file(name: str, text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / name).write_text(text)
        return ["--task", str(tmp / name)]
    return make


def flags(*args: str) -> Callable[[Path], list[str]]:
    return lambda tmp: list(args)


def checkpoint(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "run" / "checkpoint").mkdir(parents=True)
        (tmp / "run" / "checkpoint" / "trainer_state.json").write_text(text)
        write_manifest(tmp / "run" / "checkpoint")  # signed: the content itself must be refused
        return ["--resume"]
    return make


def output_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("a file")
    return ["--output-dir", str(tmp / "taken")]


# case: (extra `lorakit train` arguments, made in tmp_path; what the error line must say)
TRAIN_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "recipe steps: abc": (recipe("steps: abc\n"), "recipe.yaml: steps must be a positive integer, got 'abc'"),
    "recipe lr: fast": (recipe("lr: fast\n"), "lr must be a positive finite number, got 'fast'"),
    "recipe seed: x": (recipe("seed: x\n"), "seed must be an integer in [0, 4294967295], got 'x'"),
    "recipe task: 5": (recipe("task: 5\n"), "recipe.yaml: task must be a task name or a .jsonl/.csv path, got 5"),
    "recipe output_dir: 5": (recipe("output_dir: 5\n"), "output_dir must be a directory path, got 5"),
    "recipe method_options string": (recipe("method_options: r=2\n"), "method_options must be an object"),
    "recipe method_options list": (recipe("method_options: [1, 2]\n"), "method_options must be an object"),
    "recipe metric: bleu": (recipe("metric: bleu\n"), "metric must be one of exact_match, accuracy, nll, got 'bleu'"),
    "recipe steps: 0": (recipe("steps: 0\n"), "steps must be a positive integer, got 0"),
    "recipe alpha nan": (recipe("method_options: {alpha: .nan}\n"), "method option alpha must be a finite number"),
    "--lr nan": (flags("--lr", "nan"), "--lr must be a positive finite number, got nan"),
    "--lr inf": (flags("--lr", "inf"), "--lr must be a positive finite number, got inf"),
    "--lr -1": (flags("--lr", "-1"), "--lr must be a positive finite number, got -1.0"),
    "--weight-decay nan": (flags("--weight-decay", "nan"), "--weight-decay must be a finite number >= 0, got nan"),
    "--max-grad-norm nan": (flags("--max-grad-norm", "nan"), "--max-grad-norm must be a positive finite number"),
    "--max-new-tokens 0": (flags("--max-new-tokens", "0"), "--max-new-tokens must be a positive integer, got 0"),
    "--seed 2**70": (flags("--seed", str(2**70)), f"--seed must be an integer in [0, 4294967295], got {2**70}"),
    "--save-every -1": (flags("--save-every", "-1"), "--save-every must be an integer >= 0"),
    "-o r=[1,": (flags("-o", "r=[1,"), "method option -o 'r=[1,': the value must be a YAML value"),
    "-o seed=x": (flags("-o", "seed=x"), "method option seed must be an integer, got 'x'"),
    "-o alpha=.nan": (flags("-o", "alpha=.nan"), "method option alpha must be a finite number, got nan"),
    "-o r=0": (flags("-o", "r=0"), "r must be a positive integer, got 0"),
    "--method full -o r=2": (flags("--method", "full", "-o", "r=2"), "--method full trains every weight and takes "
                                                                     "no method options; got r"),
    "--output-dir is a file": (output_file, "taken is a file; expected a directory"),
    "--output-dir not writable": (flags("--output-dir", "/proc/lorakit-run"), "/proc/lorakit-run is not a writable "
                                                                              "directory"),
    "--metric accuracy on a generation task": (flags("--metric", "accuracy"), "metric 'accuracy' does not fit task "
                                                                              "arith (causal-lm)"),
    "label 10**12": (data_file("big.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1000000000000}\n'),
                     "big.jsonl line 2: label 1000000000000 is out of range"),
    "CSV field over 128 KB": (data_file("big.csv", 'text,label\n"' + "x" * 140_000 + '",1\n'),
                              "big.csv: the row after line 1 is not valid CSV (field larger than field limit"),
    "deeply nested JSON line": (data_file("deep.jsonl", "[" * 100_000 + "\n"), "deep.jsonl: no row has the fields"),
    "corrupt checkpoint JSON on --resume": (checkpoint('{"format": "lorakit-tr'), "checkpoint/trainer_state.json "
                                                                                  "is corrupt (JSONDecodeError"),
    "checkpoint JSON without its keys": (checkpoint('{"format": "lorakit-trainer", "version": 2}'),
                                         "trainer_state.json: step must be present"),
}


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model is a test failure: every bad input must be caught before."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the input was validated")
    monkeypatch.setattr(lorakit.train.run, "load_model", refuse)
    monkeypatch.setattr(lorakit.models, "load_model", refuse)


def error_line(capsys: pytest.CaptureFixture[str], code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_rejects_bad_input_before_loading(case: str, tiny_lm: Path, tmp_path: Path, no_model: None,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    make, message = TRAIN_CASES[case]
    line = error_line(capsys, main(train_args(tiny_lm, tmp_path / "run", *make(tmp_path))))
    assert line.startswith("lorakit: error: ") and message in line, line


def fake_run(tmp: Path, run_json: str) -> Path:
    """An adapter directory beside a ``run.json`` (no model needed: the errors come first)."""
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    (tmp / "run.json").write_text(run_json)
    return tmp / "adapter"


def test_adapter_commands_reject_bad_input_before_loading(tmp_path: Path, no_model: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    adapter = fake_run(tmp_path, json.dumps({"config": {"model": "x", "task": "arith"}}))
    (tmp_path / "file").write_text("taken")
    for command in ("export", "merge"):  # merge once printed "merged model written" and wrote nothing
        line = error_line(capsys, main([command, str(adapter), "--out", str(tmp_path / "file")]))
        assert f"--out {tmp_path / 'file'} is a file; expected a directory" in line
    line = error_line(capsys, main(["eval", str(adapter), "--metric", "accuracy"]))
    assert "metric 'accuracy' does not fit task arith" in line
    line = error_line(capsys, main(["eval", str(adapter), "--eval-limit", "0"]))
    assert "--eval-limit must be a positive integer, got 0" in line
    (tmp_path / "run.json").write_text('{"config": {"mod')
    line = error_line(capsys, main(["eval", str(adapter)]))
    assert "run.json is corrupt (JSONDecodeError" in line
    (tmp_path / "run.json").write_text('{"config": {"steps": "x"}}')
    line = error_line(capsys, main(["eval", str(adapter)]))
    assert "run.json: steps must be a positive integer, got 'x'" in line


def test_unreadable_rows_are_skipped_and_labels_bounded(tmp_path: Path) -> None:
    """A JSON line nested too deeply to parse is one malformed row; a label at the class bound is an error."""
    from lorakit.errors import LorakitError
    from lorakit.train.data import MAX_CLASSES, load_task
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "label": 0}\n' + "[" * 100_000 + '\n{"text": "b", "label": 2}\n')
    spec, examples = load_task(str(path), "train")
    assert examples.skipped_lines == [2] and spec.num_labels == 3
    path.write_text(f'{{"text": "a", "label": {MAX_CLASSES - 1}}}\n{{"text": "b", "label": "{MAX_CLASSES}"}}\n')
    with pytest.raises(LorakitError, match=f"line 2: label {MAX_CLASSES} is out of range"):
        load_task(str(path), "train")


def test_a_bug_is_one_line_and_its_traceback_shows_under_verbose(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: object) -> None:
        raise ValueError("boom")
    monkeypatch.setattr("lorakit.cli.cmd_methods", broken)
    line = error_line(capsys, main(["methods"]), expected=1)
    assert line == "lorakit: internal error: ValueError: boom (rerun with -v for the traceback and please report it)"
    with pytest.raises(ValueError, match="boom"):
        main(["-v", "methods"])


def test_exit_code_and_traceback_as_a_user_sees_them(tmp_path: Path) -> None:
    """A real process: exit 2 and a one-line error; ``-v`` adds the traceback."""
    cli = [sys.executable, "-m", "lorakit.cli"]
    args = ["train", "--lr", "nan", "--output-dir", str(tmp_path)]
    quiet = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1] == "lorakit: error: --lr must be a positive finite number, got nan"
    verbose = subprocess.run([*cli, "-v", *args], capture_output=True, text=True, timeout=300)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "ConfigError" in verbose.stderr


def head_adapter(tmp: Path, head: torch.Tensor | None, peft: bool = False) -> Path:
    """A classification adapter whose head ``classifier.weight`` is ``head`` (``None``: no weights file), beside a
    ``run.json`` naming a model: the head's checks must all come before the model is loaded."""
    adapter = tmp / "adapter"
    adapter.mkdir()
    if peft:
        config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["query"],
                  "modules_to_save": ["classifier"], "base_model_name_or_path": "x"}
        key = "base_model.model.classifier.weight"
    else:
        config = {"lorakit_format_version": 1, "method": "lora", "config": {"r": 2, "target_modules": ["query"]},
                  "fingerprint": {}, "base_model": "x", "modules_to_save": ["classifier"]}
        key = "modules_to_save.classifier.weight"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    data = str(Path(__file__).parent / "data")
    (tmp / "run.json").write_text(json.dumps({"config": {"model": "x", "task": "sst2", "data_dir": data,
                                                         "eval_split": "validation", "eval_limit": 4}}))
    if head is not None:
        save_file({key: head}, str(adapter / "adapter_model.safetensors"))
    return adapter


def _huge_empty_head(path: Path) -> None:
    """Rewrite the header so the head is [1e9, 0]: 0 bytes of data, a billion labels."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    for key, entry in header.items():
        if key != "__metadata__":
            entry.update(shape=[10 ** 9, 0], data_offsets=[0, 0])
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text)


@pytest.mark.parametrize("peft", [False, True])
@pytest.mark.parametrize("case", ["billion-by-zero", "fifo", "0-dim", "truncated", "missing", "int64"])
def test_export_and_eval_check_the_classification_head_before_loading(case: str, peft: bool, tmp_path: Path,
                                                                      no_model: None,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`export`/`eval` read num_labels from the head through `lorakit.load`'s header checks: a [1e9, 0] head does
    not allocate, a FIFO does not block, a 0-dim, truncated, missing or integer head is one clear error."""
    head = {"0-dim": torch.tensor(1.0), "int64": torch.zeros(2, 8, dtype=torch.int64)}.get(case, torch.zeros(2, 8))
    adapter = head_adapter(tmp_path, None if case in ("missing", "fifo") else head, peft)
    weights = adapter / "adapter_model.safetensors"
    if case == "billion-by-zero":
        _huge_empty_head(weights)
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-9])
    elif case == "fifo":
        os.mkfifo(weights)
    expected = {"billion-by-zero": "has shape [1000000000, 0], expected [num_labels, hidden size]",
                "0-dim": "has shape [], expected [num_labels, hidden size]", "truncated": "is truncated or corrupt",
                "missing": "adapter_model.safetensors does not exist", "fifo": "is not a regular file",
                "int64": "has dtype torch.int64, expected float"}[case]
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("blocked")))
    signal.alarm(60)  # a FIFO once blocked safe_open forever
    try:
        for command in (["export", str(adapter), "--out", str(tmp_path / "out")], ["eval", str(adapter)]):
            line = error_line(capsys, main(command))
            assert line.startswith("lorakit: error: ") and expected in line, line
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not list((tmp_path / "out").glob("*"))  # nothing exported
