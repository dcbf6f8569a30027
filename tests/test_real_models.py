"""The core on the real pretrained models shipped in PyPI packages (SmolLM2-135M GGUF, MiniLM-L6)."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.core.gradients import dense_gradients, materialize, sketched_svd
from lorakit.core.linalg import principal_cosines, truncated_svd
from lorakit.core.loss import model_loss
from lorakit.models import load_model
from lorakit.train.data import collate, encode_causal_lm, encode_classification, load_task

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parent / "data"  # slices of SST-2, TREC, GSM8K (tests/data/README.md)


@pytest.fixture(scope="module")
def smollm2() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    return load_model("smollm2-135m", "causal-lm")


def arith_batch(tokenizer: object, n: int, seed: int) -> dict[str, torch.Tensor]:
    _, examples = load_task("arith", "train", seed=seed, limit=n)
    features = encode_causal_lm(examples, tokenizer, max_length=96, chat_template=True)
    return collate(features, tokenizer.pad_token_id).inputs


def train_steps(model: torch.nn.Module, batch: dict, steps: int, lr: float) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        losses.append(model_loss(model, batch).item())
    return losses


def roundtrip(model: torch.nn.Module, fresh: torch.nn.Module, batch: dict, tmp_path: Path) -> None:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = model(**inputs).logits
    lorakit.save(model, tmp_path / "adapter")
    lorakit.load(fresh, tmp_path / "adapter")
    fresh.eval()
    with torch.no_grad():
        got = fresh(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_smollm2_lora_sb_trains_and_round_trips(smollm2: tuple, tmp_path: Path) -> None:
    base, tok = smollm2
    model, fresh = copy.deepcopy(base), copy.deepcopy(base)
    init = arith_batch(tok, 16, seed=1)
    lorakit.attach(model, lorakit.LoraSbConfig(r=16, init_lr=1e-4), data=[init])
    counts = lorakit.trainable_parameters(model)
    assert counts["total"] == 16 * 16 * 7 * 30
    batch = arith_batch(tok, 8, seed=2)
    losses = train_steps(model, batch, steps=3, lr=5e-3)
    assert losses[-1] < losses[0], losses
    roundtrip(model, fresh, batch, tmp_path)


def test_minilm_lora_sb_trains_and_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base, tok = load_model("minilm-l6", "classification", num_labels=2)
    model, fresh = copy.deepcopy(base), copy.deepcopy(base)
    _, examples = load_task("sst2", "train", data_dir=DATA, limit=24)
    features = encode_classification(examples, tok, max_length=64)
    init, batch = collate(features[:16], tok.pad_token_id).inputs, collate(features[16:], tok.pad_token_id).inputs
    config = lorakit.LoraSbConfig(r=16, init_lr=1e-3, target_modules=("query", "key", "value", "dense"),
                                  modules_to_save=("classifier",))
    lorakit.attach(model, config, data=[init])
    losses = train_steps(model, batch, steps=3, lr=1e-2)
    assert losses[-1] < losses[0], losses
    roundtrip(model, fresh, batch, tmp_path)


def test_smollm2_lora_ga_sketch_matches_exact_svd(smollm2: tuple) -> None:
    """The streamed sketch (default settings) finds the exact SVD's subspaces for the vectors LoRA-GA uses."""
    base, tok = smollm2
    model = copy.deepcopy(base)
    _, examples = load_task("gsm8k", "train", data_dir=DATA, limit=8)
    features = encode_causal_lm(examples, tok, max_length=256, chat_template=False)
    batches = materialize([collate(features, tok.pad_token_id).inputs], "test")
    r = 8
    config = lorakit.LoraGaConfig(r=r)
    lorakit.attach(model, lorakit.LoraConfig(r=r))
    layers = lorakit.adapter_layers(model)
    sketch = sketched_svd(model, layers, batches, None, 2 * r, 8 * r, config.niter)
    cos_a, cos_b = [], []
    for group in dense_gradients(model, layers, batches, None, 1 << 30):
        for name, grad in group.items():
            u, _, vh = truncated_svd(grad, 2 * r)
            su, _, svh = sketch[name]
            cos_a.append(float(principal_cosines(svh[:r].T, vh[:r].T).min()))
            cos_b.append(float(principal_cosines(su[:, r:], u[:, r:]).min()))
    print(f"A: min {min(cos_a):.5f} median {statistics.median(cos_a):.5f}; "
          f"B: min {min(cos_b):.5f} median {statistics.median(cos_b):.5f}")
    assert min(cos_a) >= 0.99 and min(cos_b) >= 0.99


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python example, verbatim."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "peft-adapter" / "adapter_config.json").is_file()


def test_lora_sb_on_the_builtin_gsm8k_task_improves_on_the_base_model(tmp_path) -> None:
    """``lorakit train --task gsm8k --method lora-sb`` (10 steps of 4 instead of 30 of 8, 160 tokens, 8 held-out
    items, to stay cheap in time and memory): the η of a
    causal-LM task (3.0e-7, the official arithmetic script's) and its 50 init samples give a model whose answer
    NLL on held-out GSM8K items ends below the base model's; lr / warm-up = 2e-3, the η GSM8K got before, made
    the initial update a whole sign step (the main job's exact match fell from 5 % to 1 %)."""
    from lorakit.methods.lora_sb import default_eta
    from lorakit.train.run import RunConfig, run_training

    run = RunConfig(task="gsm8k", method="lora-sb", data_dir=str(DATA), steps=10, batch_size=4, max_length=160,
                    eval_limit=8, metric="nll", device="cpu", save_every=0, output_dir=str(tmp_path / "run"))
    result = run_training(run)
    assert result.config["method_options"] == {} and result.config["init_samples"] is None
    assert result.score_after < result.score_before, (result.score_before, result.score_after)
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["config"]["init_lr"] == default_eta("causal-lm")
