"""The pieces every front end shares: `lorakit.core.driver` (init, step loss, optimizer reset) and
`lorakit.core.checkpoint` (the atomic directory swap)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import lorakit
from lorakit.core.checkpoint import find_latest, write_atomically
from lorakit.core.driver import data_init, init_batches, reset_optimizer, step_loss
from lorakit.core.hooks import TrainingHooks
from lorakit.core.loss import model_loss
from lorakit.io.persistence import adapter_tensors
from tests.tiny_models import KINDS
from tests.tiny_models import attach as tiny_attach

MLP = KINDS["mlp"]


def test_write_atomically_swaps_in_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    def write(text: str) -> Any:
        return lambda d: (d / "state.json").write_text(text)

    assert find_latest(tmp_path, "ckpt", "state.json") is None
    final = write_atomically(tmp_path, "ckpt", write("1"))
    assert final == tmp_path / "ckpt" and (final / "state.json").read_text() == "1"

    def broken(d: Path) -> None:
        (d / "state.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path, "ckpt", broken)
    assert (tmp_path / "ckpt" / "state.json").read_text() == "1"  # the last good one, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no leftover sibling
    write_atomically(tmp_path, "ckpt", write("2"))
    assert (find_latest(tmp_path, "ckpt", "state.json") / "state.json").read_text() == "2"
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt-old")  # a crash between the two renames
    assert find_latest(tmp_path, "ckpt", "state.json") == tmp_path / ".ckpt-old"


def test_init_batches_take_the_first_samples_in_batches() -> None:
    features = [{"x": i} for i in range(10)]
    batches = init_batches(features, samples=7, batch_size=3, collate=lambda chunk: [f["x"] for f in chunk])
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


def test_failed_data_init_puts_the_adapter_back() -> None:
    kind = KINDS["llama"]
    model = lorakit.attach(kind.build(0), lorakit.LoraGaConfig(r=2), initialize=False)
    before = {k: v.clone() for k, v in adapter_tensors(model).items()}
    state = lorakit.get_state(model)

    w0 = {name: layer.weight.detach().clone() for name, layer in state.layers.items()}

    def half_then_fail(model: Any, layers: Any, config: Any, data: Any, loss_fn: Any) -> None:
        for layer in layers.values():
            layer.lora_A.data.add_(1.0)
            layer.move_base(torch.ones(layer.out_features, 1), torch.ones(1, layer.in_features))
        raise RuntimeError("init failed half way")

    state.method = dataclasses.replace(state.method, initialize=half_then_fail)
    with pytest.raises(RuntimeError, match="half way"):
        data_init(model, kind.batches(n=1))
    after = adapter_tensors(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # W0 put back from the residual and offset (the init keeps no W0): (W0 - 1) + 1 in float32, two roundings
    eps = torch.finfo(torch.float32).eps
    assert all(((layer.weight - w0[name]).abs() <= eps * (w0[name].abs() + 1)).all()
               for name, layer in state.layers.items())


class _Recorder(TrainingHooks):
    needs_logits = True

    def after_forward(self, batch: Any, loss: Tensor, logits: Tensor | None) -> None:
        self.seen = (batch, loss, logits)

    def regularizer(self) -> Tensor | None:
        return self.seen[2].square().mean()


def test_step_loss_hands_the_forward_to_the_hooks() -> None:
    kind = KINDS["llama"]
    model = lorakit.attach(kind.build(0), lorakit.LoraConfig(r=2))
    hooks = _Recorder(model, lorakit.get_state(model).layers, lorakit.get_state(model).config)
    batch = kind.batches(n=1)[0]
    task, reg = step_loss(model, batch, hooks)
    seen_batch, seen_loss, logits = hooks.seen
    assert seen_batch is batch and not seen_loss.requires_grad and torch.equal(seen_loss, task.detach())
    assert torch.allclose(task, model_loss(model, batch))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.allclose(logits, model(**inputs).logits, atol=1e-6)  # every position, on the supervised path too
    assert reg is not None and reg.requires_grad


def test_reset_optimizer_is_a_fresh_optimizer_in_the_same_object() -> None:
    model = lorakit.attach(MLP.build(0), lorakit.LoraConfig(r=2))
    hooks = lorakit.hooks(model)
    layers = lorakit.adapter_layers(model)
    layers["lin0"].lora_B.requires_grad_(False)
    optimizer = hooks.build_optimizer([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**MLP.batches(n=1)[0]).loss.backward()
    optimizer.step()
    assert optimizer.state
    layers["lin0"].lora_B.requires_grad_(True)  # became trainable
    layers["lin1"].lora_A.requires_grad_(False)  # frozen
    hooks.optimizer_reset_requested = True
    same = reset_optimizer(model, hooks, optimizer, lr=0.05, weight_decay=0.0)
    assert same is optimizer and not optimizer.state and not hooks.optimizer_reset_requested
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(layers["lin0"].lora_B) in params and id(layers["lin1"].lora_A) not in params
    assert all(g["lr"] == g["base_lr"] == 0.05 for g in optimizer.param_groups)


@pytest.mark.parametrize("name", sorted(lorakit.methods()))
def test_every_hooks_class_declares_the_state_a_checkpoint_carries(name: str) -> None:
    kind = KINDS["llama"]
    model = tiny_attach(kind.build(0), lorakit.get_method(name), kind)
    hooks = lorakit.hooks(model)
    assert hooks.state_dict()[2] == []  # every public attribute is declared (or it would be lost on resume)
    assert {"total_steps", "optimizer_reset_requested"} <= set(hooks.declared_state())


def test_undeclared_hook_state_is_reported() -> None:
    model = lorakit.attach(MLP.build(0), lorakit.LoraConfig(r=2))
    hooks = lorakit.hooks(model)
    hooks.counter = 3
    plain, _, unsupported = hooks.state_dict()
    assert unsupported == ["counter"] and "counter" not in plain and plain["total_steps"] is None
