"""DoRA, MiSS (Bone) and GLoRA against Hugging Face PEFT 0.21, plus DoRA's detached norm.

PEFT gets the same tensors as lorakit (copied in), then both are compared on outputs, gradients, one SGD step,
merge, and lorakit's exports loaded by PEFT.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import GloraConfig, LoraConfig, MissConfig, PeftModel, get_peft_model

import lorakit
from lorakit.methods.bone import export_peft_approx
from lorakit.methods.dora import export_peft_dora
from tests.tiny_models import KINDS, assert_close, output

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


def peft_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule("base_model.model." + name)


def loss_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def sgd_step(model: torch.nn.Module, batch: dict, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    loss_of(model, batch).backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


# -- DoRA ----------------------------------------------------------------------------------------------
def dora_pair(kind_name: str, targets: tuple[str, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """lorakit DoRA (random B) and PEFT ``use_dora=True`` holding the same A, B and magnitude."""
    kind = KINDS[kind_name]
    ours = lorakit.attach(kind.build(0), lorakit.DoraConfig(r=4, alpha=8, target_modules=targets,
                                                            init_weights=False, seed=3))
    theirs = get_peft_model(kind.build(0), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                      use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for name, layer in lorakit.adapter_layers(ours).items():
            p = peft_layer(theirs, name)
            p.lora_A["default"].weight.copy_(layer.lora_A)
            p.lora_B["default"].weight.copy_(layer.lora_B)
            p.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    return ours, theirs


@pytest.mark.parametrize(("kind_name", "targets"), [("llama", TARGETS), ("gpt2", ("c_attn", "c_fc"))])
def test_dora_matches_peft(kind_name: str, targets: tuple[str, ...], tmp_path: Path) -> None:
    kind = KINDS[kind_name]
    ours, theirs = dora_pair(kind_name, targets)
    x, batch = kind.inputs(), kind.batches(n=1)[0]
    assert_close(output(ours, x), output(theirs, x), 1e-5, "forward")
    # the initial magnitude is ‖W0 + s·B A‖ per output row (PEFT's init)
    for name, layer in lorakit.adapter_layers(ours).items():
        w = layer.weight + layer.scale * layer.lora_B @ layer.lora_A
        assert torch.allclose(layer.lora_magnitude, w.norm(dim=1), atol=1e-6), name

    ours.train(), theirs.train()
    loss_of(ours, batch).backward()
    loss_of(theirs, batch).backward()
    for name, layer in lorakit.adapter_layers(ours).items():
        p = peft_layer(theirs, name)
        for mine, peft_param in ((layer.lora_A, p.lora_A["default"].weight),
                                 (layer.lora_B, p.lora_B["default"].weight),
                                 (layer.lora_magnitude, p.lora_magnitude_vector["default"].weight)):
            assert_close(mine.grad, peft_param.grad, 1e-5, f"gradient at {name}")
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        sgd_step(model, batch, lr=0.5)
        model.eval()
    stepped = output(ours, x)
    assert_close(stepped, output(theirs, x), 1e-5, "after one SGD step")

    export_peft_dora(ours, tmp_path)
    loaded = PeftModel.from_pretrained(kind.build(0), str(tmp_path)).eval()
    assert_close(output(loaded, x), stepped, 1e-5, "export_peft_dora loaded by PEFT")

    merged_theirs = theirs.merge_and_unload()
    lorakit.merge(ours)
    assert_close(output(ours, x), output(merged_theirs, x), 1e-5, "merged")
    lorakit.unmerge(ours)
    assert_close(output(ours, x), stepped, 1e-5, "unmerged")


def test_dora_norm_is_detached() -> None:
    """Paper §4.3: ‖W0 + s·B A‖_c is a constant in backward; gradients differ from the undetached version."""
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    model = torch.nn.Sequential(copy.deepcopy(base))
    lorakit.attach(model, lorakit.DoraConfig(r=3, alpha=6, target_modules=("0",), init_weights=False))
    layer = lorakit.adapter_layers(model)["0"]
    with torch.no_grad():
        layer.lora_magnitude.mul_(1.3)  # m != norm, so the norm's gradient would matter
    x, c = torch.randn(5, 12), torch.randn(5, 10)
    (model(x) * c).sum().backward()

    def reference(detach: bool) -> tuple[torch.Tensor, ...]:
        A, B, m = (t.detach().clone().requires_grad_(True) for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
        v = base.weight + layer.scale * B @ A
        norm = v.norm(dim=1)
        norm = norm.detach() if detach else norm
        y = F.linear(x, (m / norm)[:, None] * v, base.bias)
        (y * c).sum().backward()
        return A.grad, B.grad, m.grad

    got = (layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad)
    for mine, ref in zip(got, reference(detach=True)):
        assert torch.allclose(mine, ref, atol=1e-5)
    assert not all(torch.allclose(mine, ref, atol=1e-3) for mine, ref in zip(got, reference(detach=False)))


# -- MiSS / Bone -------------------------------------------------------------------------------------------
def miss_pair(kind_name: str, targets: tuple[str, ...], r: int, variant: str,
              mini_r: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """lorakit Bone (random block) and PEFT ``MissConfig`` holding the same block."""
    kind = KINDS[kind_name]
    ours = lorakit.attach(kind.build(0), lorakit.BoneConfig(r=r, variant=variant, mini_r=mini_r, target_modules=targets,
                                                            init_weights=False, seed=4))
    init = {"miss": True, "bat": "bat", "mini": "mini"}[variant]
    theirs = get_peft_model(kind.build(0), MissConfig(r=r, mini_r=mini_r, init_weights=init, target_modules=list(targets)))
    with torch.no_grad():
        for name, layer in lorakit.adapter_layers(ours).items():
            if variant == "bat":
                layer.miss_block.mul_(0.2)  # keep I + Bk well conditioned
            peft_layer(theirs, name).miss_block["default"].copy_(layer.miss_block)
    return ours, theirs


@pytest.mark.parametrize(("kind_name", "targets", "r", "variant"), [
    ("llama", TARGETS, 4, "miss"),
    ("mlp", ("lin0", "lin1", "lin2"), 3, "miss"),  # r does not divide d_in = 16, 32: the last chunk is padded
    ("llama", TARGETS, 4, "bat"),
    ("llama", TARGETS, 4, "mini"),
])
def test_miss_matches_peft(kind_name: str, targets: tuple[str, ...], r: int, variant: str) -> None:
    kind = KINDS[kind_name]
    ours, theirs = miss_pair(kind_name, targets, r, variant, mini_r=8 if variant == "mini" else 1)
    x, batch = kind.inputs(), kind.batches(n=1)[0]
    assert_close(output(ours, x), output(theirs, x), 1e-5, "forward")
    for model in (ours, theirs):
        model.train()
        sgd_step(model, batch, lr=0.5)
        model.eval()
    stepped = output(ours, x)
    assert_close(stepped, output(theirs, x), 1e-5, "after one SGD step")
    for name, layer in lorakit.adapter_layers(ours).items():
        assert_close(layer.miss_block, peft_layer(theirs, name).miss_block["default"], 1e-5, name)

    originals = {n: layer.base.weight.detach().clone() for n, layer in lorakit.adapter_layers(ours).items()}
    lorakit.merge(ours)
    theirs.merge_adapter()
    assert_close(output(ours, x), output(theirs, x), 1e-5, "merged")
    for name, layer in lorakit.adapter_layers(ours).items():
        assert_close(layer.base.weight, peft_layer(theirs, name).get_base_layer().weight, 1e-5, name)
    lorakit.unmerge(ours)  # Bat: W_ij = (W'_ij - Bk_i)(I + Bk_i)^-1
    for name, layer in lorakit.adapter_layers(ours).items():
        assert_close(layer.base.weight, originals[name], 1e-5, f"unmerged {name}")
    assert_close(output(ours, x), stepped, 1e-5, "unmerged")


@pytest.mark.parametrize("variant", ["miss", "mini"])
def test_miss_exports_exactly(variant: str, tmp_path: Path) -> None:
    """MiSS and mini updates are exactly rank r (ΔW = Dᵀ S): `export_peft` needs no approximation."""
    kind = KINDS["llama"]
    ours, _ = miss_pair("llama", TARGETS, 4, variant, mini_r=8)
    for layer in lorakit.adapter_layers(ours).values():
        B, A = layer.as_lora()
        assert torch.allclose(B @ A, layer.delta_weight(), atol=1e-6)
    lorakit.export_peft(ours, tmp_path)
    loaded = PeftModel.from_pretrained(kind.build(0), str(tmp_path)).eval()
    assert_close(output(loaded, kind.inputs()), output(ours, kind.inputs()), 1e-5, "exported")


def test_bat_export_is_truncated_svd(tmp_path: Path) -> None:
    kind = KINDS["llama"]
    ours, _ = miss_pair("llama", TARGETS, 4, "bat")
    with pytest.raises(lorakit.LorakitError, match="full-rank"):
        lorakit.export_peft(ours, tmp_path / "exact")
    error = export_peft_approx(ours, tmp_path / "full", energy=1.0)
    assert error < 1e-5
    loaded = PeftModel.from_pretrained(kind.build(0), str(tmp_path / "full")).eval()
    assert_close(output(loaded, kind.inputs()), output(ours, kind.inputs()), 1e-4, "full-energy export")

    error = export_peft_approx(ours, tmp_path / "r2", rank=2)
    updates = [layer.delta_weight().detach() for layer in lorakit.adapter_layers(ours).values()]
    tails = [torch.linalg.svdvals(u)[2:].square().sum() for u in updates]
    expected = math.sqrt(sum(tails) / sum(u.square().sum() for u in updates))
    assert error == pytest.approx(expected, rel=1e-4) and 0 < error < 1
    assert json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    assert 0 < export_peft_approx(ours, tmp_path / "e90", energy=0.9) <= math.sqrt(0.1) + 1e-6


# -- GLoRA ---------------------------------------------------------------------------------------------
def copy_glora_path(ours_down: torch.Tensor, ours_up: torch.Tensor | None, path: torch.nn.Module, choice: str) -> None:
    """PEFT keeps one tensor per support; lorakit's super-network shares them (vector = column 0, constant = [0, 0])."""
    if choice == "lora":
        ours_down.copy_(path.Xd)
        ours_up.copy_(path.Xu)
    elif choice == "vector":
        ours_down.zero_()
        (ours_down[:, :1] if ours_down.ndim == 2 else ours_down).copy_(path.X)
    elif choice == "constant":
        ours_down.zero_()
        ours_down.view(-1)[0] = path.X[0]


@pytest.mark.parametrize(("ab", "c", "de"), [("lora", "lora", "constant"), ("vector", "vector", "vector"),
                                             ("constant", "none", "none")])
def test_glora_forward_matches_peft(ab: str, c: str, de: str) -> None:
    kind = KINDS["bert"]
    targets = ("query", "value", "intermediate.dense")
    support = f"A={ab},B={ab},C={c},D={de},E={de}"
    ours = lorakit.attach(kind.build(0), lorakit.GloraConfig(r=4, target_modules=targets, default_support=support,
                                                             init_weights=False))
    theirs = get_peft_model(kind.build(0), GloraConfig(r=4, target_modules=list(targets), config_A_B=ab, config_C=c,
                                                       config_D_E=de, init_weights=False))
    with torch.no_grad():
        for name, layer in lorakit.adapter_layers(ours).items():
            p = peft_layer(theirs, name)
            copy_glora_path(layer.glora_Ad, layer.glora_Au, p.glora_A["default"], ab)
            copy_glora_path(layer.glora_Bd, layer.glora_Bu, p.glora_B["default"], ab)
            copy_glora_path(layer.glora_Cd, layer.glora_Cu, p.glora_C["default"], c)
            copy_glora_path(layer.glora_D, None, p.glora_D["default"], de)
            copy_glora_path(layer.glora_E, None, p.glora_E["default"], de)
    x = kind.inputs()
    adapted = output(ours, x)
    assert (adapted - output(kind.build(0), x)).abs().max() > 1e-3
    assert_close(adapted, output(theirs, x), 1e-5, "forward")
    lorakit.merge(ours)  # re-parameterised into W and b
    theirs.merge_adapter()
    assert_close(output(ours, x), output(theirs, x), 1e-5, "merged")
    lorakit.unmerge(ours)
    assert_close(output(ours, x), adapted, 1e-5, "unmerged")
