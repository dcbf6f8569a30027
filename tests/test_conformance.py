"""The conformance suite (docs/conformance.md, checks #1-#13): every registered method on every tiny model.

Parametrized over ``lorakit.methods()`` at collection time, so a new method is covered by registering it.
Where a check needs the adapter to do something, `perturb` adds seeded noise to every trainable tensor
after attach (a method-agnostic non-identity init, like PEFT's ``init_lora_weights=False``).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

import lorakit
from lorakit.core.layer import AdapterLayer
from lorakit.io.persistence import adapter_tensors
from tests.tiny_models import (
    KINDS,
    ModelKind,
    R,
    assert_close,
    attach,
    make_config,
    max_diff,
    output,
    perturb,
    state_snapshot,
    train_steps,
    trainable,
)

METHODS = lorakit.methods()
METHOD_NAMES = list(METHODS)
KIND_NAMES = list(KINDS)

every_case = pytest.mark.parametrize("kind_name", KIND_NAMES)
every_method = pytest.mark.parametrize("method_name", METHOD_NAMES)


def attached(method_name: str, kind_name: str, seed: int = 0, noise: bool = True,
          dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, ModelKind, lorakit.core.registry.Method]:
    """A fresh tiny model with ``method`` attached (perturbed unless ``noise=False``)."""
    method, kind = METHODS[method_name], KINDS[kind_name]
    model = attach(kind.build(0, dtype=dtype), method, kind, seed=seed)
    if noise:
        perturb(model)
    return model, kind, method


# -- 1 ------------------------------------------------------------------------------------------------
@every_method
@every_case
def test_01_default_init_keeps_output(method_name: str, kind_name: str) -> None:
    kind, method = KINDS[kind_name], METHODS[method_name]
    model = kind.build(0)
    x = kind.inputs()
    base = output(model, x)
    attach(model, method, kind)
    out = output(model, x)
    assert torch.isfinite(out).all()
    if method.keeps_output:
        assert_close(out, base, 1e-5, f"{method_name} default init moved the output")
    # keeps_output=False (LoRA-SB applies the approximated first update, LoRA-XS a σ=1e-5 core): may move


# -- 2 ------------------------------------------------------------------------------------------------
@every_method
@every_case
def test_02_gradients_reach_adapter_only(method_name: str, kind_name: str) -> None:
    model, kind, _ = attached(method_name, kind_name)
    params = trainable(model)
    assert params, "no trainable parameter after attach"
    model(**kind.inputs()).logits.sum().backward()
    for name, p in model.named_parameters():
        if name in params:
            assert p.grad is not None, f"trainable {name} got no gradient"
            assert torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in params.values())


# -- 3 ------------------------------------------------------------------------------------------------
@every_method
@every_case
def test_03_training_changes_only_adapter(method_name: str, kind_name: str) -> None:
    model, kind, _ = attached(method_name, kind_name)
    names = set(trainable(model))
    before = state_snapshot(model)
    assert names <= set(before)
    # A tensor whose gradient is zero (to rounding) on every batch cannot move (e.g. GLoRA's bias shift on an
    # attention key: softmax ignores a shift shared by all keys); every other trainable tensor must.
    model.train()
    for batch in kind.batches():
        model(**batch).loss.backward()
    largest = max(float(p.grad.abs().max()) for p in trainable(model).values() if p.grad is not None)
    inert = {n for n, p in trainable(model).items()  # zero up to rounding
             if p.grad is None or float(p.grad.abs().max()) <= 1e-6 * largest}
    model.zero_grad(set_to_none=True)
    assert len(inert) < len(names), "no trainable tensor receives a gradient"
    train_steps(model, kind.batches(), steps=3, lr=1.0)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, old in before.items():
        if key in names:
            if key not in inert:
                assert not torch.allclose(after[key], old, rtol=1e-4, atol=1e-6), f"trainable {key} did not change"
        else:  # base weights, frozen factors (LoRA-XS/LoRA-SB's A and B), base offsets, buffers
            assert torch.equal(after[key], old), f"frozen {key} changed"


# -- 4 ------------------------------------------------------------------------------------------------
@every_method
@every_case
def test_04_disabled_gives_base_output(method_name: str, kind_name: str) -> None:
    kind, method = KINDS[kind_name], METHODS[method_name]
    model = kind.build(0)
    x = kind.inputs()
    base = output(model, x)
    attach(model, method, kind)
    perturb(model)
    adapted = output(model, x)
    assert max_diff(adapted, base) > 1e-3
    with lorakit.disabled(model):
        # a moved W0 is recomputed as residual + offset (no copy is kept): exact within fp32 rounding
        assert_close(output(model, x), base, 1e-5 if method.moves_base else 1e-6, "inside disabled()")
    assert_close(output(model, x), adapted, 1e-6, "after disabled()")
    lorakit.merge(model)
    with lorakit.disabled(model):  # a merged adapter is switched off too
        assert_close(output(model, x), base, 1e-5, "inside disabled() while merged")
    assert all(layer.merged for layer in lorakit.adapter_layers(model).values())
    assert_close(output(model, x), adapted, 1e-4, "merged, after disabled()")


# -- 5 ------------------------------------------------------------------------------------------------
@every_method
@every_case
def test_05_merge_unmerge_and_unload(method_name: str, kind_name: str) -> None:
    kind, method = KINDS[kind_name], METHODS[method_name]
    model = kind.build(0)
    x = kind.inputs()
    base = output(model, x)
    attach(model, method, kind)
    perturb(model)
    adapted = output(model, x)
    layers = lorakit.adapter_layers(model)
    lorakit.merge(model)
    assert all(layer.merged for layer in layers.values())
    merged = output(model, x)
    assert_close(merged, adapted, 1e-4, "merged")
    assert max_diff(merged, base) > 1e-3, "merged output equals the base output"
    lorakit.unmerge(model)
    assert not any(layer.merged for layer in layers.values())
    assert_close(output(model, x), adapted, 1e-4, "unmerged")

    model = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert getattr(model, "_lorakit", None) is None
    unloaded = output(model, x)
    assert_close(unloaded, adapted, 1e-4, "merge_and_unload")
    assert max_diff(unloaded, base) > 1e-3
    with pytest.raises(lorakit.LorakitError):
        lorakit.adapter_layers(model)


# -- 6 ------------------------------------------------------------------------------------------------
@every_method
@every_case
def test_06_merge_twice_warns_and_changes_nothing(method_name: str, kind_name: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    model, kind, _ = attached(method_name, kind_name)
    x = kind.inputs()
    lorakit.merge(model)
    once, weights = output(model, x), state_snapshot(model)
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        lorakit.merge(model)
    assert any(r.levelno == logging.WARNING and r.name.startswith("lorakit") and "merged" in r.getMessage()
               for r in caplog.records), "merging twice did not warn"
    assert_close(output(model, x), once, 1e-6, "second merge")
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), f"second merge changed {key}"


# -- 7 ------------------------------------------------------------------------------------------------
@every_method
@every_case
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_07_safe_merge_refuses_nonfinite(method_name: str, kind_name: str, bad: float) -> None:
    model, _, _ = attached(method_name, kind_name)
    layers = list(lorakit.adapter_layers(model).values())
    # a layer training this round (XGBLoRA boosts a random share of the blocks; the others have nothing to poison)
    training = [layer for layer in layers if any(p.requires_grad and not n.startswith("base.")
                                                 for n, p in layer.named_parameters())]
    victim = training[len(training) // 2]
    param_name, param = next((n, p) for n, p in victim.named_parameters()
                             if p.requires_grad and not n.startswith("base."))
    with torch.no_grad():
        param.view(-1)[0] = bad
    weights = state_snapshot(model)
    with pytest.raises(lorakit.LorakitError) as err:
        lorakit.merge(model, safe=True)
    assert f"'{victim.name}'" in str(err.value), f"message does not name the layer: {err.value}"
    assert not any(layer.merged for layer in layers), "a layer was merged before the error"
    for key, value in model.state_dict().items():
        if f"{victim.name}.{param_name}" == key:
            continue
        assert torch.equal(value, weights[key]), f"failed safe merge changed {key}"


# -- 8 ------------------------------------------------------------------------------------------------
def _check_saved_dir(directory: Path, model: torch.nn.Module, kind: ModelKind) -> None:
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    weights = directory / "adapter_model.safetensors"
    expected = adapter_tensors(model)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(expected), f"file keys differ: {sorted(keys ^ set(expected))[:5]}"
    base_names = {n for n, _ in kind.build(0).named_parameters()}
    for key in keys:
        assert key not in base_names or key.startswith("modules_to_save."), f"base weight {key} in the file"
        assert not key.endswith((".base.weight", ".base.bias")), f"base weight {key} in the file"
    # nothing but those tensors: 8-byte length + JSON header + the tensors' bytes
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    payload = sum(t.numel() * t.element_size() for t in expected.values())
    assert len(raw) == 8 + header_len + payload
    if not kind.modules_to_save:
        base_bytes = sum(p.numel() * p.element_size() for p in kind.build(0).parameters())
        assert payload < base_bytes


def _reload(kind: ModelKind, directory: Path, global_seed: int) -> torch.nn.Module:
    fresh = kind.build(0)  # same base weights ...
    torch.manual_seed(global_seed)  # ... different global RNG state for anything random
    return lorakit.load(fresh, directory)


def _assert_same_adapter(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"adapter tensor {key} differs after load"


@every_method
@every_case
def test_08_save_load_roundtrip(method_name: str, kind_name: str, tmp_path: Path) -> None:
    kind, method = KINDS[kind_name], METHODS[method_name]
    x = kind.inputs()
    torch.manual_seed(1)
    model = attach(kind.build(0), method, kind)
    perturb(model)
    before = output(model, x)
    lorakit.save(model, tmp_path / "a")
    _check_saved_dir(tmp_path / "a", model, kind)
    loaded = _reload(kind, tmp_path / "a", global_seed=2)
    assert lorakit.get_state(loaded).method.name == method_name
    assert lorakit.get_state(loaded).config == lorakit.get_state(model).config
    _assert_same_adapter(model, loaded)
    assert_close(output(loaded, x), before, 1e-5, "after load")

    train_steps(model, kind.batches(), steps=3, lr=1.0)
    trained = output(model, x)
    assert max_diff(trained, before) > 1e-4
    lorakit.save(model, tmp_path / "b")
    _check_saved_dir(tmp_path / "b", model, kind)
    loaded = _reload(kind, tmp_path / "b", global_seed=3)
    _assert_same_adapter(model, loaded)
    assert_close(output(loaded, x), trained, 1e-4, "after training and load")


# -- 9 ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method_name", [n for n, m in METHODS.items() if m.low_rank])
@every_case
def test_09_peft_export(method_name: str, kind_name: str, tmp_path: Path) -> None:
    model, kind, method = attached(method_name, kind_name)
    x = kind.inputs()
    ours = output(model, x)
    lorakit.export_peft(model, tmp_path, modules_to_save=bool(kind.modules_to_save))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected_rank = 2 * R if method.moves_base else R
    assert config["r"] == expected_rank
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.endswith("lora_A.weight"):
                assert f.get_slice(key).get_shape()[0] == expected_rank, key
    untouched = kind.build(0)
    base_state = state_snapshot(untouched)
    peft_model = PeftModel.from_pretrained(untouched, str(tmp_path)).eval()
    theirs = output(peft_model, x)
    scale = ours.abs().max().item()
    diff = max_diff(theirs, ours)
    assert diff <= 1e-5 * scale + 1e-6, f"PEFT output differs by {diff:.3g} (scale {scale:.3g})"
    # the base under the PEFT adapter is the original one (moved-base inits export their offset instead)
    unloaded = peft_model.unload()
    for key, value in unloaded.state_dict().items():
        if key in base_state and not key.startswith(kind.modules_to_save):  # heads: PEFT unloads the trained copy
            assert torch.equal(value, base_state[key]), key


@pytest.mark.parametrize("method_name", [n for n, m in METHODS.items() if not m.low_rank])
def test_09_peft_export_refuses_full_rank(method_name: str, tmp_path: Path) -> None:
    model, _, _ = attached(method_name, "mlp")
    with pytest.raises(lorakit.LorakitError, match="not low-rank"):
        lorakit.export_peft(model, tmp_path)


# -- 10 -----------------------------------------------------------------------------------------------
def _half_supported(kind: ModelKind, dtype: torch.dtype) -> bool:
    try:
        return bool(torch.isfinite(output(kind.build(0, dtype=dtype), kind.inputs(dtype=dtype))).all())
    except (RuntimeError, NotImplementedError):
        return False


@every_method
@every_case
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_10_low_precision(method_name: str, kind_name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    kind = KINDS[kind_name]
    if dtype == torch.float16 and not _half_supported(kind, dtype):
        pytest.skip("fp16 ops unsupported on this CPU")
    model, _, _ = attached(method_name, kind_name, dtype=dtype)
    x = kind.inputs(dtype=dtype)
    adapted = model(**x).logits
    assert adapted.dtype == dtype
    assert torch.isfinite(adapted).all(), "forward"
    # a low-precision adapter saves and loads like a float32 one (before merging: a low-precision
    # merge + unmerge rounds W0 + ΔW - ΔW, which moves W0 by an ulp, as in PEFT)
    lorakit.save(model, tmp_path)
    loaded = lorakit.load(kind.build(0, dtype=dtype), tmp_path)
    assert_close(output(loaded, x), output(model, x), 1e-5, "low-precision save/load")
    lorakit.merge(model)
    assert torch.isfinite(output(model, x)).all(), "merged"
    lorakit.unmerge(model)
    assert torch.isfinite(output(model, x)).all(), "unmerged"
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


# -- 11 -----------------------------------------------------------------------------------------------
@every_method
@every_case
def test_11_same_seed_bit_identical(method_name: str, kind_name: str) -> None:
    kind, method = KINDS[kind_name], METHODS[method_name]
    x = kind.inputs()
    runs = []
    for global_seed in (11, 22):  # only the config's seed may matter
        torch.manual_seed(global_seed)
        model = attach(kind.build(0), method, kind, seed=5)
        runs.append((model, output(model, x)))
    (a, out_a), (b, out_b) = runs
    _assert_same_adapter(a, b)
    assert torch.equal(out_a, out_b)


# -- 12 -----------------------------------------------------------------------------------------------
@every_method
@every_case
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_12_detach_restores(method_name: str, kind_name: str, merged: bool) -> None:
    kind, method = KINDS[kind_name], METHODS[method_name]
    model = kind.build(0)
    first = next(model.parameters())
    first.requires_grad_(False)  # a flag the user set before attach must come back too
    x = kind.inputs()
    base = output(model, x)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    weights = state_snapshot(model)

    attach(model, method, kind)
    perturb(model)
    train_steps(model, kind.batches(), steps=1, lr=0.1)
    if merged:
        lorakit.merge(model)
    lorakit.detach(model)

    assert getattr(model, "_lorakit", None) is None
    after = dict(model.named_modules())
    assert list(after) == list(modules)
    for name, module in modules.items():
        assert after[name] is module, f"{name} is not the original module object"
    for name, p in model.named_parameters():
        assert p is params[name], name
        assert p.requires_grad == flags[name], f"requires_grad of {name} not restored"
        assert p.grad is None, name
    for key, value in model.state_dict().items():
        if merged or method.moves_base:  # unmerge W + ΔW - ΔW / W0 = residual + offset: fp32 rounding
            assert_close(value, weights[key], 1e-6, key)
        else:
            assert torch.equal(value, weights[key]), f"{key} not restored bit for bit"
    if merged or method.moves_base:
        assert_close(output(model, x), base, 1e-5, "after merged detach")
    else:
        assert torch.equal(output(model, x), base)


# -- 13 -----------------------------------------------------------------------------------------------
def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable(model).items() if p.grad is not None}
    return loss.detach(), grads


@every_method
@pytest.mark.parametrize("kind_name", [k for k, kind in KINDS.items() if kind.hf])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_13_gradient_checkpointing(method_name: str, kind_name: str, reentrant: bool) -> None:
    plain, kind, _ = attached(method_name, kind_name)
    checkpointed, _, _ = attached(method_name, kind_name)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    batch = kind.batches(n=1)[0]
    loss, grads = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert set(grads) == set(trainable(plain)), "some trainable tensors got no gradient"
    assert set(grads_ckpt) == set(grads), (
        f"with gradient checkpointing these got no gradient: {sorted(set(grads) - set(grads_ckpt))[:4]}")
    assert_close(loss_ckpt, loss, 1e-5, "loss")
    for name, g in grads.items():
        assert_close(grads_ckpt[name], g, 1e-5, name)


@every_method
@pytest.mark.parametrize(("kind_name", "backend"), [("mlp", "inductor"), ("llama", "aot_eager")])
def test_13_torch_compile(method_name: str, kind_name: str, backend: str) -> None:
    """Inductor (slow to compile on CPU) on the MLP only; dynamo + AOT autograd through a Llama."""
    model, kind, _ = attached(method_name, kind_name)
    x = kind.inputs()
    eager = output(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    assert_close(output(compiled, x), eager, 1e-5, f"torch.compile({backend})")
    if kind_name == "mlp":  # a merged adapter compiles too (skips the delta branch)
        lorakit.merge(model)
        torch._dynamo.reset()
        assert_close(output(torch.compile(model, backend=backend), x), eager, 1e-4, "compiled after merge")


def test_methods_are_parametrized() -> None:
    """The suite covers every registered method (new ones only need registering)."""
    assert {"lora", "rslora", "olora", "pissa", "lora-xs"} <= set(METHOD_NAMES)
    for method in METHODS.values():
        make_config(method, KINDS["mlp"])  # every method is constructible from (r, target_modules, seed)
