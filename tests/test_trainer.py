"""The training loop (`lorakit.train.trainer`) and evaluation (`lorakit.train.evaluate`) on tiny random models."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.errors import ConfigError, TrainingError
from lorakit.train import data, evaluate
from lorakit.train.config import lr_factor
from lorakit.train.data import Batch, Example
from lorakit.train.trainer import TrainConfig, TrainResult, train
from tests import tiny_models as tiny
from tests.tiny_models import KINDS, TinyMLP, output

VOCAB = 128


def lm_features(n: int = 8, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion examples of 6 to 13 tokens (prompt 3 tokens, masked)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def llama_with(config: lorakit.AdapterConfig) -> torch.nn.Module:
    return lorakit.attach(KINDS["llama"].build(0), config)


def adapter_files(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- pieces


def test_the_trainer_draws_the_same_batches_as_data_batches():
    feats = lm_features(13)
    for group in (True, False):
        ours = data.batch_indices(feats, 4, seed=5, group_by_length=group)
        theirs = data.batches(feats, 4, seed=5, group_by_length=group, pad_token_id=0)
        for _ in range(12):  # three epochs
            batch = next(theirs)
            assert next(ours) == (batch.epoch, batch.indices)
    with pytest.raises(TrainingError, match="empty after encoding"):
        data.batch_indices([], 4, seed=0)


def test_lr_schedules():
    linear = TrainConfig(steps=10, warmup_steps=2)
    assert [round(lr_factor(s, linear), 4) for s in range(4)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 0.875]
    cosine = TrainConfig(steps=10, warmup_ratio=0.2, schedule="cosine")
    assert lr_factor(2, cosine) == 1.0 and lr_factor(6, cosine) == pytest.approx(0.5)
    assert lr_factor(9, TrainConfig(steps=10, schedule="constant")) == 1.0
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="output_dir"):
        TrainConfig(save_every=5)


def test_steps_to_reach():
    result = TrainResult([4.0, 3.0, 2.0, 1.0], [], 1.0, 1.0, 1.0, 1.0, 1, 4)
    assert result.steps_to_reach(2.4, window=1) == 3
    assert result.steps_to_reach(2.4, window=2) == 4
    assert result.steps_to_reach(0.5) is None


# ---------------------------------------------------------------------------------------------- a run


def test_train_learns_logs_evaluates_and_saves(tmp_path):
    model = llama_with(lorakit.LoraConfig(r=4))
    feats = lm_features(8)
    evals = []

    def eval_fn(m):
        evals.append(m.training)
        return evaluate.answer_nll(m, feats, batch_size=8)

    before = evaluate.answer_nll(model, feats)
    result = train(model, feats, TrainConfig(steps=12, batch_size=4, lr=2e-2, log_every=4, eval_every=6,
                                             output_dir=str(tmp_path)), eval_fn=eval_fn)  # with a tqdm bar
    assert len(result.losses) == result.steps == 12
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.5
    assert evals == [False, False] and [e["step"] for e in result.evals] == [6, 12]
    assert result.evals[-1]["score"] < before - 0.5
    assert result.trainable_params == lorakit.trainable_parameters(model)["total"]
    assert result.padded_tokens_per_second >= result.tokens_per_second > 0
    assert result.peak_memory_mib > 0 and result.seconds > 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records] == [("train", 4), ("eval", 6), ("train", 8), ("train", 12),
                                                       ("eval", 12)]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "padded_tokens_per_s"} <= records[0].keys()
    assert not model.training  # the model's mode is restored
    assert result.adapter_dir == str(tmp_path / "adapter")
    fresh = lorakit.load(KINDS["llama"].build(0), tmp_path / "adapter")
    inputs = KINDS["llama"].inputs()
    assert torch.equal(output(fresh, inputs), output(model, inputs))


def test_hooks_see_clipped_gradients_and_lora_pro_learns_under_clipping(monkeypatch):
    """Clipping acts on the raw gradients before ``after_backward`` (as transformers.Trainer clips before
    ``on_pre_optimizer_step``): LoRA-Pro's Adam direction is not shrunk by the clip of its own output."""
    from lorakit.methods.lora_pro import LoraProHooks

    seen = []
    original = LoraProHooks.after_backward

    def recording(self, step):
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        seen.append(float(torch.nn.utils.get_total_norm(grads)))
        original(self, step)

    monkeypatch.setattr(LoraProHooks, "after_backward", recording)
    model = llama_with(lorakit.LoraProConfig(r=4))
    feats = lm_features(8)
    result = train(model, feats, TrainConfig(steps=12, batch_size=4, lr=2e-2, max_grad_norm=0.01, progress=False))
    assert len(seen) == 12 and max(seen) <= 0.01 * (1 + 1e-4)
    assert sum(result.losses[-3:]) / 3 < result.losses[0] - 0.5


def test_tensorboard_gets_the_jsonl_scalars(tmp_path):
    """With ``tensorboard`` installed (the dev extra), the scalars of ``log.jsonl`` also go to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = llama_with(lorakit.LoraConfig(r=2))
    train(model, lm_features(8), TrainConfig(steps=4, batch_size=4, lr=1e-2, log_every=2, progress=False,
                                             output_dir=str(tmp_path)))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records]


@pytest.mark.parametrize("method", ["lora", "xgblora"])
def test_resume_after_a_kill_is_bitwise_identical(tmp_path, method):
    """Run 8 steps; separately run until step 5 with a checkpoint at 3 (then 'killed'), resume: same adapter.

    Dropout makes the result depend on the RNG stream; XGBLoRA adds rounds (hook state), merges into the
    base (offset buffers), optimizer resets, a random layer choice per round and a regularizer."""
    config = (lorakit.LoraConfig(r=4, dropout=0.1) if method == "lora" else
              lorakit.XgbLoraConfig(r=2, kappa=2, layer_fraction=0.5, booster_l2=1e-3, dropout=0.1))
    feats = lm_features(12)
    base = dict(steps=8, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, save_every=3, progress=False,
                log_every=1)
    full = train(llama_with(config), feats, TrainConfig(output_dir=str(tmp_path / "a"), **base))

    killed = train(llama_with(config), feats, TrainConfig(output_dir=str(tmp_path / "b"), stop_after=5, **base))
    assert killed.steps == 5 and killed.adapter_dir is None
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3
    assert {p.suffix for p in (tmp_path / "b" / "checkpoint").iterdir()} == {".json", ".safetensors"}

    resumed_model = llama_with(config)
    resumed = train(resumed_model, feats, TrainConfig(output_dir=str(tmp_path / "b"), resume=True, **base))
    assert resumed.losses == full.losses
    assert_bitwise(adapter_files(tmp_path / "b" / "adapter"), adapter_files(tmp_path / "a" / "adapter"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the records of steps 4-5 from the killed run were dropped


def test_bf16_autocast():
    dtypes = []

    def loss_fn(model, batch):
        out = model(**batch)
        dtypes.append(out.logits.dtype)
        return out.loss

    feats = lm_features(8)
    fp32 = train(llama_with(lorakit.LoraConfig(r=4)), feats, TrainConfig(steps=2, batch_size=4, progress=False))
    bf16 = train(llama_with(lorakit.LoraConfig(r=4)), feats, TrainConfig(steps=2, batch_size=4, bf16=True,
                                                                         progress=False), loss_fn=loss_fn)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert bf16.losses == pytest.approx(fp32.losses, abs=0.05)


@pytest.mark.parametrize("name", sorted(lorakit.methods()))
def test_every_method_trains_and_resumes_bitwise(tmp_path, name, caplog):
    """Each registered method through the trainer: hooks (with their EMAs and moments), its optimizer,
    checkpoint and resume give the uninterrupted run's adapter bit for bit."""
    method = lorakit.get_method(name)
    feats = lm_features(8)
    cfg = dict(steps=4, batch_size=4, lr=1e-3, save_every=2, progress=False)

    def run(out: str, **changes) -> torch.nn.Module:
        model = tiny.attach(KINDS["llama"].build(0), method, KINDS["llama"])
        if hasattr(lorakit.hooks(model), "set_validation_data"):  # ALoRA scores ranks on held-out batches
            lorakit.hooks(model).set_validation_data(KINDS["llama"].batches(2, seed=300))
        train(model, feats, TrainConfig(**cfg, output_dir=str(tmp_path / out), **changes))
        return model

    full = run("a")
    run("b", stop_after=3)
    run("b", resume=True)
    assert lorakit.hooks(full).state_dict()[2] == []
    assert "cannot carry" not in caplog.text
    assert_bitwise(adapter_files(tmp_path / "b" / "adapter"), adapter_files(tmp_path / "a" / "adapter"))


def test_resume_survives_a_kill_between_the_two_renames_of_a_checkpoint_swap(tmp_path):
    feats = lm_features(8)
    cfg = dict(steps=4, batch_size=4, save_every=2, output_dir=str(tmp_path), progress=False)
    first = train(llama_with(lorakit.LoraConfig(r=4)), feats, TrainConfig(**cfg, stop_after=3))
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint-old")  # old moved aside, new not yet in place
    (tmp_path / ".checkpoint-tmp").mkdir()  # a half-written new checkpoint
    resumed = train(llama_with(lorakit.LoraConfig(r=4)), feats, TrainConfig(**cfg, resume=True))
    assert resumed.steps == 4 and resumed.losses[:2] == first.losses[:2]
    assert (tmp_path / "checkpoint" / "trainer_state.json").is_file()
    assert not (tmp_path / ".checkpoint-old").exists() and not (tmp_path / ".checkpoint-tmp").exists()


def test_resume_refuses_a_different_batching(tmp_path):
    feats = lm_features(8)
    cfg = dict(steps=2, batch_size=4, save_every=1, output_dir=str(tmp_path), progress=False)
    train(llama_with(lorakit.LoraConfig(r=4)), feats, TrainConfig(**cfg))
    with pytest.raises(TrainingError, match="batch_size"):
        train(llama_with(lorakit.LoraConfig(r=4)), feats, TrainConfig(**{**cfg, "batch_size": 2}, resume=True))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * math.nan if len(calls) == 5 else loss

    model = llama_with(lorakit.LoraConfig(r=4))
    feats = lm_features(8)
    with pytest.raises(TrainingError, match=r"step 5\b.*last good checkpoint \(step 4\)"):
        train(model, feats, TrainConfig(steps=10, batch_size=4, save_every=2, output_dir=str(tmp_path),
                                        progress=False), loss_fn=loss_fn)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4 and all(math.isfinite(x) for x in state["progress"]["losses"])
    assert not (tmp_path / "adapter").exists()
    saved = adapter_files(tmp_path / "checkpoint")
    assert all(torch.isfinite(t).all() for t in saved.values())
    # the model still holds the step-4 adapter: the bad step never reached the optimizer
    assert all(torch.equal(saved[f"{name}.lora_B"], layer.lora_B) for name, layer in lorakit.adapter_layers(model).items())


# ---------------------------------------------------------------------------------------------- plain models


def mlp_features(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input": torch.randn(16, generator=g), "labels": int(torch.randint(0, 8, (1,), generator=g))}
            for _ in range(n)]


def mlp_collate(features: list[dict]) -> Batch:
    return Batch({"input": torch.stack([f["input"] for f in features]),
                  "labels": torch.tensor([f["labels"] for f in features])}, real_tokens=len(features))


def test_plain_module_with_adapter_and_full_fine_tuning_with_resume(tmp_path):
    feats = mlp_features()
    cfg = dict(steps=6, batch_size=4, lr=1e-2, group_by_length=False, progress=False, save_every=2)
    adapted = lorakit.attach(TinyMLP(), lorakit.LoraConfig(r=4))
    result = train(adapted, feats, TrainConfig(**cfg, output_dir=str(tmp_path / "lora")), collate=mlp_collate)
    assert result.steps == 6 and (tmp_path / "lora" / "adapter").is_dir()

    torch.manual_seed(0)
    template = TinyMLP()
    full_model = TinyMLP()
    full_model.load_state_dict(template.state_dict())
    full = train(full_model, feats, TrainConfig(**cfg, output_dir=str(tmp_path / "full")), collate=mlp_collate)
    assert full.trainable_params == sum(p.numel() for p in template.parameters())
    assert not (tmp_path / "full" / "adapter").exists()

    part_model = TinyMLP()
    part_model.load_state_dict(template.state_dict())
    train(part_model, feats, TrainConfig(**cfg, output_dir=str(tmp_path / "part"), stop_after=3), collate=mlp_collate)
    rest_model = TinyMLP()
    rest_model.load_state_dict(template.state_dict())
    train(rest_model, feats, TrainConfig(**cfg, output_dir=str(tmp_path / "part"), resume=True), collate=mlp_collate)
    assert_bitwise(rest_model.state_dict(), full_model.state_dict())


# ---------------------------------------------------------------------------------------------- evaluation


def test_accuracy_matches_one_by_one_argmax():
    model = KINDS["bert"].build(0)
    g = torch.Generator().manual_seed(1)
    feats = [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(4, 10, (1,), generator=g)),),
                                         generator=g).tolist(), "labels": i % 3} for i in range(10)]
    expected = sum(int(output(model, {"input_ids": torch.tensor([f["input_ids"]])}).argmax()) == f["labels"]
                   for f in feats) / len(feats)
    assert evaluate.accuracy(model, feats, batch_size=4) == pytest.approx(expected)


def test_answer_nll_is_the_token_weighted_mean_of_the_model_loss():
    model = KINDS["llama"].build(0)
    feats = lm_features(6)
    with torch.no_grad():
        losses = [float(model(**data.collate([f], 2).inputs).loss) for f in feats]
    counts = [sum(1 for t in f["labels"][1:] if t != -100) for f in feats]
    expected = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    assert evaluate.answer_nll(model, feats, batch_size=4) == pytest.approx(expected, rel=1e-5)


@dataclass
class Tiny:
    tokenizer: PreTrainedTokenizerFast
    model: torch.nn.Module


@pytest.fixture(scope="module")
def tiny_lm() -> Tiny:
    words = ["<pad>", "<eos>", "<bos>", "<unk>", *"0123456789", "What", "is", "+", "-", "?", "so"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                             initializer_range=0.2)).eval()
    return Tiny(tokenizer, model)


def test_exact_match_greedy_batched_generation_and_scoring(tiny_lm):
    prompts = ["What is 1 + 2 ?", "What is 13 - 4 ?", "7", "What is 100 + 23 ?", "so 5 - 5"]
    one_by_one = [evaluate.generate(tiny_lm.model, tiny_lm.tokenizer, [p], 6)[0] for p in prompts]
    batched = evaluate.generate(tiny_lm.model, tiny_lm.tokenizer, prompts, 6, batch_size=5)
    assert batched == one_by_one  # left padding does not change greedy completions
    # answers: the model's own final number for the first three prompts, a wrong one for the rest
    answers = [data.extract_final_number(c) or "x" for c in batched[:3]] + ["-1", "-2"]
    examples = [Example(prompt=p, completion="?", answer=a) for p, a in zip(prompts, answers)]
    score, samples = evaluate.exact_match(tiny_lm.model, tiny_lm.tokenizer, examples, max_new_tokens=6,
                                          batch_size=2)
    expected = sum(data.exact_match(c, a) for c, a in zip(batched, answers)) / 5
    assert score == pytest.approx(expected) and score > 0  # the random model does produce numbers
    assert len(samples) == 5 and "->" in samples[0]
