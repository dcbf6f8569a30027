"""A model saved by ``lorakit prune`` is a ``--model`` like any other (the CLI's ``main``, in process): train,
eval and merge load it through `lorakit.models.load_model`, which rebuilds its blocks of different widths (`lorakit.prune.load_pruned`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.prune import PRUNED_KEY, PruneError
from tests.test_cli import train_args
from tests.tiny_models import save_tiny_lm


@pytest.fixture(scope="module")
def pruned_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block GQA Llama with a real tokenizer, pruned 50% in blocks 1 and 2 by ``lorakit prune``."""
    base = save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), 48, 64, 4, 6)
    out = tmp_path_factory.mktemp("pruned") / "model"
    assert main(["prune", "--model", str(base), "--out", str(out), "--ratio", "0.5", "--first", "1", "--last", "1",
                 "--samples", "2", "--max-length", "32"]) == 0
    return out


def test_train_eval_merge_on_a_pruned_model(pruned_lm: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = load_model(str(pruned_lm), "causal-lm")
    widths = [(b.self_attn.q_proj.out_features, b.mlp.up_proj.out_features) for b in model.model.layers]
    assert widths == [(48, 64), (24, 32), (24, 32), (48, 64)]  # 1 of 2 KV groups (3 query heads each), half the MLP

    out = tmp_path / "run"
    assert main(train_args(pruned_lm, out, "--method", "rankadaptor", "-o", "r=4", "-o", "block_ranks=[4, 2, 2, 4]",
                           "--metric", "nll", "--lr", "0.05")) == 0
    capsys.readouterr()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model"] == str(pruned_lm) and len(run["train"]["losses"]) == 3
    assert run["score_after"] < run["score_before"]  # the pruned model trained, not a fresh unpruned one
    lora_a = {n: t.shape for n, t in load_file(out / "adapter" / "adapter_model.safetensors").items() if "lora_A" in n}
    assert any(".1.self_attn.q_proj" in n and s == (2, 48) for n, s in lora_a.items())
    assert any(".1.mlp.down_proj" in n and s == (2, 32) for n, s in lora_a.items())  # pruned input width

    assert main(["eval", str(out / "adapter"), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["score"] == pytest.approx(run["score_after"], rel=1e-5)

    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged, tokenizer = load_model(str(tmp_path / "merged"), "causal-lm")  # still pruned: loads the same way
    assert getattr(merged.config, PRUNED_KEY) == getattr(model.config, PRUNED_KEY)
    ids = tokenizer("12 + 7 =", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, model(ids).logits)  # the trained update is in the weights


def test_a_broken_pruned_directory_is_a_clear_error(pruned_lm: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in pruned_lm.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(PruneError, match=r"broken has no model\.safetensors"):
        load_model(str(broken), "causal-lm")
    with pytest.raises(ConfigError, match="pruned by `lorakit prune`"):
        load_model(str(pruned_lm), "classification", num_labels=2)
    assert main(train_args(broken, tmp_path / "run", "--method", "lora")) == 2
    assert "has no model.safetensors" in capsys.readouterr().err
