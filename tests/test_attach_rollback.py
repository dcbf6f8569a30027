"""A W0-moving init (PiSSA, OLoRA, LoRA-GA) holds one layer's W0 at a time and still undoes a failure.

Each targeted weight of the tiny models is put into memory owned by a NumPy array, so that a weak reference
to the array tells whether that W0 is still alive anywhere (kept by the layer, by a caller, or by an autograd
graph): this counts copies, not bytes or seconds.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.layer import AdapterLayer
from lorakit.methods import lora_ga
from tests.tiny_models import KINDS


def _track_w0(model: nn.Module, names: list[str]) -> dict[str, weakref.ref]:
    """Give each named module's weight NumPy-owned memory (same values); a weak reference per W0."""
    refs = {}
    for name in names:
        weight = model.get_submodule(name).weight
        array = weight.detach().numpy().copy()
        weight.data = torch.from_numpy(array)  # the tensor's storage keeps ``array`` alive, and only it
        refs[name] = weakref.ref(array)
    return refs


def _targets(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")]


def _w0(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}


def _assert_w0_back(model: nn.Module, w0: dict[str, torch.Tensor], offsets: dict[str, torch.Tensor]) -> None:
    """Each weight is W0 within the documented rounding: ``restore_base`` computes ``(W0 - O) + O`` in float32,
    two roundings of at most half an ulp of ``|W0| + |O|`` each."""
    eps = torch.finfo(torch.float32).eps
    for name, before in w0.items():
        after = model.get_submodule(name).weight.detach()
        bound = eps * (before.abs() + offsets.get(name, torch.zeros(())).abs())
        assert ((after - before).abs() <= bound).all(), name


class _Fail(Exception):
    pass


def _count_copies(monkeypatch: pytest.MonkeyPatch, model: nn.Module, refs: dict[str, weakref.ref]) -> list[int]:
    """After every `move_base`: how many moved layers' W0 are still alive (a full float copy each)."""
    counts: list[int] = []
    move = AdapterLayer.move_base

    def counting(layer: AdapterLayer, offset_B: torch.Tensor, offset_A: torch.Tensor) -> None:
        move(layer, offset_B, offset_A)
        moved = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer) and m.base_offset_B is not None]
        moved += [layer.name] if layer.name not in moved else []  # a layer still being built is not in the model
        counts.append(sum(refs[n]() is not None for n in moved))
    monkeypatch.setattr(AdapterLayer, "move_base", counting)
    return counts


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_build_time_init_keeps_no_w0_and_a_failure_rolls_every_layer_back(
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    model = KINDS["llama"].build(0)
    names = _targets(model)
    refs = _track_w0(model, names)
    w0 = _w0(model, names)
    counts = _count_copies(monkeypatch, model, refs)
    config = lorakit.get_method(method).config_class(r=2)
    lorakit.attach(model, config)
    assert len(counts) == len(names) and max(counts) == 0  # no moved layer's W0 outlives its move
    offsets = {n: layer.base_offset_B @ layer.base_offset_A for n, layer in lorakit.adapter_layers(model).items()}
    lorakit.detach(model)
    _assert_w0_back(model, w0, offsets)

    # a failure while building the 5th layer: the four moved ones are put back, nothing is left attached
    model = KINDS["llama"].build(0)
    w0 = _w0(model, names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    layer_class = lorakit.get_method(method).layer_class
    built: list[AdapterLayer] = []
    offsets = {}
    init = layer_class.__init__

    def fifth_fails(self: AdapterLayer, *args: Any) -> None:
        if len(built) == 4:
            raise _Fail("the 5th layer's init failed")
        init(self, *args)
        built.append(self)
        offsets[self.name] = self.base_offset_B @ self.base_offset_A
    monkeypatch.setattr(layer_class, "__init__", fifth_fails)
    with pytest.raises(_Fail):
        lorakit.attach(model, config)
    assert all(layer.base_offset_B is None for layer in built) and len(built) == 4
    assert lorakit.adapter_names(model) == [] and dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    _assert_w0_back(model, w0, offsets)
    changed = [n for n in names if not torch.equal(model.get_submodule(n).weight, w0[n])]
    assert set(changed) <= {layer.name for layer in built}  # the untouched layers are bit for bit


def test_lora_ga_init_keeps_no_w0_and_a_failure_half_way_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    kind = KINDS["llama"]
    model = kind.build(0)
    names = _targets(model)
    refs = _track_w0(model, names)
    counts = _count_copies(monkeypatch, model, refs)
    lorakit.attach(model, lorakit.LoraGaConfig(r=2), data=kind.batches(n=1))
    assert len(counts) == len(names) and max(counts) == 0  # the former originals_kept kept them all: 1, 2, ... 14

    model = kind.build(0)
    w0 = _w0(model, names)
    offsets: dict[str, torch.Tensor] = {}
    init_layer = lora_ga.init_layer

    def third_fails(layer: Any, *args: Any) -> None:
        if len(offsets) == 3:
            raise _Fail("the 4th layer's init failed")
        init_layer(layer, *args)
        offsets[layer.name] = layer.base_offset_B @ layer.base_offset_A
    monkeypatch.setattr(lora_ga, "init_layer", third_fails)
    with pytest.raises(_Fail):
        lorakit.attach(model, lorakit.LoraGaConfig(r=2), data=kind.batches(n=1))
    assert lorakit.adapter_names(model) == [] and len(offsets) == 3
    _assert_w0_back(model, w0, offsets)
    assert all(torch.equal(model.get_submodule(n).weight, w0[n]) for n in names if n not in offsets)


def test_load_checks_before_moving_and_keeps_no_w0(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    kind = KINDS["llama"]
    adapted = lorakit.attach(kind.build(0), lorakit.PissaConfig(r=2))
    directory = lorakit.save(adapted, tmp_path / "pissa")
    model = kind.build(0)
    names = _targets(model)
    refs = _track_w0(model, names)
    counts = _count_copies(monkeypatch, model, refs)
    lorakit.load(model, directory)
    assert len(counts) == len(names) and max(counts) == 0
    for name, layer in lorakit.adapter_layers(model).items():  # the residual `attach` computed, bit for bit
        assert torch.equal(layer.base.weight, lorakit.adapter_layers(adapted)[name].base.weight)
