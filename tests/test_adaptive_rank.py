"""The defining property of each adaptive-rank method (AdaLoRA, LoRA², ALoRA, DyLoRA, PRILoRA, SoRA), their exports
with per-layer ranks (PEFT ``rank_pattern``) and with zero padding (vLLM), both loaded in PEFT, budget errors, and
the rank-allocation plots."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn

import lorakit
from lorakit.methods.adalora import SvdBudgetHooks
from lorakit.methods.alora import AloraHooks
from lorakit.methods.dylora import set_rank
from lorakit.methods.lora2 import semi_orthogonal
from lorakit.methods.prilora import depth_ranks
from lorakit.methods.sora import soft_threshold
from lorakit.train.rank_plots import draw_rank_allocation, rank_grid, rank_history
from tests.tiny_models import KINDS, assert_close, output, train_steps

LLAMA = KINDS["llama"]
MLP = KINDS["mlp"]


def attach(kind_name: str, config: lorakit.AdapterConfig) -> nn.Module:
    return lorakit.attach(KINDS[kind_name].build(0), config)


def closed_form_budget(step: int, b0: int, bT: int, ti: int, tf: int, T: int) -> int:
    """Paper eq. 12 with PEFT's step conventions."""
    if step <= ti:
        return b0
    if step > T - tf:
        return bT
    return int(bT + (b0 - bT) * (1 - (step - ti) / (T - tf - ti)) ** 3)


# -- AdaLoRA / LoRA² ---------------------------------------------------------------------------------------------
SVD_CONFIGS = {
    "adalora": lambda **kw: lorakit.AdaLoraConfig(r=4, target_r=2, **kw),
    "lora2": lambda **kw: lorakit.Lora2Config(r=4, target_r=2, inner_r=4, **kw),
}


@pytest.mark.parametrize("method", list(SVD_CONFIGS))
def test_budget_follows_cubic_schedule_and_final_mask_is_frozen(method: str) -> None:
    T, ti, tf = 16, 2, 4
    model = attach("mlp", SVD_CONFIGS[method](tinit=ti, tfinal=tf, delta_t=1, seed=3))
    hooks = lorakit.hooks(model)
    assert isinstance(hooks, SvdBudgetHooks)
    b0, bT = hooks.initial_budget, hooks.target_budget
    assert (b0, bT) == (12, 6)
    hooks.on_train_begin(T)
    assert [hooks.schedule(t)[0] for t in range(T)] == [closed_form_budget(t, b0, bT, ti, tf, T) for t in range(T)]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batches = MLP.batches(4)
    final_ranks = None
    model.train()
    for step in range(T):
        loss = model(**batches[step % 4]).loss + hooks.regularizer()
        loss.backward()
        opt.step()
        hooks.after_step(step)
        opt.zero_grad()
        total = sum(layer.rank for layer in lorakit.adapter_layers(model).values())
        if ti < step < T - tf:  # masked to the budget at this step (no ties with random data)
            assert total == hooks.schedule(step)[0] == hooks.metrics()["total_rank"]
        if step == T - tf:
            final_ranks = {n: layer.lora_E.detach().ne(0).tolist() for n, layer in lorakit.adapter_layers(model).items()}
            assert total == bT
        if step > T - tf:  # the final mask is re-applied: same zeros whatever the gradients did
            assert {n: layer.lora_E.detach().ne(0).tolist()
                    for n, layer in lorakit.adapter_layers(model).items()} == final_ranks
    assert hooks.final_mask == final_ranks
    assert hooks.metrics()["budget"] == bT


@pytest.mark.parametrize("method", list(SVD_CONFIGS))
def test_masking_keeps_the_globally_highest_scores(method: str) -> None:
    model = attach("mlp", SVD_CONFIGS[method]())
    hooks = lorakit.hooks(model)
    layers = lorakit.adapter_layers(model)
    names = list(layers)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_E.fill_(1.0)
    # per-triplet scores through λ's EMA only: the first layer's triplets beat all others -> all of them are kept
    for i, name in enumerate(names):
        for key, p in layers[name].importance_tensors().items():
            score = torch.arange(1.0, 5.0) + (100.0 if i == 0 else 10.0 * i) if key == "lora_E" else torch.zeros_like(p)
            hooks.ema[f"{name}.{key}"] = score
            hooks.unc[f"{name}.{key}"] = torch.ones_like(p)
    scores = hooks.scores()
    keep = hooks.mask_to_budget(6)
    assert sum(sum(k) for k in keep.values()) == 6
    assert all(keep[names[0]])  # the best layer keeps all 4 ...
    flat = sorted(((s, n, i) for n in names for i, s in enumerate(scores[n].tolist())), reverse=True)
    top = {(n, i) for _, n, i in flat[:6]}
    for n in names:
        for i, kept in enumerate(keep[n]):
            assert kept == ((n, i) in top)
            assert bool(layers[n].lora_E[i] != 0) == kept


def test_adalora_regularizer_is_zero_for_orthonormal_factors() -> None:
    model = attach("mlp", lorakit.AdaLoraConfig(r=4, target_r=2))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lorakit.adapter_layers(model).values():
            layer.lora_A.copy_(semi_orthogonal(4, layer.in_features, g))
            layer.lora_B.copy_(semi_orthogonal(layer.out_features, 4, g))
    assert float(lorakit.hooks(model).regularizer().detach()) < 1e-5


def _set_planes(layer: nn.Module, q_rows: torch.Tensor, p_cols: torch.Tensor) -> None:
    """Planes Q (rows = ``q_rows``, k×d) and P (columns = ``p_cols``, d×k) with orthonormal factors."""
    k, r = layer.lora_A1.shape[0], layer.lora_E.numel()
    eye = torch.eye(r, k)
    layer.lora_A1.copy_(q_rows)
    layer.lora_B1.copy_(eye)  # r×k, orthonormal columns
    layer.lora_A2.copy_(eye.T)  # k×r, orthonormal rows
    layer.lora_B2.copy_(p_cols)


def test_lora2_defaults_are_the_official_sst2_script_row_of_the_documented_table() -> None:
    """Lora2Config() = the SST-2 row of the per-task table in lorakit.methods.lora2's docstring (r, final budget,
    α, γ; official ``run_debertav3_sst2.sh``), k = 8, and the planes drawn from N(0, 0.02²) as the official code."""
    doc = sys.modules[lorakit.Lora2Config.__module__].__doc__ or ""
    rows = {line.split()[0]: line.split()[1:] for line in doc.splitlines() if line.startswith("      ")}
    r, target, alpha, gamma = rows["SST-2"][:4]
    config = lorakit.Lora2Config()
    assert (config.r, config.target_r, config.alpha, config.orth_reg_weight) == (int(r), int(target), float(alpha),
                                                                                float(gamma))
    assert (config.inner_r, config.plane_init) == (8, "normal")
    assert rows["CoLA"][:3] == ["4", "3", "32"] and rows["MRPC"][:3] == ["8", "1", "32"]  # α, r differ by task
    layer = lorakit.adapter_layers(attach("mlp", lorakit.Lora2Config(target_modules=("lin1",))))["lin1"]
    factors = torch.cat([getattr(layer, k).flatten() for k in ("lora_A1", "lora_B1", "lora_A2", "lora_B2")])
    assert float(factors.std()) == pytest.approx(0.02, rel=0.15) and float(factors.mean()) == pytest.approx(0, abs=5e-3)


@torch.no_grad()
def test_lora2_regularizer_zero_for_orthonormal_disjoint_planes() -> None:
    model = attach("mlp", lorakit.Lora2Config(r=4, inner_r=2, target_modules=("lin1",)))  # lin1: 32 -> 32, square
    layer = lorakit.adapter_layers(model)["lin1"]
    eye = torch.eye(32)
    hooks = lorakit.hooks(model)
    _set_planes(layer, eye[:2], eye[:, 2:4])  # Q spans e0, e1; P spans e2, e3: orthogonal planes
    assert float(hooks.regularizer()) < 1e-7
    _set_planes(layer, eye[:2], eye[:, 1:3])  # shares e1: each plane still orthonormal, only the cross term is left
    terms = layer.orth_terms()
    assert all(float(t) < 1e-7 for t in terms[:4])
    assert float(terms[4]) == pytest.approx(1.0)  # ‖Q P‖_F = |<e1, e1>|
    assert float(hooks.regularizer()) == pytest.approx(0.1 * 1.0 / 5)


def test_lora2_scores_only_small_matrices() -> None:
    config = {"r": 4, "target_r": 2}
    ada = lorakit.hooks(attach("llama", lorakit.AdaLoraConfig(**config)))
    l2_model = attach("llama", lorakit.Lora2Config(inner_r=4, **config))
    l2 = lorakit.hooks(l2_model)
    shapes = [(layer.out_features, layer.in_features) for layer in lorakit.adapter_layers(l2_model).values()]
    assert ada.scored_elements() == sum(4 * (d_in + d_out + 1) for d_out, d_in in shapes)
    assert l2.scored_elements() == len(shapes) * 4 * (2 * 4 + 1)
    train_steps(l2_model, LLAMA.batches(), steps=1, lr=0.01)
    assert {k.rsplit(".", 1)[-1] for k in l2.ema} == {"lora_B1", "lora_A2", "lora_E"}


@pytest.mark.slow
def test_lora2_scores_98_percent_fewer_elements_than_adalora_on_minilm() -> None:
    """The paper's "≈98.5 % fewer sensitivity computations", measured on MiniLM-L6 (36 matrices, d = 384/1536)."""
    from lorakit.models import load_model

    base, _ = load_model("minilm-l6", "classification", num_labels=2)
    targets = {"target_modules": ("query", "key", "value", "dense"), "modules_to_save": ("classifier",)}
    ada = lorakit.hooks(lorakit.attach(base, lorakit.AdaLoraConfig(r=8, **targets))).scored_elements()
    lorakit.detach(base)
    l2 = lorakit.hooks(lorakit.attach(base, lorakit.Lora2Config(r=8, inner_r=8, **targets))).scored_elements()
    assert (ada, l2) == (332_064, 4_896)
    assert 1 - l2 / ada == pytest.approx(0.985, abs=1e-3)


@pytest.mark.parametrize("method", list(SVD_CONFIGS))
def test_svd_budget_errors(method: str) -> None:
    make = SVD_CONFIGS[method]
    with pytest.raises(lorakit.ConfigError, match="larger than the initial rank"):
        make().replace(target_r=5)
    with pytest.raises(lorakit.ConfigError, match="zero budget"):
        make().replace(target_r=0)
    model = attach("mlp", make(tinit=6, tfinal=4))
    with pytest.raises(lorakit.TrainingError, match="does not fit"):
        lorakit.hooks(model).on_train_begin(10)


@pytest.mark.parametrize("method", list(SVD_CONFIGS))
def test_svd_budget_defaults_are_the_official_scale_and_a_schedule_scaled_with_the_run(method: str) -> None:
    """α = 16 (official scripts), and t_i, t_f, ΔT = 12 %, 46 %, 0.2 % of the run's steps unless given."""
    config = getattr(lorakit, {"adalora": "AdaLoraConfig", "lora2": "Lora2Config"}[method])()
    assert config.alpha == 16 and config.scale == 16 / config.r  # LoRA²: r = 8, scale 2
    hooks = lorakit.hooks(attach("mlp", SVD_CONFIGS[method]()))
    hooks.on_train_begin(400)
    assert (hooks.tinit, hooks.tfinal, hooks.delta_t) == (48, 184, 1)
    assert hooks.schedule(48) == (hooks.initial_budget, False) and hooks.schedule(400 - 183)[0] == hooks.target_budget
    hooks.on_train_begin(50_520)  # the official SST-2 run's length: its 6000 and 100 up to rounding; t_f is RTE's
    # share (0.46), 23 239 where the SST-2 script has 22 000
    assert (hooks.tinit, hooks.tfinal, hooks.delta_t) == (6062, 23239, 101)
    given = lorakit.hooks(attach("mlp", SVD_CONFIGS[method](tinit=5, tfinal=7, delta_t=3)))
    given.on_train_begin(400)
    assert (given.tinit, given.tfinal, given.delta_t) == (5, 7, 3)


# -- ALoRA -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_alora_prunes_negative_ranks_and_keeps_the_budget() -> None:
    model = attach("mlp", lorakit.AloraConfig(r=2, max_rank=4, prune_per_round=1, warmup_steps=1, prune_interval=1,
                                              prune_rounds=1))
    layers = lorakit.adapter_layers(model)
    hooks = lorakit.hooks(model)
    assert isinstance(hooks, AloraHooks)
    g = torch.Generator().manual_seed(0)
    for name in ("lin0", "lin1"):  # a harmful rank 0 (huge random update), a useless rank 1 (B = 0)
        layers[name].lora_B[:, 0] = 100 * torch.randn(layers[name].out_features, generator=g)
    hooks.set_validation_data(MLP.batches(2))
    scores = hooks.importance()
    assert scores["lin0"][0] < 0 and scores["lin1"][0] < 0, scores  # both hurt the validation loss
    assert scores["lin0"][1] == scores["lin2"][0] == 0.0  # B = 0: switching them off changes nothing
    budget = hooks.budget
    before = output(model, MLP.inputs())
    pruned = hooks.prune_and_reallocate()
    assert pruned == {"lin0": [0], "lin1": [0]}  # n_A = 1, but every negative rank goes
    assert hooks.budget == budget == 6  # constant total rank
    assert [layers[n].rank for n in ("lin0", "lin1", "lin2")] == [1, 1, 4]  # freed ranks -> the module that lost none
    assert layers["lin2"].lora_gate.tolist() == [1, 1, 1, 1]
    assert torch.equal(layers["lin2"].lora_B[:, 2:], torch.zeros(8, 2))  # new ranks start as LoRA ranks (B = 0)
    # pruning changed the output only by the removed ranks
    for name in ("lin0", "lin1"):
        layers[name].lora_gate[0] = 1
    layers["lin2"].lora_gate[2:] = 0
    assert_close(output(model, MLP.inputs()), before, 1e-6, "gates restored")


def test_alora_schedule_during_training_keeps_the_budget() -> None:
    config = lorakit.AloraConfig(r=2, max_rank=4, warmup_steps=2, prune_interval=2, prune_rounds=2, prune_per_round=2)
    model = attach("mlp", config)
    hooks = lorakit.hooks(model)
    train_steps(model, MLP.batches(3), steps=8, lr=0.5)  # scores on the captured training batches
    assert hooks.prune_steps == [2, 4] and hooks.rounds_done == 2
    assert hooks.budget == 6
    ranks = {n: layer.rank for n, layer in lorakit.adapter_layers(model).items()}
    assert {n: B.shape[1] for n, (B, _) in ((n, layer.as_lora()) for n, layer in
                                              lorakit.adapter_layers(model).items())} == ranks
    assert hooks.metrics()["total_rank"] == 6


def test_alora_budget_errors() -> None:
    with pytest.raises(lorakit.ConfigError, match="max_rank"):
        lorakit.AloraConfig(r=4, max_rank=2)
    model = attach("mlp", lorakit.AloraConfig(r=2, warmup_steps=5, prune_interval=5, prune_rounds=3))
    with pytest.raises(lorakit.TrainingError, match="longer than"):
        lorakit.hooks(model).on_train_begin(12)
    model = attach("mlp", lorakit.AloraConfig(r=2, prune_per_round=6))
    with pytest.raises(lorakit.TrainingError, match="whole budget"):
        lorakit.hooks(model).on_train_begin(100)
    model = attach("mlp", lorakit.AloraConfig(r=2, warmup_steps=0, prune_interval=1, prune_rounds=1))
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(4)
    model.eval()  # no training forward seen, no validation data given
    with pytest.raises(lorakit.TrainingError, match="set_validation_data"):
        hooks.after_step(0)


# -- DyLoRA ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_dylora_rank_b_forward_equals_truncated_adapter() -> None:
    r, alpha = 4, 8.0
    model = attach("llama", lorakit.DyLoraConfig(r=r, alpha=alpha, init_weights=False, seed=1))
    layers = lorakit.adapter_layers(model)
    x = LLAMA.inputs()
    for b in range(1, r + 1):
        set_rank(model, b)
        ours = output(model, x)
        reference = LLAMA.build(0)  # the truncated adapter merged by hand
        modules = dict(reference.named_modules())
        for name, layer in layers.items():
            modules[name].weight += (alpha / b) * layer.lora_B[:, :b] @ layer.lora_A[:b]
        assert_close(ours, output(reference, x), 1e-5, f"rank {b}")
        B, A = layers[name].as_lora()
        assert B.shape[1] == A.shape[0] == b


def test_dylora_sampling_scale_and_frozen_gradients() -> None:
    r, alpha = 6, 6.0
    model = attach("mlp", lorakit.DyLoraConfig(r=r, r_min=2, alpha=alpha, init_weights=False))
    hooks = lorakit.hooks(model)
    draws = []
    for step in range(300):
        hooks.before_forward(step)
        draws.append(hooks.sampled_rank)
    assert set(draws) == set(range(2, r + 1))
    counts = torch.bincount(torch.tensor(draws))[2:]
    assert counts.min() > 300 / 5 * 0.6  # roughly uniform
    layer = lorakit.adapter_layers(model)["lin1"]
    x = torch.randn(3, 32)
    for mode in ("frozen", "updating"):
        layer.frozen = mode == "frozen"
        layer.train()
        layer.sampled_rank = 4
        layer.lora_A.grad = layer.lora_B.grad = None
        out = layer.delta(x)
        with torch.no_grad():
            assert_close(out, (alpha / 4) * x @ layer.lora_A[:4].T @ layer.lora_B[:, :4].T, 1e-6, "scale alpha/b")
        out.sum().backward()
        rows_with_grad = layer.lora_A.grad.abs().sum(1).ne(0).tolist()
        cols_with_grad = layer.lora_B.grad.abs().sum(0).ne(0).tolist()
        expected = [i == 3 for i in range(r)] if mode == "frozen" else [i < 4 for i in range(r)]
        assert rows_with_grad == expected and cols_with_grad == expected, mode
    layer.eval()  # outside training the serving rank (r_max) is used
    with torch.no_grad():
        assert_close(layer.delta(x), (alpha / r) * x @ layer.lora_A.T @ layer.lora_B.T, 1e-6, "eval at r_max")


def test_dylora_cli_export_at_rank_b(tmp_path: Path) -> None:
    """``lorakit export ADAPTER --rank b``: the PEFT adapter is the rank-b truncation (what ``eval --rank b`` runs)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorakit.cli import main
    from lorakit.models import load_model, minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, _ = load_model(str(tmp_path / "base"), "causal-lm")
    lorakit.attach(model, lorakit.DyLoraConfig(r=4, init_weights=False))
    lorakit.save(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "adapter"), "--model", str(tmp_path / "base"), "--rank", "2",
                 "--out", str(tmp_path / "peft"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 2
    set_rank(model, 2)
    x = {"input_ids": torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))}
    base, _ = load_model(str(tmp_path / "base"), "causal-lm")
    assert_close(output(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval(), x), output(model, x), 1e-5,
                 "CLI export at rank 2")


def test_dylora_rank_errors() -> None:
    model = attach("mlp", lorakit.DyLoraConfig(r=4))
    with pytest.raises(lorakit.ConfigError, match="rank must be"):
        set_rank(model, 5)
    with pytest.raises(lorakit.ConfigError, match="r_min"):
        lorakit.DyLoraConfig(r=4, r_min=5)
    assert lorakit.get_method("dylora").set_rank is set_rank


# -- PRILoRA -----------------------------------------------------------------------------------------------------
def test_prilora_ranks_rise_linearly_with_depth() -> None:
    names = [f"model.layers.{i}.mlp.{m}" for i in range(4) for m in ("up_proj", "down_proj")] + ["pooler.dense"]
    ranks = depth_ranks(names, 2, 8)
    assert [ranks[f"model.layers.{i}.mlp.up_proj"] for i in range(4)] == [2, 4, 6, 8]
    assert ranks["model.layers.2.mlp.down_proj"] == 6 and ranks["pooler.dense"] == 8
    model = attach("llama", lorakit.PriLoraConfig(r=6, r_min=2))
    for name, layer in lorakit.adapter_layers(model).items():
        assert layer.rank == (2 if ".layers.0." in name else 6)
        assert layer.rank_mask.tolist() == [1.0] * layer.rank + [0.0] * (6 - layer.rank)
        assert layer.as_lora()[1].shape[0] == layer.rank
    mlp = attach("mlp", lorakit.PriLoraConfig(r=6, r_min=2))  # no numbered blocks: module order is depth
    assert [layer.rank for layer in lorakit.adapter_layers(mlp).values()] == [2, 4, 6]


@torch.no_grad()
def test_prilora_prunes_lowest_weight_times_input_norm() -> None:
    model = attach("mlp", lorakit.PriLoraConfig(r=3, r_min=3, prune_ratio=0.25, ema_beta=0.5,
                                                target_modules=("lin0",)))
    hooks = lorakit.hooks(model)
    layer = lorakit.adapter_layers(model)["lin0"]
    hooks.on_train_begin(10)
    model.train()
    x1, x2 = MLP.inputs(seed=1)["input"], MLP.inputs(seed=2)["input"]
    with torch.enable_grad():
        model(input=x1)  # the layer notes its input norms; the hooks fold them in when handed the forward
        hooks.after_forward({"input": x1}, torch.tensor(0.0), None)
        assert torch.allclose(hooks.input_norm_ema["lin0"], x1.norm(dim=0))
        model(input=x2)
        hooks.after_forward({"input": x2}, torch.tensor(0.0), None)
    norms = 0.5 * x1.norm(dim=0) + 0.5 * x2.norm(dim=0)
    assert torch.allclose(hooks.input_norm_ema["lin0"], norms)
    A = layer.lora_A.detach().clone()
    hooks.after_step(0)
    importance = A.abs() * norms
    for i in range(3):  # the 4 (= 0.25 · 16) lowest of each row are zero, the rest untouched
        lowest = set(torch.argsort(importance[i])[:4].tolist())
        for j in range(16):
            assert (layer.lora_A[i, j] == 0) == (j in lowest)
            if j not in lowest:
                assert layer.lora_A[i, j] == A[i, j]


def test_prilora_budget_errors() -> None:
    with pytest.raises(lorakit.ConfigError, match="r_min"):
        lorakit.PriLoraConfig(r=4, r_min=5)
    model = attach("mlp", lorakit.PriLoraConfig(r=4, final_steps=10))
    with pytest.raises(lorakit.TrainingError, match="final_steps"):
        lorakit.hooks(model).on_train_begin(10)


# -- SoRA --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_sora_proximal_step_soft_thresholds_the_gate() -> None:
    model = attach("mlp", lorakit.SoraConfig(r=4, threshold=0.1))
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(5)
    gate = lorakit.adapter_layers(model)["lin0"].lora_gate
    gate.copy_(torch.tensor([0.5, -0.05, -0.3, 0.1]))
    hooks.after_step(0)
    assert torch.allclose(gate, torch.tensor([0.4, 0.0, -0.2, 0.0]))
    assert torch.equal(soft_threshold(torch.tensor([2.0, -2.0, 0.5]), 1.0), torch.tensor([1.0, -1.0, 0.0]))
    assert lorakit.adapter_layers(model)["lin0"].rank == 2
    opt = hooks.build_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    gate_group = next(g for g in opt.param_groups if any(p is gate for p in g["params"]))
    assert gate_group["weight_decay"] == 0.0


def test_sora_sparsifying_schedule_and_errors() -> None:
    model = attach("mlp", lorakit.SoraConfig(r=4, threshold=0.0, threshold_schedule="linear", max_threshold=0.3,
                                             schedule_stages=4))
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(8)
    assert [round(hooks.threshold(t), 6) for t in range(8)] == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    with pytest.raises(lorakit.TrainingError, match="stages"):
        hooks.on_train_begin(3)
    with pytest.raises(lorakit.ConfigError, match="max_threshold"):
        lorakit.SoraConfig(threshold_schedule="linear")


def test_sora_training_sparsifies_and_logs_ranks() -> None:
    model = attach("mlp", lorakit.SoraConfig(r=4, threshold=0.3))
    train_steps(model, MLP.batches(), steps=3, lr=0.1)
    metrics = lorakit.hooks(model).metrics()
    ranks = {n: layer.rank for n, layer in lorakit.adapter_layers(model).items()}
    assert sum(ranks.values()) < 12  # |g| ~ N(0, 1) minus 3 × 0.3: some gates reached 0
    assert metrics["total_rank"] == sum(ranks.values())
    assert {k: v for k, v in metrics.items() if k.startswith("rank/")} == {f"rank/{n}": k for n, k in ranks.items()}


# -- export: per-layer ranks (rank_pattern) and zero padding, both loaded in PEFT ---------------------------------------
@torch.no_grad()
def _uneven_ranks(method: str) -> nn.Module:
    """A llama adapter of ``method`` whose layers have different surviving ranks (4 at most)."""
    configs = {
        "adalora": lorakit.AdaLoraConfig(r=4, target_r=2, init_weights=False),
        "lora2": lorakit.Lora2Config(r=4, target_r=2, inner_r=4, init_weights=False),
        "alora": lorakit.AloraConfig(r=4, init_weights=False),
        "dylora": lorakit.DyLoraConfig(r=4, init_weights=False),
        "prilora": lorakit.PriLoraConfig(r=4, r_min=2, init_weights=False),
        "sora": lorakit.SoraConfig(r=4, init_weights=False),
    }
    model = attach("llama", configs[method])
    for i, layer in enumerate(lorakit.adapter_layers(model).values()):
        drop = i % 3  # 0, 1 or 2 ranks removed
        if method in ("adalora", "lora2"):
            layer.lora_E[:drop] = 0
        elif method == "sora":
            layer.lora_gate[1:1 + drop] = 0
        elif method == "alora":
            layer.lora_gate[:drop] = 0  # pruned ranks
            layer.lora_gate[4:4 + i % 2] = 1  # a re-allocated slot
    if method == "dylora":
        set_rank(model, 3)
    return model


@pytest.mark.parametrize("method", ["adalora", "lora2", "alora", "dylora", "prilora", "sora"])
def test_export_rank_pattern_and_padding_load_in_peft(method: str, tmp_path: Path) -> None:
    model = _uneven_ranks(method)
    x = LLAMA.inputs()
    ours = output(model, x)
    ranks = {n: layer.rank for n, layer in lorakit.adapter_layers(model).items()}
    r_max = max(ranks.values())
    for pattern in (True, False):
        directory = tmp_path / ("pattern" if pattern else "padded")
        lorakit.export_peft(model, directory, rank_pattern=pattern)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["r"] == r_max
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as f:
            file_ranks = {k[len("base_model.model."):-len(".lora_A.weight")]: f.get_slice(k).get_shape()[0]
                          for k in f.keys() if k.endswith("lora_A.weight")}
        if pattern:
            assert file_ranks == ranks  # only the surviving ranks
            assert config["rank_pattern"] == {n: k for n, k in ranks.items() if k != r_max}
        else:
            assert set(file_ranks.values()) == {r_max} and config["rank_pattern"] == {}
        theirs = output(PeftModel.from_pretrained(LLAMA.build(0), str(directory)).eval(), x)
        assert_close(theirs, ours, 1e-5, f"{method} rank_pattern={pattern}")
    if method != "dylora":
        assert len(set(ranks.values())) > 1, "the test should export different ranks per layer"


# -- rank-allocation plots ---------------------------------------------------------------------------------------
def test_rank_allocation_heatmap_and_evolution(tmp_path: Path) -> None:
    model = attach("llama", lorakit.SoraConfig(r=4))
    records = []
    for step, drop in ((10, 0), (20, 1), (30, 2)):
        with torch.no_grad():
            for layer in lorakit.adapter_layers(model).values():
                layer.lora_gate[:drop] = 0
        records.append({"type": "train", "step": step, "loss": 1.0, **lorakit.hooks(model).metrics()})
    blocks, types, matrix = rank_grid({k[5:]: int(v) for k, v in records[-1].items() if k.startswith("rank/")})
    assert blocks == ["0", "1"] and "self_attn.q_proj" in types and "mlp.down_proj" in types
    assert all(v == 2 for row in matrix for v in row if not math.isnan(v))
    files = draw_rank_allocation(records, tmp_path, prefix="sora_", title="sora")
    assert files == ["sora_rank_heatmap.png", "sora_rank_evolution.png"]
    assert all((tmp_path / f).stat().st_size > 1000 for f in files)
    assert draw_rank_allocation([{"step": 1, "loss": 1.0}], tmp_path) == []
    hf_log = [{"step": 5, **{f"lorakit/{k}": v for k, v in records[0].items() if k.startswith("rank/")}}]
    assert rank_history(hf_log)[0][1] == rank_history(records[:1])[0][1]
