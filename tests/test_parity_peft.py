"""Parity with Hugging Face PEFT 0.21: the same init and the same input give the same output (1e-5).

LoRA / rsLoRA: lorakit seeds its ``lora_A`` differently from PEFT, so PEFT's random factors
(``init_lora_weights=False``: B random too) are copied into lorakit's layers by name; lorakit's own
init is checked against PEFT's distribution (A ~ U(±1/√d_in), B = 0).  OLoRA is deterministic: factors
and residual are compared directly.  PiSSA's SVD factors are defined up to sign, so ``B A`` products,
residuals and outputs are compared.  alpha != r throughout so the scale convention is tested.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn

import lorakit
from tests.tiny_models import KINDS, assert_close, max_diff, output, trainable

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 12  # scale 3 (LoRA) or 6 (rsLoRA): a wrong convention shows
# After a training step the two sides differ by the rounding of the step (gradients agree to ~3e-6 relative,
# checked at 1e-5), which the tiny random Llama amplifies ~40x by the time it reaches the logits.
STEP_TOL = 1e-4


def peft_layers(model: nn.Module) -> dict[str, PeftLoraLayer]:
    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in model.named_modules() if isinstance(m, PeftLoraLayer)}


def peft_factors(layer: PeftLoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` of PEFT's default adapter, ``d_out×r`` and ``r×d_in``."""
    return layer.lora_B["default"].weight, layer.lora_A["default"].weight


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The (possibly residual) base weight in ``(d_out, d_in)`` layout, for lorakit and PEFT layers alike."""
    base = layer.base if isinstance(layer, lorakit.core.layer.AdapterLayer) else layer.get_base_layer()
    w = base.weight
    return w.T if type(base).__name__ == "Conv1D" else w


def build_pair(kind_name: str, ours_config: lorakit.AdapterConfig, **peft_kwargs) -> tuple[nn.Module, nn.Module]:
    base = KINDS[kind_name].build(0)
    theirs = get_peft_model(copy.deepcopy(base), PeftLoraConfig(lora_dropout=0.0, **peft_kwargs)).eval()
    ours = lorakit.attach(copy.deepcopy(base), ours_config).eval()
    assert set(lorakit.adapter_layers(ours)) == set(peft_layers(theirs)), "different layers adapted"
    return ours, theirs


@torch.no_grad()
def copy_peft_into_ours(ours: nn.Module, theirs: nn.Module) -> None:
    mine = lorakit.adapter_layers(ours)
    for name, layer in peft_layers(theirs).items():
        B, A = peft_factors(layer)
        mine[name].lora_B.copy_(B)
        mine[name].lora_A.copy_(A)


@torch.no_grad()
def perturb_both(ours: nn.Module, theirs: nn.Module, seed: int = 3) -> None:
    """The same seeded noise on both sides' factors, by layer name."""
    g = torch.Generator().manual_seed(seed)
    mine = lorakit.adapter_layers(ours)
    for name, layer in sorted(peft_layers(theirs).items()):
        B, A = peft_factors(layer)
        for theirs_t, ours_t in ((B, mine[name].lora_B), (A, mine[name].lora_A)):
            noise = 0.05 * torch.randn(theirs_t.shape, generator=g)
            theirs_t.add_(noise)
            ours_t.add_(noise)


def assert_same_output(ours: nn.Module, theirs: nn.Module, kind_name: str, tol: float = 1e-5) -> None:
    x = KINDS[kind_name].inputs()
    assert_close(output(ours, x), output(theirs, x), tol, "lorakit vs PEFT output")


def sgd_step_both(ours: nn.Module, theirs: nn.Module, kind_name: str, lr: float = 0.1) -> None:
    """One SGD step on each side; the loss and every factor's gradient must agree first (1e-5 relative)."""
    batch = KINDS[kind_name].batches(n=1)[0]
    losses = []
    for model in (ours, theirs):
        model.train()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        model.eval()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    peft_by_name = peft_layers(theirs)
    for name, layer in lorakit.adapter_layers(ours).items():
        B, A = peft_factors(peft_by_name[name])
        for mine, other in ((layer.lora_B, B), (layer.lora_A, A)):
            diff, scale = max_diff(mine.grad, other.grad), other.grad.abs().max().item()
            assert diff <= 1e-5 * max(scale, 1e-3), f"grad of {name}: {diff:.3g} (scale {scale:.3g})"
    with torch.no_grad():
        for model in (ours, theirs):
            for p in trainable(model).values():
                p -= lr * p.grad
                p.grad = None


# -- LoRA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["all-linear", "list"])
@pytest.mark.parametrize("kind_name", ["llama", "gpt2"])
def test_lora_matches_peft(kind_name: str, targets: str) -> None:
    if targets == "list":
        target_modules = LLAMA_TARGETS if kind_name == "llama" else ["c_attn", "c_proj", "c_fc"]
    else:
        target_modules = "all-linear"
    ours_targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    ours, theirs = build_pair(kind_name, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules=ours_targets),
                              r=R, lora_alpha=ALPHA, target_modules=target_modules, init_lora_weights=False,
                              fan_in_fan_out=kind_name == "gpt2")
    copy_peft_into_ours(ours, theirs)
    assert_same_output(ours, theirs, kind_name)
    # the same gradients: one SGD step on each keeps them equal
    sgd_step_both(ours, theirs, kind_name)
    assert_same_output(ours, theirs, kind_name, tol=STEP_TOL)
    # and the same merged model
    lorakit.merge(ours)
    merged = theirs.merge_and_unload()
    assert_same_output(ours, merged, kind_name, tol=1e-4)


@pytest.mark.parametrize("kind_name", ["llama", "gpt2"])
def test_lora_default_init_has_peft_distribution(kind_name: str) -> None:
    """lorakit's A ~ U(±1/√d_in) (PEFT's kaiming_uniform(a=√5)) and B = 0, as PEFT's own init."""
    ours, theirs = build_pair(kind_name, lorakit.LoraConfig(r=R, alpha=ALPHA), r=R, lora_alpha=ALPHA,
                              target_modules="all-linear", fan_in_fan_out=kind_name == "gpt2")
    peft_by_name = peft_layers(theirs)
    ours_a, theirs_a = [], []
    for name, layer in lorakit.adapter_layers(ours).items():
        B, A = peft_factors(peft_by_name[name])
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.lora_A.shape == A.shape and layer.lora_B.shape == B.shape, name
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(B) == 0, name
        assert layer.lora_A.abs().max() <= bound and A.abs().max() <= bound, name
        ours_a.append(layer.lora_A.detach().flatten() / bound)
        theirs_a.append(A.detach().flatten() / bound)
    ours_u, theirs_u = torch.cat(ours_a), torch.cat(theirs_a)
    # U(-1, 1) after normalising: mean 0, std 1/√3, range filled (hundreds of samples)
    for u in (ours_u, theirs_u):
        assert abs(u.mean().item()) < 0.1
        assert abs(u.std().item() - 1 / math.sqrt(3)) < 0.05
        assert u.min() < -0.95 and u.max() > 0.95
    assert_same_output(ours, theirs, kind_name)  # both identity at init
    # different seeds give different A (and same seeds the same, see the conformance suite)
    other = lorakit.attach(KINDS[kind_name].build(0), lorakit.LoraConfig(r=R, alpha=ALPHA, seed=1))
    first = next(iter(lorakit.adapter_layers(ours)))
    assert not torch.equal(lorakit.adapter_layers(other)[first].lora_A, lorakit.adapter_layers(ours)[first].lora_A)


# -- rsLoRA -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_class", [lorakit.RsLoraConfig, lambda **kw: lorakit.LoraConfig(use_rslora=True, **kw)],
                         ids=["RsLoraConfig", "LoraConfig(use_rslora)"])
def test_rslora_matches_peft(config_class) -> None:
    ours, theirs = build_pair("llama", config_class(r=R, alpha=ALPHA, target_modules=tuple(LLAMA_TARGETS)),
                              r=R, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS, use_rslora=True,
                              init_lora_weights=False)
    layer = next(iter(lorakit.adapter_layers(ours).values()))
    assert layer.scale == pytest.approx(ALPHA / math.sqrt(R))
    assert next(iter(peft_layers(theirs).values())).scaling["default"] == pytest.approx(ALPHA / math.sqrt(R))
    copy_peft_into_ours(ours, theirs)
    assert_same_output(ours, theirs, "llama")
    sgd_step_both(ours, theirs, "llama")
    assert_same_output(ours, theirs, "llama", tol=STEP_TOL)


# -- OLoRA ------------------------------------------------------------------------------------------------
def test_olora_matches_peft() -> None:
    ours, theirs = build_pair("llama", lorakit.OloraConfig(r=R, alpha=ALPHA, target_modules="all-linear"),
                              r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights="olora")
    peft_by_name = peft_layers(theirs)
    for name, layer in lorakit.adapter_layers(ours).items():
        B, A = peft_factors(peft_by_name[name])
        torch.testing.assert_close(layer.lora_B, B, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(layer.lora_A, A, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(base_weight(layer), base_weight(peft_by_name[name]), atol=1e-6, rtol=0, msg=name)
    x = KINDS["llama"].inputs()
    assert_same_output(ours, theirs, "llama")
    assert_close(output(ours, x), output(KINDS["llama"].build(0), x), 1e-5, "OLoRA init moved the output")
    perturb_both(ours, theirs)
    assert_same_output(ours, theirs, "llama")
    sgd_step_both(ours, theirs, "llama")
    assert_same_output(ours, theirs, "llama", tol=STEP_TOL)


# -- PiSSA ------------------------------------------------------------------------------------------------
def test_pissa_matches_peft() -> None:
    ours, theirs = build_pair("llama", lorakit.PissaConfig(r=R, alpha=ALPHA, target_modules="all-linear",
                                                           svd_niter=None),
                              r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights="pissa")
    peft_by_name = peft_layers(theirs)
    for name, layer in lorakit.adapter_layers(ours).items():
        B, A = peft_factors(peft_by_name[name])
        scale = peft_by_name[name].scaling["default"]
        assert layer.scale == pytest.approx(scale) == pytest.approx(ALPHA / R)
        # SVD signs are arbitrary: compare the product and the residual, not the factors
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, B @ A, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(base_weight(layer), base_weight(peft_by_name[name]), atol=1e-5, rtol=0, msg=name)
        # each factor carries sqrt(S/scale): the column norms of B equal the row norms of A
        torch.testing.assert_close(layer.lora_B.norm(dim=0), layer.lora_A.norm(dim=1), atol=1e-5, rtol=1e-5)
    x = KINDS["llama"].inputs()
    assert_same_output(ours, theirs, "llama")
    assert_close(output(ours, x), output(KINDS["llama"].build(0), x), 1e-5, "PiSSA init moved the output")
    # same factors on both sides (PEFT's, whatever their signs), then the same training step
    copy_peft_into_ours(ours, theirs)
    assert_same_output(ours, theirs, "llama")
    perturb_both(ours, theirs)
    assert_same_output(ours, theirs, "llama")
    sgd_step_both(ours, theirs, "llama")
    assert_same_output(ours, theirs, "llama", tol=STEP_TOL)
