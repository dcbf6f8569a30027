"""A model saved by ``lorakit prune`` is a ``--model`` like any other (the CLI's ``main``, in process): train,
eval and merge load it through `lorakit.models.load_model`, which rebuilds its blocks of different widths (`lorakit.prune.load_pruned`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.prune import PRUNED_KEY, PruneError, load_pruned
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

    assert main(["export", str(out / "adapter"), "--out", str(tmp_path / "peft"), "--rank-pattern"]) == 0
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["r"] == 4 and set(peft_config["rank_pattern"].values()) == {2}  # blocks 1 and 2 at rank 2

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


def _copy(pruned_lm: Path, tmp_path: Path, **config: Any) -> Path:
    """A copy of the pruned directory with ``config`` merged into its config.json (a ``None`` value deletes)."""
    out = tmp_path / "copy"
    shutil.copytree(pruned_lm, out)
    raw = json.loads((out / "config.json").read_text())
    raw.update(config)
    (out / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return out


@pytest.mark.parametrize(("config", "message"), [
    ({"num_hidden_layers": 1e6}, "num_hidden_layers must be an integer >= 1, got 1000000.0"),
    ({"num_hidden_layers": 1000000}, "must list one entry for each of the num_hidden_layers=1000000 blocks"),
    ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
    ({"intermediate_size": -5}, "intermediate_size must be an integer >= 1, got -5"),
    ({"num_attention_heads": "6"}, "num_attention_heads must be an integer"),
    ({"hidden_act": "nope"}, "hidden_act must be one of transformers' activations, got nope"),
    ({"rope_scaling": {"rope_type": "bogus", "factor": 2.0}}, "rope_scaling needs a rope_type among"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": -1.0}}, "rope_scaling needs a rope_type among"),
    ({"rope_scaling": {"rope_type": "linear"}}, "is not a valid llama config: KeyError"),
    ({"rope_scaling": "x"}, "rope_scaling must be null or an object"),
    ({"pad_token_id": 10 ** 9}, "pad_token_id must be a token id in"),
    ({"eos_token_id": [1, -1]}, "eos_token_id must be a token id in"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a finite number > 0, got -1"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number > 0, got nan"),
    ({"tie_word_embeddings": True}, "holds a separate lm_head.weight"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"model_type": "gpt2"}, "model_type must be one of"),
    ({PRUNED_KEY: [{"heads": 3, "intermediate": 32}] * 3}, "must list one entry for each of the num_hidden_layers=4"),
    ({PRUNED_KEY: [{"heads": 6, "kv_heads": 2, "intermediate": 64, "x": 1}] * 4}, "lorakit_pruned_layers[0] must be"),
])
def test_bad_pruned_config_is_refused_before_building(pruned_lm: Path, tmp_path: Path, config: dict[str, Any],
                                                      message: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(pruned_lm, tmp_path, **config)
    start = time.perf_counter()
    assert main(train_args(model, tmp_path / "run", "--method", "lora")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - start < 10  # refused from the files' headers, nothing built (1e6 blocks would hang)
    assert not (tmp_path / "run" / "adapter").exists()


def test_config_that_is_not_an_object_or_nests_too_deeply(pruned_lm: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(pruned_lm, tmp_path)
    for text, message in ((json.dumps([{PRUNED_KEY: []}]), "must hold a JSON object, got list"),
                          ('{"' + PRUNED_KEY + '": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply")):
        (model / "config.json").write_text(text)
        with pytest.raises(PruneError, match=message):
            load_pruned(model)
        assert main(train_args(model, tmp_path / "run", "--method", "lora")) == 2
        assert message in capsys.readouterr().err


def test_only_the_saved_weights_file_loads_and_it_must_be_finite_floats(pruned_lm: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(pruned_lm, tmp_path)
    reference, _ = load_model(str(pruned_lm), "causal-lm")
    state = load_file(model / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in state.items()}, model / "zzz-extra.safetensors")
    loaded, _ = load_model(str(model), "causal-lm")  # the extra file (last in glob order) is ignored
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)

    name = "model.layers.1.mlp.up_proj.weight"
    for tensor, message in ((state[name].clone().fill_(float("nan")), f"{name} holds NaN or infinite values"),
                            (state[name].to(torch.int64), f"{name} has dtype I64")):
        save_file({**state, name: tensor}, model / "model.safetensors")
        assert main(train_args(model, tmp_path / "run", "--method", "lora")) == 2
        assert message in capsys.readouterr().err
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a torn file
    assert main(train_args(model, tmp_path / "run", "--method", "lora")) == 2
    assert "is not a readable safetensors file" in capsys.readouterr().err


def test_eval_of_an_adapter_whose_pruned_base_was_corrupted(pruned_lm: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = _copy(pruned_lm, tmp_path)
    assert main(train_args(model, tmp_path / "run", "--method", "lora", "--steps", "1")) == 0
    capsys.readouterr()
    raw = json.loads((model / "config.json").read_text())
    raw["rms_norm_eps"] = 0
    (model / "config.json").write_text(json.dumps(raw))
    assert main(["eval", str(tmp_path / "run" / "adapter"), "--device", "cpu"]) == 2
    assert "rms_norm_eps must be a finite number > 0, got 0" in capsys.readouterr().err
