"""`lorakit` end to end, as a user runs it (subprocesses), on a tiny local model and on the real MiniLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import LlamaForCausalLM

from tests.tiny_models import save_tiny_lm

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # slices of SST-2, TREC, GSM8K (tests/data/README.md)
COMMANDS = ["train", "eval", "export", "merge", "methods", "compare"]


def lorakit(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a real (BERT WordPiece) tokenizer, saved as a local model directory."""
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), 32, 64, 2, 4)


def train_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--task", "arith", "--steps", "3", "--batch-size", "4",
            "--eval-limit", "4", "--max-new-tokens", "3", "--warmup-steps", "1", "--output-dir", str(out), *extra]


def test_help_shows_defaults() -> None:
    for command in COMMANDS:
        result = lorakit(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "default" in result.stdout, command
    assert "[default: lora-sb]" in lorakit("train", "--help").stdout.replace("\n", " ").replace("  ", " ")


def test_train_eval_export_merge_on_a_local_model(tiny_lm: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = lorakit(*train_args(tiny_lm, out, "--method", "lora", "-o", "r=2"))
    assert result.returncode == 0, result.stderr
    assert "exact_match before" in result.stdout and "trainable parameters" in result.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "lora" and run["config"]["method_options"] == {"r": 2}
    assert len(run["train"]["losses"]) == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "log.jsonl").is_file()

    evaluated = lorakit("eval", str(out / "adapter"), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
    assert report["metric"] == "exact_match" and report["score"] == pytest.approx(run["score_after"])

    exported = lorakit("export", str(out / "adapter"), "--out", str(tmp_path / "peft"))
    assert exported.returncode == 0, exported.stderr
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 2

    merged = lorakit("merge", str(out / "adapter"), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    model = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_dylora_eval_at_every_rank_from_one_training(tiny_lm: Path, tmp_path: Path) -> None:
    """``lorakit eval ADAPTER --rank b`` after one DyLoRA training scores the rank-b truncation."""
    from lorakit.cli import _load_adapted
    from lorakit.methods.dylora import set_rank
    from lorakit.train.data import load_task
    from lorakit.train.evaluate import answer_nll
    from lorakit.train.run import RunConfig, encode

    out = tmp_path / "run"
    result = lorakit(*train_args(tiny_lm, out, "--method", "dylora", "-o", "r=3", "--metric", "nll", "--lr", "0.05"))
    assert result.returncode == 0, result.stderr
    scores = {}
    for rank in (1, 2, 3):
        evaluated = lorakit("eval", str(out / "adapter"), "--rank", str(rank), "--device", "cpu")
        assert evaluated.returncode == 0, evaluated.stderr
        scores[rank] = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])["score"]
    assert scores[3] == pytest.approx(json.loads((out / "run.json").read_text())["score_after"], rel=1e-5)
    assert len(set(scores.values())) == 3
    model, tokenizer, run = _load_adapted(str(out / "adapter"), type("Args", (), {"model": None, "device": "cpu"})())
    cfg = RunConfig(**{k: v for k, v in run.items() if k in RunConfig.__dataclass_fields__}).resolved()
    spec, examples = load_task("arith", "test", None, seed=0, limit=4)
    set_rank(model, 2)
    assert answer_nll(model, encode(spec, examples, tokenizer, cfg), batch_size=16) == pytest.approx(scores[2],
                                                                                                    rel=1e-5)


def test_recipe_with_flag_override(tiny_lm: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_lm), "task": "arith", "method": "lora-xs", "steps": 5,
                                      "batch_size": 4, "eval_limit": 2, "max_new_tokens": 2,
                                      "method_options": {"r": 2}, "output_dir": str(tmp_path / "run")}))
    result = lorakit("train", "--config", str(recipe), "--steps", "2")
    assert result.returncode == 0, result.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["steps"] == 2 and run["config"]["method"] == "lora-xs"


def test_compare_writes_report_and_plots(tiny_lm: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = lorakit("compare", "--model", str(tiny_lm), "--task", "arith", "--methods", "lora,lora-sb,full",
                     "--steps", "3", "--batch-size", "4", "--eval-limit", "2", "--max-new-tokens", "2",
                     "--init-samples", "4", "-o", "r=2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    for method in ("lora", "lora-sb", "full"):
        assert f"| {method} |" in report
    for plot in ("loss.png", "metric.png", "params.png"):
        assert (out / plot).stat().st_size > 1000
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "lora-sb", "full"]
    assert rows[2]["trainable_params"] > rows[0]["trainable_params"] > rows[1]["trainable_params"]


def test_methods_lists_every_method_with_counts(tiny_lm: Path) -> None:
    import lorakit as lk

    result = lorakit("methods", "--model", str(tiny_lm), "--r", "2")
    assert result.returncode == 0, result.stderr
    for name in lk.methods():
        assert name in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--task", "missing.jsonl"], "missing.jsonl"),
    (["-o", "r"], "KEY=VALUE"),
    (["-o", "bogus=1", "--method", "lora"], "bogus"),
])
def test_bad_input_is_a_clear_error(tiny_lm: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = lorakit(*train_args(tiny_lm, tmp_path / "run"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_real_minilm_sst2_end_to_end(tmp_path: Path) -> None:
    """A real model, real data: MiniLM-L6 on SST-2 for a few steps, then eval and PEFT export."""
    out = tmp_path / "run"
    result = lorakit("train", "--task", "sst2", "--data-dir", str(DATA), "--method", "lora-sb", "--steps", "8",
                     "--eval-limit", "128", "--output-dir", str(out), "--lr", "5e-3")
    assert result.returncode == 0, result.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model"] == "minilm-l6" and run["metric"] == "accuracy"
    assert 0.0 <= run["score_after"] <= 1.0
    losses = run["train"]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    exported = lorakit("export", str(out / "adapter"), "--out", str(tmp_path / "peft"), "--modules-to-save")
    assert exported.returncode == 0, exported.stderr
