"""The defining property of each init method of the core issue, on tiny random models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.core.layer import keep_original
from lorakit.core.linalg import principal_cosines, randomized_svd, truncated_svd

DATA = Path(__file__).resolve().parent / "data"  # the in-repo SST-2 slice


def tiny_llama(hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
    return LlamaForCausalLM(config)


def make_batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (4, 10), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def full_gradients(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Reference: autograd's mean gradient of every projection weight, (d_out, d_in)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("proj.weight"))
    model.train()
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    grads = {n[: -len(".weight")]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(flags[n])
    return grads


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("exact", [True, False])
def test_lora_ga_first_step_matches_rank_2r_gradient(exact: bool) -> None:
    """Paper Thm 3.1: one SGD step of (A, B) moves s·B A along the best rank-2r approximation of -G."""
    model, batches = tiny_llama(), make_batches()
    grads = full_gradients(model, batches)
    r = 4
    lorakit.attach(model, lorakit.LoraGaConfig(r=r, alpha=8, exact=exact, niter=2, sketch_width=64), data=batches)
    layers = lorakit.adapter_layers(model)
    model.train()
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    for name, layer in layers.items():
        # first-order change of s·B A under an SGD step: -lr·s·(g_B A + B g_A)
        step = -layer.scale * (layer.lora_B.grad @ layer.lora_A + layer.lora_B @ layer.lora_A.grad).detach()
        u, s, vh = truncated_svd(grads[name], 2 * r)
        best = -(u * s) @ vh
        assert cosine(step, best) > 0.99, name


def test_lora_ga_keeps_output_and_compensates_base() -> None:
    model, batches = tiny_llama(), make_batches()
    x = batches[0]["input_ids"]
    with torch.no_grad():
        reference = model(x).logits
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
    lorakit.attach(model, lorakit.LoraGaConfig(r=4, exact=True), data=batches)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, reference, atol=1e-5)
    for name, layer in lorakit.adapter_layers(model).items():
        residual_plus_adapter = layer.base.weight + layer.delta_weight()
        assert torch.allclose(residual_plus_adapter, originals[name], atol=1e-6)
        # the stable scale: both factors carry d_out^(1/4)/sqrt(gamma) on orthonormal vectors
        zeta = layer.out_features ** 0.25 / 16 ** 0.5
        eye = torch.eye(4)
        assert torch.allclose(layer.lora_A @ layer.lora_A.T / zeta**2, eye, atol=1e-4)
        assert torch.allclose(layer.lora_B.T @ layer.lora_B / zeta**2, eye, atol=1e-4)


def test_lora_ga_sketch_recovers_exact_subspaces() -> None:
    """The streamed sketch (never forming G) finds the same top-2r subspaces as the dense SVD."""
    model, batches = tiny_llama(), make_batches()
    grads = full_gradients(model, batches)
    from lorakit.core.gradients import materialize, sketched_svd

    lorakit.attach(model, lorakit.LoraConfig(r=4))
    layers = lorakit.adapter_layers(model)
    sketch = sketched_svd(model, layers, materialize(batches, "test"), None, rank=8, width=48, niter=3)
    for name, (u, s, vh) in sketch.items():
        ue, se, vhe = truncated_svd(grads[name], 8)
        assert torch.allclose(s, se, rtol=2e-2), name
        assert principal_cosines(u[:, :4], ue[:, :4]).min() > 0.99, name
        assert principal_cosines(vh[:4].T, vhe[:4].T).min() > 0.99, name


def test_lora_sb_init_is_truncated_svd_of_sign_step() -> None:
    """LoRA-SB's initial B R A is the best rank-r approximation of -η·sign(G) (the first Adam step)."""
    model, batches = tiny_llama(), make_batches()
    grads = full_gradients(model, batches)
    x = batches[0]["input_ids"]
    with torch.no_grad():
        base = model(x).logits
    r, lr = 4, 1e-3
    # a 64 KiB bound forces several layer groups, each re-running the samples
    lorakit.attach(model, lorakit.LoraSbConfig(r=r, init_lr=lr, grad_memory_mb=1), data=batches)
    for name, layer in lorakit.adapter_layers(model).items():
        u, s, vh = truncated_svd(-lr * torch.sign(grads[name]), r)
        assert torch.allclose(layer.delta_weight(), (u * s) @ vh, atol=1e-6), name
        assert torch.allclose(layer.lora_R, torch.diag(layer.lora_R.diagonal()))  # R = Σ_r
        assert not layer.lora_B.requires_grad and not layer.lora_A.requires_grad
    counts = lorakit.trainable_parameters(model)
    assert counts["total"] == r * r * len(lorakit.adapter_layers(model))
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base)  # it applies the approximated first update


def test_lora_sb_eta_is_the_official_value_of_the_task_type(tmp_path) -> None:
    """``lorakit train`` takes η by task type, not task name: the official formula lr / (warmup_ratio ·
    len(gradient loader) · epochs) at the official scripts' settings, 3.0e-7 for a causal-LM task (arithmetic
    script) and 8.3e-6 for classification (train_glue.py), inside the ranges the official scripts produce
    whatever lorakit's lr and warm-up; init samples 50 / 2 (official).  The bare API needs η given, the HF
    callback derives it from the Trainer's first-step lr; init_lr overrides."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    from lorakit.integrations.hf import LorakitCallback
    from lorakit.methods.lora_sb import default_eta, first_step_lr, official_eta
    from lorakit.train.data import load_task
    from lorakit.train.run import RunConfig, init_samples, method_config

    assert first_step_lr(1e-2, 5) == pytest.approx(2e-3) and first_step_lr(1e-3, 0) == 1e-3
    assert official_eta(1e-4, 0.02, 16_667, 1) == pytest.approx(3.0e-7, rel=1e-3)
    with pytest.raises(lorakit.ConfigError, match=r"needs init_lr.*first_step_lr"):
        lorakit.attach(tiny_llama(), lorakit.LoraSbConfig(r=2), data=make_batches())
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n')
    spec, _ = load_task(str(path), "train")
    assert spec.type == "causal-lm"
    for lr, warmup in ((1e-2, 5), (1e-3, 0), (5e-4, 100)):  # lorakit's default, no warm-up, a long warm-up
        for task in (str(path), "gsm8k", "arith"):
            run = RunConfig(task=task, model="smollm2-135m", lr=lr, warmup_steps=warmup).resolved()
            eta = method_config(run, spec, None).init_lr
            assert eta == default_eta("causal-lm") and 2.9e-7 <= eta <= 3e-6  # arithmetic (3.0e-7) .. commonsense (2.9e-6)
    sst2 = load_task("sst2", "train", DATA, limit=1)[0]
    eta = method_config(RunConfig(task="sst2", lr=1e-2, warmup_steps=5).resolved(), sst2, None).init_lr
    assert eta == pytest.approx(8.29e-6, rel=1e-3) and 8.3e-7 <= eta <= 1.4e-4  # run_glue.sh's lr grid
    given = RunConfig(task=str(path), model="smollm2-135m", lr=1e-2, method_options={"init_lr": 1e-6}).resolved()
    assert method_config(given, spec, None).init_lr == 1e-6
    assert init_samples(RunConfig(task=str(path)), spec) == 50 and init_samples(RunConfig(task="sst2"), sst2) == 2
    assert init_samples(RunConfig(task="sst2", method="lora-ga"), sst2) == 16
    assert init_samples(RunConfig(task="sst2", init_samples=7), sst2) == 7

    model = tiny_llama()
    batches = make_batches()
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, warmup_steps=4, learning_rate=2e-2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      callbacks=[LorakitCallback(lorakit.LoraSbConfig(r=2), init_batches=1)])
    trainer.train()
    assert lorakit.get_state(model).config.init_lr == pytest.approx(2e-2 / 4)


def test_lora_sb_memory_bound_groups_layers() -> None:
    from lorakit.core.gradients import layer_groups

    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2))
    layers = lorakit.adapter_layers(model)
    one = 4 * 64 * 128  # bytes of the largest gradient
    groups = layer_groups(layers, one)
    assert sum(len(g) for g in groups) == len(layers)
    for g in groups:
        assert sum(4 * layers[n].in_features * layers[n].out_features for n in g) <= one or len(g) == 1
    assert len(layer_groups(layers, 1 << 40)) == 1


@pytest.mark.parametrize("method", ["olora", "pissa"])
def test_residual_plus_adapter_is_w0(method: str) -> None:
    model = tiny_llama()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("proj")}
    cfg = lorakit.get_method(method).config_class(r=4, alpha=8)
    with keep_original():  # detach then restores W0 bit for bit
        lorakit.attach(model, cfg)
    for name, layer in lorakit.adapter_layers(model).items():
        assert torch.allclose(layer.base.weight + layer.delta_weight(), originals[name], atol=1e-5), name
        assert not torch.equal(layer.base.weight, originals[name])
    lorakit.detach(model)
    for name, module in model.named_modules():
        if name in originals:
            assert torch.equal(module.weight, originals[name])


def test_pissa_adapter_holds_principal_components() -> None:
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.attach(model, lorakit.PissaConfig(r=4, target_modules=["q_proj"]))
    layer = lorakit.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    u, s, vh = truncated_svd(w, 4)
    assert torch.allclose(layer.delta_weight(), (u * s) @ vh, atol=1e-5)


def test_pissa_randomized_svd_matches_exact() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) @ torch.diag(torch.logspace(0, -2, 64)) @ torch.randn(64, 64, generator=g)
    u, s, _ = randomized_svd(w, 8, niter=4, generator=torch.Generator().manual_seed(1))
    ue, se, _ = truncated_svd(w, 8)
    assert principal_cosines(u, ue).min() > 0.999
    assert torch.allclose(s, se, rtol=1e-3)


def test_lora_xs_trains_r_squared_per_matrix() -> None:
    model = tiny_llama()
    r = 3
    lorakit.attach(model, lorakit.LoraXsConfig(r=r))
    layers = lorakit.adapter_layers(model)
    counts = lorakit.trainable_parameters(model)
    assert counts["total"] == r * r * len(layers)
    for name, layer in layers.items():
        assert counts[name] == r * r
        w = layer.weight.detach()
        u, s, vh = truncated_svd(w, r)
        # B = U_r, A = Σ_r V_rᵀ (up to the sign of each singular pair)
        assert torch.allclose((layer.lora_B @ layer.lora_A).abs(), ((u * s) @ vh).abs(), atol=1e-4)
        assert layer.lora_R.abs().max() < 1e-4


def test_rslora_scale() -> None:
    cfg = lorakit.LoraConfig(r=16, alpha=8, use_rslora=True)
    assert cfg.scale == pytest.approx(8 / 4)
    assert lorakit.RsLoraConfig(r=16, alpha=8).scale == pytest.approx(2.0)
    assert lorakit.LoraConfig(r=16, alpha=8).scale == pytest.approx(0.5)


def test_pissa_gram_svd_matches_exact() -> None:
    """The Gram-matrix eigendecomposition gives PiSSA's exact principal components, wide or tall."""
    for hidden in (32, 64):
        model = tiny_llama(hidden=hidden)
        exact = lorakit.attach(copy.deepcopy(model), lorakit.PissaConfig(r=4, alpha=8))
        gram = lorakit.attach(model, lorakit.PissaConfig(r=4, alpha=8, svd="gram"))
        for name, layer in lorakit.adapter_layers(gram).items():
            reference = lorakit.adapter_layers(exact)[name]
            assert torch.allclose(layer.delta_weight(), reference.delta_weight(), atol=1e-5), name
            assert torch.allclose(layer.base.weight, reference.base.weight, atol=1e-5), name


@pytest.mark.parametrize("method", ["lora-sb", "lora-ga"])
def test_gradient_inits_leave_no_gradient_behind(method: str) -> None:
    """The init passes must not leak into the first optimizer step: every trainable parameter, including a
    ``modules_to_save`` head, keeps the ``.grad`` it had before attach (none)."""
    from tests.tiny_models import KINDS

    kind = KINDS["bert"]
    model = kind.build(0)
    eta = {"init_lr": 1e-3} if method == "lora-sb" else {}
    config = lorakit.get_method(method).config_class(r=2, modules_to_save=("classifier",), **eta)
    lorakit.attach(model, config, data=kind.batches(2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []
