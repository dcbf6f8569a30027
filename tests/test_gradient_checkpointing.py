"""Gradient checkpointing (``TrainConfig.gradient_checkpointing``, ``--gradient-checkpointing``, the HF callback):
every method trains exactly as without it, random draws in the forward (dropout, DyLoRA's rank, Flat-LoRA's noise,
GLoRA's supernet path) included, because the recomputation in backward draws the same numbers."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.driver import step_loss
from lorakit.errors import ConfigError
from lorakit.io.persistence import adapter_tensors
from lorakit.train.trainer import TrainConfig, train
from tests import tiny_models as tiny
from tests.tiny_models import KINDS, TinyMLP

LLAMA = KINDS["llama"]
# Options that make each method's forward random (and its hooks act within a 3-step run).
RANDOM_FORWARD = {"dylora": {"r_min": 1}, "flat-lora": {"sigma": 0.05}, "glora": {"supernet": True},
                  "prilora": {"final_steps": 1, "prune_interval": 1}}


def features(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, tiny.VOCAB, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def build(name: str) -> torch.nn.Module:
    method = lorakit.get_method(name)
    changes = {"dropout": 0.1, **{k: v for k, v in RANDOM_FORWARD.get(name, {}).items()
                                   if k in method.config_class.__dataclass_fields__}}
    model = tiny.attach(LLAMA.build(0), method, LLAMA, **changes)
    if hasattr(lorakit.hooks(model), "set_validation_data"):  # ALoRA scores ranks on held-out batches
        lorakit.hooks(model).set_validation_data(LLAMA.batches(2, seed=300))
    return model


def first_step_grads(model: torch.nn.Module, checkpointing: bool) -> dict[str, torch.Tensor]:
    """The gradients of the first training step's loss (hooks called as the trainer calls them)."""
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(3)
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    torch.manual_seed(0)
    hooks.before_forward(0)
    loss, reg = step_loss(model, LLAMA.batches(1)[0], hooks)
    (loss if reg is None else loss + reg).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(lorakit.methods()))
def test_every_method_gets_the_same_gradients_and_training_with_checkpointing(name):
    plain, ckpt = first_step_grads(build(name), False), first_step_grads(build(name), True)
    assert plain and plain.keys() == ckpt.keys()
    for key in plain:
        tiny.assert_close(ckpt[key], plain[key], 1e-6, f"{name} grad {key}")

    runs, calls = [], []
    for checkpointing in (False, True):
        model = build(name)
        if checkpointing:  # count the layers' training forwards: recomputation runs each one twice
            model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
                lambda *_: calls.append(1) if torch.is_grad_enabled() else None)
        result = train(model, features(), TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=1e-2, progress=False,
                                                      gradient_checkpointing=checkpointing))
        runs.append((result.losses, adapter_tensors(model), lorakit.hooks(model).state_dict()[1]))
        assert not model.is_activation_checkpointing  # the run put the model back as it found it
    (losses, adapter, hook_tensors), (ckpt_losses, ckpt_adapter, ckpt_hook_tensors) = runs
    assert len(calls) == 2 * 3 * 2  # 3 steps x 2 micro-batches, each layer run in forward and again in backward
    assert ckpt_losses == pytest.approx(losses, abs=1e-6)
    for key in adapter:
        tiny.assert_close(ckpt_adapter[key], adapter[key], 1e-6, f"{name} adapter {key}")
    assert hook_tensors.keys() == ckpt_hook_tensors.keys()
    for key in hook_tensors:  # EMAs and moments (PRILoRA's input norms, AdaLoRA's sensitivities) saw each batch once
        tiny.assert_close(ckpt_hook_tensors[key], hook_tensors[key], 1e-6, f"{name} hook state {key}")


def test_a_model_without_checkpointing_support_is_refused():
    model = lorakit.attach(TinyMLP(), lorakit.LoraConfig(r=2, target_modules=["lin1"]))
    feats = [{"input": torch.randn(16).tolist(), "labels": 1}] * 4
    with pytest.raises(ConfigError, match=r"gradient_checkpointing=True needs a transformers model.*TinyMLP"):
        train(model, feats, TrainConfig(steps=1, batch_size=2, group_by_length=False, progress=False,
                                        gradient_checkpointing=True))


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_trainer_with_gradient_checkpointing_trains_the_same_adapter(tmp_path, reentrant):
    """``TrainingArguments(gradient_checkpointing=True)`` through `LorakitCallback`: the same adapter (dropout on).
    Reentrant: the model is made to look like one transformers does not hook (as transformers 4 treats every
    model), so the callback alone must make the checkpointed blocks' input require grad."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from lorakit.integrations.hf import LorakitCallback

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(3, tiny.VOCAB, (8, 8), generator=g)]
    adapters = []
    for checkpointing in (False, True):
        model = LLAMA.build(0)
        if reentrant:
            model.main_input_name = "inputs_embeds"
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 seed=0, gradient_checkpointing=checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                          callbacks=[LorakitCallback(lorakit.LoraConfig(r=4, dropout=0.1))])
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        adapters.append(adapter_tensors(model))
    plain, ckpt = adapters
    for key in plain:
        tiny.assert_close(ckpt[key], plain[key], 1e-6, f"adapter {key}")
        assert not key.endswith("lora_B") or ckpt[key].abs().max() > 0, f"{key} never got a gradient"


def test_cli_flags_reach_the_run_config():
    from lorakit.cli import build_parser, run_config

    parser = build_parser()
    flagged = run_config(parser.parse_args(["train", "--gradient-checkpointing", "--fsdp"]))
    assert flagged.gradient_checkpointing is True and flagged.fsdp is True
    plain = run_config(parser.parse_args(["train"]))
    assert plain.gradient_checkpointing is False and plain.fsdp is False
