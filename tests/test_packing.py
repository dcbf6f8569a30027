"""Sequence packing: rows of whole examples, no attention across them, the same loss and gradients as unpacked
batches (position ids alone, and the explicit block-diagonal mask), through the lorakit trainer and the HF path."""

from __future__ import annotations

import random

import pytest
import torch

import lorakit
from lorakit.core.driver import loader_batches
from lorakit.core.loss import model_loss
from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig
from lorakit.train.data import IGNORE_INDEX, collate, collate_packed, pack, packing_mask
from lorakit.train.trainer import train
from tests.tiny_models import KINDS, VOCAB, perturb, trainable

LENGTHS = (5, 9, 3, 7, 12, 4, 16, 2)


def features(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    """Random token sequences, each supervised after a random prompt."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        prompt = rng.randrange(1, n)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_rows_hold_every_example_whole_best_fit_decreasing() -> None:
    feats = features()
    rows = pack(feats, 16)
    assert [len(r["input_ids"]) for r in rows] == [16, 16, 16, 10]  # 16 | 12+4 | 9+7 | 5+3+2
    seen = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for a, b in zip(starts, [*starts[1:], len(row["input_ids"])]):
            assert row["position_ids"][a:b] == list(range(b - a))  # positions restart per example
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the example before it
            seen.append((row["input_ids"][a:b], row["labels"][a + 1:b]))
    assert sorted(seen) == sorted((f["input_ids"], f["labels"][1:]) for f in feats)
    assert pack(feats, 16) == rows  # deterministic
    with pytest.raises(ConfigError, match="more than the packed rows"):
        pack(feats, 15)
    with pytest.raises(ConfigError, match="classification"):
        pack([{"input_ids": [3, 4], "labels": 1}], 16)
    with pytest.raises(ConfigError, match="packing=True"):
        TrainConfig(max_length=16)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(kind: str, attention: str) -> None:
    model = KINDS[kind].build()
    model.config._attn_implementation = attention
    lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    perturb(model)  # B != 0: every adapter tensor gets a gradient
    model.train()
    feats = features()
    rows = pack(feats, 16)

    def loss_and_grads(inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model_loss(model, inputs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable(model).values()]

    reference, grads = loss_and_grads(collate(feats, 0).inputs)
    assert packing_mask(model) is None  # transformers' masks read packing from the position ids
    explicit = torch.bool if attention == "sdpa" else torch.float32
    for mask in (None, explicit):  # position ids alone, and the block-diagonal mask for models that need one
        loss, packed_grads = loss_and_grads(collate_packed(rows, 0, mask).inputs)
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
        for g, ref in zip(packed_grads, grads):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    packed = collate_packed(rows, 0).inputs  # the same rows with positions counting on: examples see each other
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    with torch.no_grad():
        assert (model(**leaky).logits - model(**packed).logits).abs().max() > 0.1


def test_trainer_step_on_packed_rows_equals_the_unpacked_step() -> None:
    """One step over all examples: padded (one batch of 8) and packed (one batch of 4 rows) train the same."""
    feats = features()
    results = {}
    for packing in (False, True):
        model = KINDS["llama"].build()
        lorakit.attach(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
        config = TrainConfig(steps=2, batch_size=len(feats) if not packing else 4, lr=1e-2, packing=packing,
                             max_length=16 if packing else None, log_every=0, progress=False)
        result = train(model, feats, config, pad_token_id=0)
        results[packing] = (result, {n: p.detach().clone() for n, p in trainable(model).items()})
    (plain, plain_weights), (packed, packed_weights) = results[False], results[True]
    assert packed.losses == pytest.approx(plain.losses, rel=1e-5)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, rtol=1e-4, atol=1e-6)
    assert packed.padded_tokens_per_second / packed.tokens_per_second < plain.padded_tokens_per_second / (
        plain.tokens_per_second)  # less padding per real token
    with pytest.raises(ConfigError, match="pass no collate"):
        train(model, feats, TrainConfig(steps=1, packing=True, progress=False), collate=lambda f: collate(f, 0))


def test_padding_free_init_batches_run_without_a_kv_cache() -> None:
    """A data-driven init (HF callback) on TRL-style padding-free batches gets the same gradients as on padded
    ones: `loader_batches` turns the KV cache off, which would otherwise hide the packing."""
    feats = features()
    flat = collate_packed(pack(feats, sum(LENGTHS)), 0).inputs  # one flattened row, as TRL's padding-free collator
    flat.pop("use_cache")
    (init_batch,) = loader_batches([flat], 1)
    assert init_batch["use_cache"] is False
    weights = []
    for batch in (collate(feats, 0).inputs, init_batch):
        model = KINDS["llama"].build()
        lorakit.attach(model, lorakit.LoraGaConfig(r=2, target_modules=["q_proj", "v_proj"], exact=True), data=[batch])
        weights.append({n: p.detach().clone() for n, p in trainable(model).items()})
    for name, weight in weights[0].items():
        torch.testing.assert_close(weights[1][name], weight, rtol=1e-3, atol=1e-5)


def test_models_without_transformers_masks_get_an_explicit_block_mask() -> None:
    class Custom(torch.nn.Module):  # its module does not build masks with transformers.masking_utils
        def __init__(self, attention: str) -> None:
            super().__init__()
            self.config = type("Config", (), {"_attn_implementation": attention})()
            self.proj = torch.nn.Linear(2, 2, dtype=torch.bfloat16)

    assert packing_mask(Custom("sdpa")) is torch.bool
    assert packing_mask(Custom("eager")) is torch.bfloat16
    assert packing_mask(Custom("flash_attention_2")) is None  # cu_seqlens from the position ids
    mask = collate_packed(pack(features((3, 2)), 8), 0, torch.bool).inputs["attention_mask"]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask[0, 0], expected.bool())


def test_lorakit_trainer_with_a_flattening_collator_trains_as_on_padded_batches(tmp_path) -> None:
    """transformers' padding-free DataCollatorWithFlattening through LorakitTrainer trains the same adapter as padded
    batches of the same examples, even with ``use_cache=True`` in the arguments (the mixin turns the cache off on
    such batches; a cache would hide the packing)."""
    from transformers import DataCollatorWithFlattening, TrainingArguments

    from lorakit.integrations.hf import LorakitCallback, LorakitTrainer

    feats = features()
    weights = []
    for name, collator in (("padded", lambda rows: collate(rows, 0).inputs), ("flat", DataCollatorWithFlattening())):
        model = KINDS["llama"].build()
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                 logging_strategy="no", seed=0, use_cache=True)
        trainer = LorakitTrainer(model=model, args=args, train_dataset=feats, data_collator=collator,
                                 callbacks=[LorakitCallback(lorakit.LoraConfig(r=4, target_modules="all-linear"))])
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in trainable(model).items()})
    for name, weight in weights[0].items():
        torch.testing.assert_close(weights[1][name], weight, rtol=1e-4, atol=1e-6)
