"""`lorakit.integrations.hf`: the lorakit hooks inside a real ``transformers.Trainer`` run on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import lorakit
from lorakit.errors import LorakitError
from lorakit.integrations.hf import LorakitCallback, LorakitTrainer
from tests.tiny_models import KINDS

SEQ = 8


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 128, (SEQ,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()})
    return rows


def args(tmp_path, steps: int, **changes) -> TrainingArguments:
    kw = dict(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
              lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
              disable_tqdm=True, seed=0, dataloader_num_workers=0)
    kw.update(changes)
    return TrainingArguments(**kw)


def record_hooks(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Wrap the attached method's hooks so that every call is recorded as (name, step)."""
    hooks, calls = lorakit.hooks(model), []
    for name in ("on_train_begin", "before_forward", "after_backward", "after_step"):
        original = getattr(hooks, name)

        def spy(arg, _name=name, _original=original):
            calls.append((_name, arg))
            return _original(arg)
        setattr(hooks, name, spy)
    return calls


def test_trainer_with_callback_runs_lora_sb_init_on_its_dataloader_and_calls_the_hooks(tmp_path):
    model = KINDS["llama"].build(0)
    init_batches = []

    def init_loss(m, batch):
        init_batches.append(batch["input_ids"].shape)
        return m(**batch).loss

    callback = LorakitCallback(lorakit.LoraSbConfig(r=4, init_lr=1e-3), init_batches=2, loss_fn=init_loss)
    trainer = Trainer(model=model, args=args(tmp_path, 10, learning_rate=2e-2), train_dataset=dataset(),
                      data_collator=default_data_collator, callbacks=[callback])
    layers = lorakit.adapter_layers(model)  # attached by the callback at the end of Trainer.__init__
    assert layers and all(not layer.lora_B.any() for layer in layers.values())  # init deferred to train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    calls = record_hooks(model)

    trainer.train()
    assert init_batches == [(4, SEQ), (4, SEQ)]  # the trainer's own batches fed the gradient init
    assert all(layer.lora_B.any() for layer in layers.values())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == trainable  # the optimizer holds exactly the adapter's r x r cores
    expected = [("on_train_begin", 10)] + [(name, s) for s in range(10)
                                           for name in ("before_forward", "after_backward", "after_step")]
    assert calls == expected
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.3


def test_methods_that_need_the_loss_or_optimizer_ask_for_lorakit_trainer(tmp_path):
    for config, need in ((lorakit.LoraPlusConfig(r=4), "its own optimizer"),
                         (lorakit.XgbLoraConfig(r=2), "a regularizer")):
        trainer = Trainer(model=KINDS["llama"].build(0), args=args(tmp_path, 2), train_dataset=dataset(8),
                          data_collator=default_data_collator, callbacks=[LorakitCallback(config)])
        with pytest.raises(LorakitError, match=f"{need}.*LorakitTrainer"):
            trainer.train()

    model = KINDS["llama"].build(0)
    trainer = LorakitTrainer(model=model, args=args(tmp_path, 2), train_dataset=dataset(8),
                             data_collator=default_data_collator,
                             callbacks=[LorakitCallback(lorakit.LoraPlusConfig(r=4, lr_ratio=16.0))])
    trainer.train()
    lrs = sorted({g["initial_lr"] for g in trainer.optimizer.param_groups})
    assert lrs == pytest.approx([1e-2, 1.6e-1])  # LoRA+'s B matrices get lr_ratio x the lr


def test_lorakit_trainer_adds_the_regularizer_and_resets_the_optimizer_between_rounds(tmp_path):
    model = KINDS["llama"].build(0)
    config = lorakit.XgbLoraConfig(r=2, kappa=2, booster_l2=0.1, layer_fraction=0.5)
    trainer = LorakitTrainer(model=model, args=args(tmp_path, 5), train_dataset=dataset(8),
                             data_collator=default_data_collator, callbacks=[LorakitCallback(config)])
    hooks = lorakit.hooks(model)
    batch = default_data_collator(dataset(4))
    model.train()
    expected = model(**batch).loss + hooks.regularizer()
    assert torch.allclose(trainer.compute_loss(model, batch), expected)

    trainer.train()
    assert hooks.round == 2  # rounds ended after steps 2 and 4, each with a merge and an optimizer reset
    rounds = [h["lorakit/round"] for h in trainer.state.log_history if "lorakit/round" in h]
    assert rounds[:5] == [0.0, 1.0, 1.0, 2.0, 2.0]
    active = {id(p) for p in model.parameters() if p.requires_grad}
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert active <= optimized  # boosters of later rounds joined the optimizer


def test_callback_without_config_needs_an_attached_model(tmp_path):
    with pytest.raises(LorakitError, match="without a config"):
        Trainer(model=KINDS["llama"].build(0), args=args(tmp_path, 1), train_dataset=dataset(4),
                data_collator=default_data_collator, callbacks=[LorakitCallback()])


def test_trl_sft_trainer_with_callback_runs_the_gradient_init_and_learns(tmp_path):
    """TRL's ``SFTTrainer`` (pre-tokenized data, its own collator) with LoRA-GA attached by the callback."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorakit.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id))
    rows = [{"input_ids": row["input_ids"].tolist()} for row in dataset(16)]
    config = SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2,
                       lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                       disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callback = LorakitCallback(lorakit.LoraGaConfig(r=2), init_batches=2)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[callback])
    layers = lorakit.adapter_layers(model)
    assert layers and all(not layer.lora_B.any() for layer in layers.values())  # init deferred to train()
    trainer.train()
    assert all(layer.lora_B.any() for layer in layers.values())  # LoRA-GA's init ran on SFTTrainer's batches
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < losses[0]
