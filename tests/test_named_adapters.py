"""Several named adapters on one model: each computes, trains, saves and loads exactly as when alone; switching
is exact; no adapter sees another's moved W0; refusals name the adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layer import AdapterLayer
from tests.tiny_models import KINDS, assert_close, make_config, output, perturb, train_steps, trainable

LLAMA = KINDS["llama"]
X = LLAMA.inputs()
W0_Q = LLAMA.build(0).get_submodule("model.layers.0.self_attn.q_proj").weight.detach().clone()


def add(model: nn.Module, method: str, name: str | None, seed: int = 0, kind=LLAMA) -> nn.Module:
    """Attach ``method`` (as tiny_models.attach does) under ``name`` (None: no name given), then perturb it."""
    m = lorakit.get_method(method)
    data = kind.batches() if m.needs_data else None
    extra = {} if name is None else {"name": name}
    lorakit.attach(model, make_config(m, kind, seed=seed), data=data, **extra)
    perturb(model, seed=3)
    return model


def alone(method: str, kind=LLAMA, train: bool = False) -> tuple[torch.Tensor, nn.Module]:
    """The output of ``method`` attached alone to a fresh model (perturbed, optionally trained)."""
    model = add(kind.build(0), method, None, kind=kind)
    if train:
        train_steps(model, kind.batches(), steps=2, lr=0.1)
    return output(model, kind.inputs()), model


def test_dora_and_lora_sb_on_one_model_each_exactly_as_alone() -> None:
    dora, dora_model = alone("dora")
    sb, sb_model = alone("lora-sb")
    base = output(LLAMA.build(0), X)
    model = add(add(LLAMA.build(0), "dora", "d"), "lora-sb", "sb")  # LoRA-SB's data init runs next to DoRA
    assert lorakit.adapter_names(model) == ["d", "sb"] and lorakit.active_adapter(model) == "sb"
    for _ in range(2):  # back and forth: bit for bit every time
        assert torch.equal(output(model, X), sb)
        lorakit.set_active(model, "d")
        assert torch.equal(output(model, X), dora)
        lorakit.set_active(model, None)
        assert torch.equal(output(model, X), base)
        lorakit.set_active(model, "sb")
    # only the active adapter is in the model: the same trainable tensors (names and values) as alone
    for name, single in (("d", dora_model), ("sb", sb_model)):
        lorakit.set_active(model, name)
        mine, theirs = trainable(model), trainable(single)
        assert list(mine) == list(theirs)
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert lorakit.trainable_parameters(model) == lorakit.trainable_parameters(single)


def test_training_touches_only_the_active_adapter_and_matches_alone() -> None:
    trained_dora, _ = alone("dora", train=True)
    model = add(add(LLAMA.build(0), "lora", "other"), "dora", "d")
    lorakit.set_active(model, "other")
    other = output(model, X)
    before = {k: v.detach().clone() for k, v in lorakit.get_state(model, "other").layers["model.layers.0.mlp.up_proj"]
              .adapter_state().items()}
    lorakit.set_active(model, "d")
    assert lorakit.hooks(model) is lorakit.get_state(model, "d").hooks
    train_steps(model, LLAMA.batches(), steps=2, lr=0.1)
    assert torch.equal(output(model, X), trained_dora)
    with lorakit.use_adapter(model, "other"):
        assert torch.equal(output(model, X), other)
        after = lorakit.get_state(model, "other").layers["model.layers.0.mlp.up_proj"].adapter_state()
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_pissa_next_to_lora_never_shows_its_moved_base() -> None:
    pissa, _ = alone("pissa")
    lora, _ = alone("lora")
    fresh = LLAMA.build(0)
    base, w0 = output(fresh, X), {k: v.clone() for k, v in fresh.state_dict().items()}

    # PiSSA attached alone (W0 not kept): set aside, it puts back residual + offset, W0 within one rounding
    model = add(add(LLAMA.build(0), "pissa", "p"), "lora", "l")
    assert_close(output(model, X), lora, 1e-5, "lora next to pissa")
    first = output(model, X)
    for _ in range(3):  # switching is stable: the same W0 tensor every time, PiSSA's residual bit for bit
        lorakit.set_active(model, "p")
        assert torch.equal(output(model, X), pissa)
        lorakit.set_active(model, "l")
        assert torch.equal(output(model, X), first)
    with lorakit.use_adapter(model, None):
        assert_close(output(model, X), base, 1e-5, "base next to pissa")

    # PiSSA attached next to another adapter keeps W0: everything bit for bit, and detach restores W0 exactly
    model = add(add(LLAMA.build(0), "lora", "l"), "pissa", "p")
    layer = lorakit.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.base_offset_B is not None and layer.original_weight is not None
    assert torch.equal(output(model, X), pissa)
    lorakit.set_active(model, "l")
    assert torch.equal(output(model, X), lora)
    assert torch.equal(layer.base.weight, w0["model.layers.0.self_attn.q_proj.weight"])
    lorakit.set_active(model, "p")
    lorakit.detach(model, "l")
    lorakit.detach(model)
    assert not hasattr(model, "_lorakit") and not hasattr(model, "_lorakit_adapters")
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert torch.equal(output(model, X), base)


def test_modules_to_save_per_adapter() -> None:
    bert = KINDS["bert"]
    first, _ = alone("lora", kind=bert)
    second, _ = alone("dora", kind=bert)
    model = add(add(bert.build(0), "lora", "a", kind=bert), "dora", "b", kind=bert)
    head_b = model.classifier
    lorakit.set_active(model, "a")
    assert model.classifier is not head_b  # each adapter trains its own copy of the head
    assert torch.equal(output(model, bert.inputs()), first)
    lorakit.set_active(model, "b")
    assert model.classifier is head_b and torch.equal(output(model, bert.inputs()), second)


def test_save_and_load_per_name(tmp_path: Path) -> None:
    model = add(add(LLAMA.build(0), "pissa", "p"), "lora", "l")
    outputs = {}
    for name in ("l", "p"):
        with lorakit.use_adapter(model, name):
            outputs[name] = output(model, X)
    lorakit.save(model, tmp_path / "p", name="p")  # an inactive adapter
    lorakit.save(model, tmp_path / "l")  # the active one
    alone_dir = tmp_path / "alone"
    single = add(LLAMA.build(0), "lora", None)
    lorakit.save(single, alone_dir)
    assert (tmp_path / "l" / "adapter_model.safetensors").read_bytes() == \
        (alone_dir / "adapter_model.safetensors").read_bytes()  # the same format and bytes as a lone adapter
    assert json.loads((tmp_path / "l" / "adapter_config.json").read_text()).keys() == \
        json.loads((alone_dir / "adapter_config.json").read_text()).keys()

    fresh = LLAMA.build(0)
    lorakit.load(fresh, tmp_path / "l")  # "default"
    lorakit.load(fresh, tmp_path / "p", name="p")  # next to it, and active
    assert lorakit.adapter_names(fresh) == ["default", "p"] and lorakit.active_adapter(fresh) == "p"
    assert torch.equal(output(fresh, X), outputs["p"])
    lorakit.set_active(fresh, "default")
    assert_close(output(fresh, X), outputs["l"], 1e-5, "lora loaded next to pissa")
    with pytest.raises(lorakit.LorakitError, match=r"already has a lorakit adapter.*'default', 'p'.*'default'"):
        lorakit.load(fresh, tmp_path / "l")
    with pytest.raises(lorakit.AdapterFileError, match=r"no adapter_config\.json"):
        lorakit.load(fresh, tmp_path / "missing", name="x")
    assert lorakit.adapter_names(fresh) == ["default", "p"] and lorakit.active_adapter(fresh) == "default"


def test_detach_and_context_manager() -> None:
    model = LLAMA.build(0)
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = output(model, X)
    add(add(model, "lora", "a"), "dora", "b")
    dora = output(model, X)
    with lorakit.use_adapter(model, "a"):
        lora = output(model, X)
        with lorakit.use_adapter(model, None):
            assert torch.equal(output(model, X), base)
            with lorakit.disabled(model):  # nothing active: already the base model
                assert torch.equal(output(model, X), base)
        assert lorakit.active_adapter(model) == "a"
    with pytest.raises(RuntimeError, match="inside"), lorakit.use_adapter(model, "a"):
        raise RuntimeError("inside")
    assert lorakit.active_adapter(model) == "b" and torch.equal(output(model, X), dora)

    lorakit.detach(model, "a")  # an inactive one
    assert lorakit.adapter_names(model) == ["b"] and torch.equal(output(model, X), dora)
    lorakit.attach(model, make_config(lorakit.get_method("lora"), LLAMA), name="a")
    perturb(model, seed=3)
    assert torch.equal(output(model, X), lora)
    lorakit.detach(model)  # the active one: base model until set_active
    assert lorakit.active_adapter(model) is None and torch.equal(output(model, X), base)
    with pytest.raises(lorakit.LorakitError, match=r"no lorakit adapter is active.*\['b'\].*set_active"):
        lorakit.get_state(model)
    lorakit.set_active(model, "b")
    lorakit.detach(model, "b")
    after = dict(model.named_modules())
    assert list(after) == list(modules) and all(after[n] is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


@pytest.mark.parametrize("bad", ["../up", "a/b", "", ".hidden", "a..b", "x" * 65, 3])
def test_unsafe_names_are_refused(bad) -> None:
    model = LLAMA.build(0)
    with pytest.raises(lorakit.ConfigError, match=r"adapter name .* is not allowed"):
        lorakit.attach(model, lorakit.LoraConfig(r=2), name=bad)
    assert not hasattr(model, "_lorakit") and not hasattr(model, "_lorakit_adapters")


def test_refusals_name_the_adapters(tmp_path: Path) -> None:
    model = add(add(LLAMA.build(0), "lora", "a"), "pissa", "b")
    with pytest.raises(lorakit.LorakitError, match=r"no adapter named 'zz'.*\['a', 'b'\]"):
        lorakit.set_active(model, "zz")
    with pytest.raises(lorakit.LorakitError, match=r"no adapter named 'zz'"):
        lorakit.detach(model, "zz")
    with pytest.raises(lorakit.LorakitError, match=r"no adapter named 'zz'"):
        lorakit.save(model, tmp_path, name="zz")
    with pytest.raises(lorakit.LorakitError, match=r"already has a lorakit adapter.*asked for 'a'"):
        lorakit.attach(model, lorakit.LoraConfig(r=2), name="a")
    with pytest.raises(lorakit.LorakitError, match=r"merge_and_unload would fold adapter 'b'.*\['a'\]"):
        lorakit.merge_and_unload(model)
    pissa = output(model, X)
    lorakit.merge(model)
    with pytest.raises(lorakit.LorakitError, match=r"cannot attach adapter 'c' next to it: the active adapter 'b' "
                                                   r"is merged.*unmerge\(model\)"):
        lorakit.attach(model, lorakit.LoraConfig(r=2), name="c")
    with pytest.raises(lorakit.LorakitError, match=r"cannot switch to 'a': the active adapter 'b' is merged"):
        lorakit.set_active(model, "a")
    with pytest.raises(lorakit.LorakitError, match=r"cannot load adapter 'c' next to it: the active adapter 'b'"):
        lorakit.load(model, tmp_path, name="c")
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapter(model) == "b"
    lorakit.unmerge(model)
    assert_close(output(model, X), pissa, 1e-5, "after unmerge")
    # a failed attach next to another adapter leaves the previous one active
    with pytest.raises(lorakit.TargetError, match="matched no module"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=("nope",)), name="c")
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapter(model) == "b"
    assert_close(output(model, X), pissa, 1e-5, "after a failed attach")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_pissa_next_to_lora_is_bit_exact(kind: str) -> None:
    from lorakit.core.quant import quantize_model

    def fresh() -> nn.Module:
        return quantize_model(LLAMA.build(0), kind)

    base = output(fresh(), X)
    expected = {method: output(add(fresh(), method, None), X) for method in ("pissa", "lora")}
    model = add(add(fresh(), "pissa", "p"), "lora", "l")  # W0 stays packed: PiSSA sets its residual aside exactly
    for name in ("l", "p", None, "p", "l"):
        lorakit.set_active(model, name)
        assert torch.equal(output(model, X), base if name is None else expected["pissa" if name == "p" else "lora"])
    lorakit.detach(model, "p")
    lorakit.detach(model, "l")
    assert torch.equal(output(model, X), base)


def test_switching_follows_the_model_device() -> None:
    bert = KINDS["bert"]
    model = add(add(bert.build(0), "pissa", "p", kind=bert), "lora", "l", kind=bert)
    model.to("meta")  # moves the active adapter and the base only
    for name in ("p", None, "l"):
        lorakit.set_active(model, name)
        assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_lorakit_trainer_trains_the_active_adapter_as_alone(tmp_path: Path) -> None:
    from lorakit.train.trainer import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    features = [{"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
                for ids in (torch.randint(3, 100, (10,), generator=g).tolist() for _ in range(8))]
    train_config = {"steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False}
    single = add(LLAMA.build(0), "dora", None)
    train(single, features, TrainConfig(output_dir=str(tmp_path / "alone"), **train_config), pad_token_id=0)
    model = add(add(LLAMA.build(0), "lora", "l"), "dora", "d")
    with lorakit.use_adapter(model, "l"):
        other = output(model, X)
    train(model, features, TrainConfig(output_dir=str(tmp_path / "named"), **train_config), pad_token_id=0)
    assert (tmp_path / "named" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "alone" / "adapter" / "adapter_model.safetensors").read_bytes()
    lorakit.set_active(model, "l")
    assert torch.equal(output(model, X), other)


def test_boosting_rounds_merged_next_to_another_adapter_stay_out_of_its_base() -> None:
    lora, _ = alone("lora")
    model = add(LLAMA.build(0), "lora", "l")
    lorakit.attach(model, lorakit.XgbLoraConfig(r=1, kappa=1, target_modules="all-linear", layer_fraction=1.0), name="x")
    train_steps(model, LLAMA.batches(), steps=3, lr=0.1)  # a round merged into W0 every step
    layer = lorakit.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.base_offset_B is not None and layer.base_offset_B.shape[1] == 3
    boosted = output(model, X)
    lorakit.set_active(model, "l")
    assert torch.equal(output(model, X), lora)
    assert torch.equal(layer.base.weight, W0_Q)
    lorakit.set_active(model, "x")
    assert torch.equal(output(model, X), boosted)

