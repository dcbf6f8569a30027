"""What a newcomer meets first: help text, `-o` numbers, thread count, progress bars (issue 22)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from lorakit import cli
from lorakit.core.registry import methods
from lorakit.errors import ConfigError
from lorakit.train.run import check_method_options
from tests.tiny_models import save_tiny_lm


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"lorakit": parser, **sub.choices}


def test_help_has_no_none_default_and_every_option_says_what_it_does() -> None:
    for name, parser in _parsers().items():
        text = " ".join(parser.format_help().split())
        assert "default: None" not in text and "(default:" not in text, name
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"lorakit {name} {action.option_strings[0]} has no help"
    evaluate = " ".join(_parsers()["eval"].format_help().split())
    assert "where the model runs (auto: CUDA when available) [default: auto]" in evaluate
    assert "evaluation examples [default: the training run's]" in evaluate


def test_o_and_recipes_read_exponent_floats(tmp_path: Path) -> None:
    options = cli.parse_options(["init_lr=1e-6", "alpha=2E3", "lr=+3.5e-4", "r=16", "x=0.5", "name=1e6x"])
    assert options == {"init_lr": 1e-6, "alpha": 2000.0, "lr": 3.5e-4, "r": 16, "x": 0.5, "name": "1e6x"}
    assert isinstance(options["init_lr"], float) and isinstance(options["r"], int)
    # every float option of every method takes 1e-6 as a number: a refusal, if any, is about its range
    checked = 0
    for name, method in methods().items():
        hints = typing.get_type_hints(method.config_class)
        for f in dataclasses.fields(method.config_class):
            if float not in (hints[f.name], *typing.get_args(hints[f.name])):
                continue
            value = cli.parse_options([f"{f.name}=1e-6"])
            try:
                check_method_options(name, value)
            except ConfigError as err:
                assert "must be a number" not in str(err) and "got '1e-6'" not in str(err), (name, f.name, err)
            checked += 1
    assert checked > 20
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 1e-4\nweight_decay: 1E-2\nmethod_options: {init_lr: 5e-3}\n")
    args = cli.build_parser().parse_args(["train", "--config", str(recipe)])
    config = cli.run_config(args)
    assert (config.lr, config.weight_decay, config.method_options) == (1e-4, 1e-2, {"init_lr": 5e-3})


def test_threads_flag_sets_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        # the thread count is set before the command runs (here it then fails: no such adapter)
        assert cli.main(["eval", "/nonexistent/adapter", "--threads", "2"]) == 2
        assert torch.get_num_threads() == 2
        with pytest.raises(cli.LorakitError, match="--threads must be a positive integer"):
            cli.set_threads(0)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert cli.set_threads(None) == 1  # OMP_NUM_THREADS decides
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cli.os, "getloadavg", lambda: (99.0, 0.0, 0.0))
        assert cli.set_threads(None) == 1 == torch.get_num_threads()  # every CPU busy: one thread
        monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        assert cli.set_threads(None) == len(cli.os.sched_getaffinity(0))  # idle: every CPU this process may use
    finally:
        torch.set_num_threads(before)


def test_eval_shows_progress_on_stderr(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = save_tiny_lm(tmp_path / "tiny", 32, 64, 2, 4)
    out = tmp_path / "run"
    before = torch.get_num_threads()
    try:
        assert cli.main(["train", "--model", str(model), "--task", "arith", "--steps", "1", "--batch-size", "2",
                         "--eval-limit", "2", "--max-new-tokens", "2", "--warmup-steps", "0", "--method", "lora",
                         "--output-dir", str(out), "--threads", "1"]) == 0
        capfd.readouterr()
        assert cli.main(["eval", str(out / "adapter"), "--device", "cpu", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    captured = capfd.readouterr()
    assert "eval (generating)" in captured.err and "eval (generating)" not in captured.out
    assert '"score"' in captured.out
