"""Optimizer-side methods: LoRA+, LoRA-Pro, LoRA-RITE, Flat-LoRA and BA-LoRA, each on its defining property.

`train` is a small explicit loop that calls the training hooks in the order `lorakit.core.hooks` documents
(and rebuilds the optimizer whenever a method asks for a reset), as the lorakit trainer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import lorakit
from lorakit.core.driver import step_loss
from lorakit.core.loss import model_loss
from lorakit.errors import TrainingError
from lorakit.methods.ba_lora import consistency_loss, diversity_loss, svd_loss
from lorakit.methods.flat_lora import flat_noise
from lorakit.methods.lora_pro import LoraProHooks, adjusted_gradients
from lorakit.methods.lora_rite import LoraRite
from tests.tiny_models import KINDS


def trainable_list(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(model: torch.nn.Module, batches: list[dict], steps: int, lr: float, weight_decay: float = 0.0,
          schedule: Callable[[int], float] | None = None) -> list[float]:
    """``steps`` optimizer steps through the method's hooks; ``schedule(step)`` multiplies every group's lr and
    runs across optimizer rebuilds.  Returns the task losses."""
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(steps)

    def build() -> torch.optim.Optimizer:
        opt = hooks.build_optimizer(trainable_list(model), lr, weight_decay)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        return opt

    opt = build()
    model.train()
    losses = []
    for step in range(steps):
        if hooks.optimizer_reset_requested:
            opt = build()
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * schedule(step)
        hooks.before_forward(step)
        loss = model(**batches[step % len(batches)]).loss
        losses.append(loss.item())
        reg = hooks.regularizer()
        if reg is not None:
            loss = loss + reg
        loss.backward()
        hooks.after_loss(step, losses[-1])
        hooks.after_backward(step)
        opt.step()
        hooks.after_step(step)
        opt.zero_grad(set_to_none=True)
    model.eval()
    return losses


# -- LoRA+ ---------------------------------------------------------------------------------------------
def test_lora_plus_b_learning_rate_is_lambda_times_a() -> None:
    kind = KINDS["bert"]
    model = lorakit.attach(kind.build(0), lorakit.LoraPlusConfig(r=4, lr_ratio=16.0, init_weights=False,
                                                                 modules_to_save=("classifier",)))
    opt = lorakit.hooks(model).build_optimizer(trainable_list(model), lr=1e-3, weight_decay=0.1)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(lr_of) == len(trainable_list(model))
    for layer in lorakit.adapter_layers(model).values():
        assert lr_of[id(layer.lora_A)] == (1e-3, 0.1)
        assert lr_of[id(layer.lora_B)] == (16 * 1e-3, 0.1)
    head = lorakit.get_state(model).saved_modules["classifier"][1]
    assert lr_of[id(head.weight)] == (1e-3, 0.1)
    assert lr_of[id(head.bias)] == (16 * 1e-3, 0.0)  # 1-D tensors: B's rate, no decay (official code)

    # Adam's first step moves every entry by ~lr·sign(g): B moves 16 times as far as A
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    model.train()
    model(**kind.batches(n=1)[0]).loss.backward()
    opt.param_groups[0]["weight_decay"] = opt.param_groups[1]["weight_decay"] = 0.0
    opt.step()
    moved_a = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if "lora_A" in n)
    moved_b = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)
    assert moved_a == pytest.approx(1e-3, rel=1e-2) and moved_b == pytest.approx(16e-3, rel=1e-2)


# -- Flat-LoRA -----------------------------------------------------------------------------------------
def test_flat_lora_perturbs_forward_and_leaves_weights_untouched() -> None:
    kind = KINDS["llama"]
    sigma = 0.5
    model = lorakit.attach(kind.build(0), lorakit.FlatLoraConfig(r=4, sigma=sigma, init_weights=False, seed=2))
    hooks = lorakit.hooks(model)
    layers = lorakit.adapter_layers(model)
    originals = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    x = kind.inputs()
    clean = model(**x).logits.detach()

    hooks.on_train_begin(total_steps=4)
    hooks.before_forward(2)  # σ_2 = σ (1 - cos(π/2)) / 2 = σ/2
    assert hooks.sigma_now == pytest.approx(sigma / 2)
    layer = layers["model.layers.0.mlp.up_proj"]
    seed, scales = layer.perturbation
    merged = layer.weight + layer.delta_weight()
    assert torch.allclose(scales, sigma / 2 * merged.norm(dim=1) / layer.in_features ** 0.5)  # filter-wise
    eps = flat_noise(layer.weight, seed, scales)
    assert torch.equal(eps, flat_noise(layer.weight, seed, scales))  # regenerated from the seed, never stored
    h = torch.randn(3, layer.in_features, requires_grad=True)
    out = layer(h)
    expected = torch.nn.functional.linear(h, layer.weight + eps, layer.base.bias) + layer.delta(h)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()  # backward regenerates ε: the input gradient is the one of (W0 + ε) x + ΔW x
    g_h = h.grad.clone()
    h.grad = None
    expected.sum().backward()
    assert torch.allclose(g_h, h.grad, atol=1e-5)
    assert (model(**x).logits.detach() - clean).abs().max() > 1e-3  # the model runs at the perturbed point
    hooks.after_backward(2)
    assert torch.equal(model(**x).logits.detach(), clean)  # removed before the update

    train(model, kind.batches(), steps=4, lr=1e-2)
    for n, layer in layers.items():
        assert torch.equal(layer.base.weight, originals[n]), n  # W0 bit-exact after every step
        assert layer.perturbation is None


def test_flat_lora_gradients_are_taken_at_the_perturbed_point() -> None:
    kind = KINDS["mlp"]
    model = lorakit.attach(kind.build(0), lorakit.FlatLoraConfig(r=4, sigma=1.0, init_weights=False))
    hooks = lorakit.hooks(model)
    hooks.on_train_begin(total_steps=2)
    batch = kind.batches(n=1)[0]
    model(**batch).loss.backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    hooks.before_forward(1)  # σ_1 = σ
    model(**batch).loss.backward()
    hooks.after_backward(1)
    noisy = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.allclose(noisy[n], clean[n], atol=1e-4) for n in clean)


# -- LoRA-Pro ------------------------------------------------------------------------------------------
def lora_grads_of(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's gradients for a full gradient G: g^A = s Bᵀ G, g^B = s G Aᵀ."""
    return s * B.T @ G, s * G @ A.T


def test_lora_pro_adjustment_is_the_least_squares_best_equivalent_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    d_out, d_in, r, s = 7, 6, 2, 1.5
    A, B, G = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((r, d_in), (d_out, r), (d_out, d_in)))
    g_A, g_B = lora_grads_of(G, A, B, s)
    a_star, b_star = adjusted_gradients(A, B, g_A, g_B, s, delta=0.0)
    equivalent = s * (B @ a_star + b_star @ A)

    # least squares over every (g^A, g^B): min ‖s (B gA + gB A) − G‖ via the vectorised linear map
    eye_in, eye_out = torch.eye(d_in, dtype=torch.float64), torch.eye(d_out, dtype=torch.float64)
    M = s * torch.cat([torch.kron(B, eye_in), torch.kron(eye_out, A.T.contiguous())], dim=1)  # row-major vec
    sol = torch.linalg.lstsq(M, G.reshape(-1), driver="gelsd").solution
    best = (M @ sol).reshape(d_out, d_in)
    assert torch.allclose(equivalent, best, atol=1e-9)
    # the closed form: P_B G + G P_A − P_B G P_A
    P_B, P_A = B @ torch.linalg.pinv(B), torch.linalg.pinv(A) @ A
    assert torch.allclose(equivalent, P_B @ G + G @ P_A - P_B @ G @ P_A, atol=1e-9)

    # among the optimal (g^A, g^B) = (a0 + X A, b0 − B X), the Sylvester X is closest to the vanilla gradients
    a0, b0 = adjusted_gradients(A, B, g_A, g_B, s, delta=0.0, sylvester=False)
    N = torch.cat([torch.kron(torch.eye(r, dtype=torch.float64), A.T.contiguous()), -torch.kron(B, torch.eye(r, dtype=torch.float64))])
    target = torch.cat([(g_A - a0).reshape(-1), (g_B - b0).reshape(-1)])
    X = torch.linalg.lstsq(N, target).solution.reshape(r, r)
    assert torch.allclose(a_star, a0 + X @ A, atol=1e-8) and torch.allclose(b_star, b0 - B @ X, atol=1e-8)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lora_pro_hooks_adjust_gradients(optimizer: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8, bias=False))
    full = torch.nn.Sequential(torch.nn.Linear(10, 8, bias=False))
    full.load_state_dict(model.state_dict())
    x, c = torch.randn(6, 10), torch.randn(6, 8)
    lorakit.attach(model, lorakit.LoraProConfig(r=2, alpha=4, target_modules=("0",), init_weights=False,
                                                optimizer=optimizer))
    layer, hooks = lorakit.adapter_layers(model)["0"], lorakit.hooks(model)
    (model(x) * c).sum().backward()
    # the full gradient at the same point (W0 + s B A)
    with torch.no_grad():
        full[0].weight += layer.delta_weight()
    (full(x) * c).sum().backward()
    G = full[0].weight.grad
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.scale
    hooks.after_backward(0)
    equivalent = s * (B @ layer.lora_A.grad + layer.lora_B.grad @ A)
    P_B, P_A = B @ torch.linalg.pinv(B), torch.linalg.pinv(A) @ A

    def project(M: torch.Tensor) -> torch.Tensor:
        return P_B @ M + M @ P_A - P_B @ M @ P_A
    # SGD: the projected full gradient.  AdamW: Adam runs on the projected gradient g̃ (its first direction is
    # m̂/(√v̂+ε) = g̃/(|g̃|+ε)), and that direction is projected again
    expected = project(G)
    if optimizer == "adamw":
        expected = project(expected / (expected.abs() + 1e-8))
    assert torch.allclose(equivalent, expected, atol=1e-4)
    opt = hooks.build_optimizer(trainable_list(model), lr=0.1)
    assert isinstance(opt, torch.optim.SGD)


def test_lora_pro_adam_direction_uses_adamw_step_count_and_ignores_the_gradient_scale() -> None:
    """Not the official quirks: bias correction with t (t + 1 would give 0.74·sign(g) first), and a raw-gradient
    clip, i.e. a smaller gradient, leaves the step's size unchanged (the official code shrinks it by the clip)."""
    def hooks() -> LoraProHooks:
        model = lorakit.attach(torch.nn.Sequential(torch.nn.Linear(6, 6)), lorakit.LoraProConfig(r=2))
        return lorakit.hooks(model)
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    full, clipped = hooks(), hooks()
    for t in (1, 2, 3):
        full.adam_step = clipped.adam_step = t
        step = full.adam_direction("w", g)
        assert torch.allclose(step, torch.sign(g), atol=1e-6)  # m̂ / √v̂ of a repeated gradient: exactly ±1
        assert torch.allclose(clipped.adam_direction("w", 0.01 * g), step, atol=1e-5)


# -- LoRA-RITE -----------------------------------------------------------------------------------------
def rite_model(S: torch.Tensor | None, escape: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Tanh(), torch.nn.Linear(10, 6))
    lorakit.attach(model, lorakit.LoraRiteConfig(r=3, alpha=6, target_modules=("0", "2"), init_weights=False,
                                                 escape=escape, update_skipping=0.0, seed=1))
    if S is not None:  # the same ΔW = s B A, parameterised as (B S, S⁻¹ A)
        with torch.no_grad():
            for layer in lorakit.adapter_layers(model).values():
                layer.lora_B.copy_(layer.lora_B @ S)
                layer.lora_A.copy_(torch.linalg.solve(S, layer.lora_A))
    return model


def run_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    history = []
    for _ in range(steps):
        x, y = torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append([layer.delta_weight().detach().clone() for layer in lorakit.adapter_layers(model).values()])
    return history


@pytest.mark.parametrize("escape", [False, True])
def test_lora_rite_updates_are_transformation_invariant(escape: bool) -> None:
    g = torch.Generator().manual_seed(3)
    S = torch.randn(3, 3, generator=g) + 2 * torch.eye(3)
    plain, transformed = rite_model(None, escape), rite_model(S, escape)
    start = [layer.delta_weight().detach().clone() for layer in lorakit.adapter_layers(plain).values()]
    opts = [lorakit.hooks(m).build_optimizer(trainable_list(m), lr=0.05, weight_decay=0.01) for m in (plain, transformed)]
    assert all(isinstance(o, LoraRite) for o in opts)
    ours, theirs = run_steps(plain, opts[0], 4), run_steps(transformed, opts[1], 4)
    for step_a, step_b in zip(ours, theirs):
        for dw_a, dw_b, dw0 in zip(step_a, step_b, start):
            assert (dw_a - dw0).abs().max() > 1e-3  # the updates are not trivial
            assert torch.allclose(dw_a, dw_b, atol=1e-4), (dw_a - dw_b).abs().max()

    # Adam is not invariant: the same experiment drifts apart
    plain, transformed = rite_model(None, escape), rite_model(S, escape)
    adam = [torch.optim.Adam(trainable_list(m), lr=0.05) for m in (plain, transformed)]
    a, b = run_steps(plain, adam[0], 4), run_steps(transformed, adam[1], 4)
    assert max((x - y).abs().max() for x, y in zip(a[-1], b[-1])) > 1e-2


# -- BA-LoRA -------------------------------------------------------------------------------------------
def test_ba_lora_regularisers_on_hand_checked_cases() -> None:
    # NLU consistency: normalised (3, 4) and (4, 3) are (.6, .8) and (.8, .6): MSE = (.2² + .2²) / 2
    assert consistency_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]]), "nlu").item() == pytest.approx(0.04)
    # NLG consistency: KL(q ‖ p) with q = (.75, .25), p = (.5, .5)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    fine, pre = torch.zeros(1, 1, 2), torch.tensor([[[math.log(3.0), 0.0]]])
    assert consistency_loss(fine, pre, "nlg").item() == pytest.approx(kl, rel=1e-5)
    assert consistency_loss(pre, pre, "nlg").item() == pytest.approx(0.0, abs=1e-7)
    # NLU diversity: rows (1,0), (0,1), (1,1): covariance [[1/3, -1/6], [-1/6, 1/3]]; 2·(1/6)² / 2
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert diversity_loss(rows, "nlu").item() == pytest.approx(1 / 36, rel=1e-5)
    # NLG diversity: uniform over 4 tokens has entropy ln 4
    assert diversity_loss(torch.zeros(2, 3, 4), "nlg").item() == pytest.approx(-math.log(4), rel=1e-5)
    # SVD: singular values (3, 1), top-1 share 3/4; per sequence for 3-D logits
    assert svd_loss(torch.diag(torch.tensor([3.0, 1.0])), k=1).item() == pytest.approx(-0.75)
    per_sequence = torch.stack([torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 1.0]))])
    assert svd_loss(per_sequence, k=1).item() == pytest.approx(-(0.75 + 0.5) / 2)


@pytest.mark.parametrize(("kind_name", "task"), [("llama", "nlg"), ("bert", "nlu")])
def test_ba_lora_hooks_add_weighted_regularisers(kind_name: str, task: str) -> None:
    kind = KINDS[kind_name]
    config = lorakit.BaLoraConfig(r=4, task=task, lambda_consistency=0.5, lambda_diversity=0.2, lambda_svd=0.3,
                                  top_k=2, modules_to_save=kind.modules_to_save)
    model = lorakit.attach(kind.build(0), config)
    assert lorakit.get_state(model).method.moves_base  # PiSSA init
    with torch.no_grad():
        for layer in lorakit.adapter_layers(model).values():
            layer.lora_B.mul_(1.5)  # away from the pre-trained model, so consistency is not 0
    hooks = lorakit.hooks(model)
    batch = kind.batches(n=1)[0]
    with torch.no_grad(), lorakit.disabled(model):
        pre = model.eval()(**batch).logits
    model.train()
    assert hooks.needs_logits
    hooks.before_forward(0)
    out = model(**batch)
    fine = out.logits
    hooks.after_forward(batch, out.loss.detach(), fine)
    reg = hooks.regularizer()
    expected = (0.5 * consistency_loss(fine, pre, task) + 0.2 * diversity_loss(fine, task) + 0.3 * svd_loss(fine, 2))
    assert torch.allclose(reg, expected, rtol=1e-5)
    assert hooks.metrics()["ba_consistency"] > 0
    reg.backward()  # the regulariser reaches the adapter
    assert all(layer.lora_A.grad is not None for layer in lorakit.adapter_layers(model).values())
    assert hooks.regularizer() is None  # one value per forward
    # the driver's step loss hands the logits over; for llama its loss runs decoder and head apart: same logits
    task, driven = step_loss(model, batch, hooks)
    assert torch.allclose(driven, reg, rtol=1e-5)
    assert torch.allclose(task, model_loss(model, batch))
    with pytest.raises(TrainingError, match="needs the model's logits"):
        step_loss(model, batch, hooks, loss_fn=lambda m, b: m(**b).loss)
