"""Boosting, chaining and structured methods: XGBLoRA, Chain of LoRA, Bone/MiSS and GLoRA, each on its defining
property.  Training goes through the hooks (`tests.test_optimizer_methods.train`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open

import lorakit
from lorakit.core.layer import keep_original
from lorakit.methods.adaptive import block_index
from lorakit.methods.glora import format_support, search
from lorakit.methods.xgblora import BoosterLayer
from lorakit.train.trainer import TrainConfig
from lorakit.train.trainer import train as run_trainer
from tests.test_optimizer_methods import train
from tests.test_trainer import lm_features
from tests.tiny_models import KINDS, assert_close, output

LLAMA = KINDS["llama"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def cosine_schedule(total: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * step / total))


def exported_rank(directory: Path) -> int:
    return json.loads((directory / "adapter_config.json").read_text())["r"]


def check_export_reproduces(model: torch.nn.Module, directory: Path) -> None:
    """base + exported update (PEFT on the untouched base) == the trained lorakit model."""
    x = LLAMA.inputs()
    lorakit.export_peft(model, directory)
    peft_model = PeftModel.from_pretrained(LLAMA.build(0), str(directory)).eval()
    assert_close(output(peft_model, x), output(model, x), 1e-5, "base + exported update")


# -- XGBLoRA -------------------------------------------------------------------------------------------
def test_xgblora_rounds_merge_and_export(tmp_path: Path) -> None:
    T, kappa, r = 3, 2, 1
    with keep_original():  # merged rounds recompute the residual from the kept W0, bit for bit
        model = lorakit.attach(LLAMA.build(0), lorakit.XgbLoraConfig(r=r, alpha=2, kappa=kappa, shrinkage=0.7,
                                                                     target_modules=TARGETS, seed=1,
                                                                     layer_fraction=1.0))  # every block each round
    hooks = lorakit.hooks(model)
    layers = {n: layer for n, layer in lorakit.adapter_layers(model).items() if isinstance(layer, BoosterLayer)}
    base = output(model, LLAMA.inputs())
    resets = []
    original_build = hooks.build_optimizer

    def counting_build(*args, **kwargs):  # the loop would rebuild the optimizer if a round asked for it
        resets.append(hooks.round)
        return original_build(*args, **kwargs)
    hooks.build_optimizer = counting_build
    losses = train(model, LLAMA.batches(n=1), steps=T * kappa, lr=2e-2, schedule=cosine_schedule(T * kappa))

    assert hooks.round == T and resets == [0]  # one optimizer; each round clears only the boosters' state
    assert losses[-1] < losses[0]
    for layer in layers.values():
        assert layer.merged_rank == T * r
        assert not layer.lora_B.any()  # the last booster was merged and discarded
        # W = W0 + Σ_t ν s B_t A_t, recomputed from the untouched W0
        merged = layer.original_weight - layer.base_offset_B @ layer.base_offset_A
        assert torch.equal(layer.base.weight, merged)
    trained = output(model, LLAMA.inputs())
    assert (trained - base).abs().max() > 1e-3

    check_export_reproduces(model, tmp_path / "peft")
    assert exported_rank(tmp_path / "peft") == T * r

    lorakit.save(model, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "adapter_model.safetensors"), framework="pt") as f:
        offsets = [k for k in f.keys() if k.endswith("base_offset_B")]
        assert len(offsets) == len(layers) and all(f.get_slice(k).get_shape()[1] == T * r for k in offsets)
        assert not any(k.endswith("base.weight") for k in f.keys())  # factors only, no full weights
    loaded = lorakit.load(LLAMA.build(0), tmp_path / "saved")
    assert_close(output(loaded, LLAMA.inputs()), trained, 1e-5, "load")
    lorakit.detach(model)
    assert torch.equal(output(model, LLAMA.inputs()), base)


def test_xgblora_shrinkage_and_random_layer_subsets() -> None:
    model = lorakit.attach(LLAMA.build(0), lorakit.XgbLoraConfig(r=2, kappa=1, layer_fraction=0.5, shrinkage=0.5,
                                                                 target_modules=TARGETS, init_weights=False))
    hooks = lorakit.hooks(model)
    layers = lorakit.adapter_layers(model)
    n_active = len(TARGETS)  # one of the two blocks: every targeted matrix of it
    subsets = []
    for _ in range(4):
        assert len(hooks.active) == n_active and len({block_index(n) for n in hooks.active}) == 1
        for name, layer in layers.items():
            assert layer.lora_A.requires_grad == layer.lora_B.requires_grad == (name in hooks.active)
        subsets.append(tuple(hooks.active))
        live = {n: (layer.scale * layer.lora_B @ layer.lora_A).detach() for n, layer in layers.items()}
        before = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
        hooks.after_step(0)  # κ = 1: the round ends, ν·s·B A is merged into every layer with a live booster
        for name, layer in layers.items():
            assert torch.allclose(layer.base.weight, before[name] + 0.5 * live[name], atol=1e-6), name
    assert len(set(subsets)) > 1  # a new random subset each round (seeded)


def test_xgblora_default_boosts_the_papers_11_of_32_blocks_per_round() -> None:
    """The default layer_fraction is the paper's best L_s = 11 of LLaMA3-8B's 32 layers (Table 6): on a 32-block
    model each round boosts every targeted matrix of 11 distinct blocks, a fresh seeded draw per round."""
    from transformers import LlamaConfig, LlamaForCausalLM
    assert lorakit.XgbLoraConfig().layer_fraction == 11 / 32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=32,
                         num_attention_heads=2, num_key_value_heads=2)
    model = lorakit.attach(LlamaForCausalLM(config), lorakit.XgbLoraConfig(kappa=1, target_modules=("q_proj", "v_proj")))
    hooks = lorakit.hooks(model)
    drawn = []
    for step in range(3):
        blocks = {block_index(n) for n in hooks.active}
        assert len(blocks) == 11 and len(hooks.active) == 22
        drawn.append(frozenset(blocks))
        hooks.after_step(step)
    assert len(set(drawn)) == 3


def test_xgblora_patience_ends_round_on_plateau_in_the_lorakit_trainer() -> None:
    """The plateau rule gets its losses from the trainer's ``after_loss`` (model_loss bypasses the top-level
    forward, so a forward hook would see nothing)."""
    model = lorakit.attach(LLAMA.build(0), lorakit.XgbLoraConfig(r=1, kappa=50, patience=3, min_improvement=1e-6,
                                                                 target_modules=TARGETS, init_weights=False))
    hooks = lorakit.hooks(model)
    # one batch of all 8 examples per step and a negligible lr: the loss does not move, so it plateaus at once
    run_trainer(model, lm_features(8), TrainConfig(steps=6, batch_size=8, lr=1e-12, progress=False, log_every=0))
    assert hooks.round == 1  # step 1 sets the best loss, steps 2-4 are stale: the round ends after step 4
    assert hooks.round_steps == 2 and hooks.smoothed is not None and hooks.stale == 1  # steps 5 (best), 6 (stale)
    assert all(layer.merged_rank == 1 for layer in lorakit.adapter_layers(model).values())


def test_xgblora_patience_gets_the_loss_from_the_hf_trainer_mixin(tmp_path: Path) -> None:
    from transformers import default_data_collator

    from lorakit.integrations.hf import LorakitCallback, LorakitTrainer
    from tests.test_hf_callback import args, dataset

    model = LLAMA.build(0)
    config = lorakit.XgbLoraConfig(r=1, kappa=50, patience=2, min_improvement=1.0, target_modules=TARGETS)
    trainer = LorakitTrainer(model=model, args=args(tmp_path, 3, learning_rate=1e-6), train_dataset=dataset(8),
                             data_collator=default_data_collator, callbacks=[LorakitCallback(config)])
    trainer.train()
    hooks = lorakit.hooks(model)
    # κ = 50 is never reached: the round ended on the plateau (steps 2 and 3 improve by < 1.0), so the hooks saw
    # the Trainer's losses
    assert hooks.round == 1 and hooks.round_steps == 0 and not hooks.pending


def test_xgblora_round_resets_only_the_boosters_optimizer_state() -> None:
    """At a round's end the boosters restart Adam (moments and step), the classifier head keeps its state."""
    kind = KINDS["bert"]
    model = lorakit.attach(kind.build(0), lorakit.XgbLoraConfig(r=1, kappa=2, target_modules=("query", "value"),
                                                                modules_to_save=kind.modules_to_save,
                                                                layer_fraction=1.0))
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(3)
    opt = hooks.build_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    boosters = hooks.booster_params()
    assert head and len(boosters) == 8
    batch = kind.batches(n=1)[0]
    for step in range(3):
        model(**batch).loss.backward()
        opt.step()
        hooks.after_step(step)  # the round ends after step 2 (κ = 2)
        opt.zero_grad()
    assert hooks.round == 1 and not hooks.optimizer_reset_requested  # nothing to rebuild
    assert all(float(opt.state[p]["step"]) == 3 for p in head)  # the head's Adam state runs on
    assert all(float(opt.state[p]["step"]) == 1 for p in boosters)  # the boosters restarted after step 2


# -- Chain of LoRA ----------------------------------------------------------------------------------------
def test_cola_links_merge_and_export(tmp_path: Path) -> None:
    M, steps, r = 3, 6, 2
    model = lorakit.attach(LLAMA.build(0), lorakit.ColaConfig(r=r, num_links=M, target_modules=TARGETS))
    hooks = lorakit.hooks(model)
    train(model, LLAMA.batches(), steps=steps, lr=2e-2)
    assert hooks.round == M
    for layer in lorakit.adapter_layers(model).values():
        assert layer.merged_rank == M * r and not layer.lora_B.any()
        assert layer.lora_A.requires_grad  # every layer is in every link
    check_export_reproduces(model, tmp_path)
    assert exported_rank(tmp_path) == M * r


# -- GLoRA ---------------------------------------------------------------------------------------------------
def test_glora_supernet_samples_supports_per_step() -> None:
    kind = KINDS["mlp"]
    model = lorakit.attach(kind.build(0), lorakit.GloraConfig(r=2, supernet=True))
    hooks = lorakit.hooks(model)
    layers = lorakit.adapter_layers(model)
    model.train()
    seen = []
    for step in range(6):
        hooks.before_forward(step)
        seen.append(tuple(format_support(layer.sampled) for layer in layers.values()))
        hooks.after_step(step)
        assert all(layer.sampled is None for layer in layers.values())
    assert len(set(seen)) > 1
    hooks.before_forward(2)
    assert tuple(format_support(layer.sampled) for layer in layers.values()) == seen[2]  # seeded by step
    model.eval()  # evaluation uses the layer's fixed support, not the sample
    assert all(layer.current_support() == layer.support for layer in layers.values())


def test_glora_evolutionary_search_finds_the_best_supports(tmp_path: Path) -> None:
    kind = KINDS["mlp"]
    model = lorakit.attach(kind.build(0), lorakit.GloraConfig(r=2, supernet=True, modules_to_save=()))
    train(model, kind.batches(), steps=6, lr=1e-2)
    layers = lorakit.adapter_layers(model)

    def fitness(m: torch.nn.Module) -> float:  # a known optimum: every path "none" except A = lora
        return sum((c == "lora") if p == "A" else (c == "none")
                   for layer in layers.values() for p, c in layer.support.items())
    chosen = search(model, [], score_fn=fitness, population=20, select=5, mutations=8, crossovers=8, generations=15)
    assert set(chosen.values()) == {"A=lora,B=none,C=none,D=none,E=none"}
    assert lorakit.get_state(model).config.supports == chosen  # kept in the config, so `save` keeps it

    # a real search on validation loss, then re-parameterisation into W and b and a save/load round trip
    chosen = search(model, kind.batches(n=2, seed=900), population=6, select=3, mutations=3, crossovers=3,
                    generations=2, max_params=10_000)
    x = kind.inputs()
    adapted = output(model, x)
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(kind.build(0), tmp_path)
    assert {n: format_support(layer.support) for n, layer in lorakit.adapter_layers(loaded).items()} == chosen
    assert_close(output(loaded, x), adapted, 1e-5, "load")
    merged = lorakit.merge_and_unload(model)
    assert_close(output(merged, x), adapted, 1e-5, "re-parameterised")
