"""`torch.compile` (``TrainConfig.compile``, ``lorakit train --compile``): graph breaks in every method's adapter
layer, compiled training steps equal to eager ones, and the methods refused with their reason.

Compiling is slow on CPU, so the per-method checks compile the tiny MLP with ``aot_eager`` (dynamo + AOT autograd:
the graphs inductor would get); inductor itself (the ``--compile`` default) trains once on the MLP, and the CLI flag
once end to end on a tiny Llama.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import lorakit
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.train.compiled import COMPILE_REFUSED
from lorakit.train.trainer import TrainConfig, train
from tests import tiny_models as tiny
from tests.test_cli import train_args
from tests.test_trainer import mlp_collate, mlp_features
from tests.tiny_models import KINDS, save_tiny_lm

METHODS = sorted(lorakit.methods())
LORA_FAMILY = ("lora", "rslora", "pissa", "olora", "lora-sb", "lora-xs", "lora-ga", "dora")
# Graph breaks in one training forward of an adapter layer (after the hooks' before_forward), and why.  Every method
# not listed has none.  A new break fails `test_adapter_layer_graph_breaks`: fix it or record it here.
GRAPH_BREAKS: dict[str, tuple[int, str]] = {
    "flat-lora": (3, "its noise ε is drawn from a torch.Generator seeded inside a custom autograd function (dynamo: "
                     "'An opaque object was created in the middle of the program'); refused by --compile"),
}

# Options that make a method's step-dependent work happen within the 3 compared steps (boosting merges, new links).
WITHIN_THREE_STEPS: dict[str, dict[str, int]] = {"xgblora": {"kappa": 1}, "cola": {"link_steps": 1}}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles fresh models: without a reset the cache of earlier tests' models hits torch's recompile
    limit and dynamo falls back to eager without a word."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", METHODS)
def test_adapter_layer_graph_breaks(name: str) -> None:
    kind = KINDS["llama"]
    model = tiny.attach(kind.build(0), lorakit.get_method(name), kind)
    model.train()
    state = lorakit.get_state(model)
    state.hooks.on_train_begin(3)
    state.hooks.before_forward(0)  # the training forward's state: DyLoRA's sampled rank, Flat-LoRA's noise
    layer = next(iter(state.layers.values()))
    x = torch.randn(2, 8, layer.in_features, requires_grad=True)
    explained = torch._dynamo.explain(layer)(x)
    expected = GRAPH_BREAKS.get(name, (0, ""))[0]
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_break_count == expected, reasons
    assert name not in LORA_FAMILY or expected == 0


def _three_steps(name: str, compile: bool | str) -> tuple[list[float], dict[str, torch.Tensor]]:
    kind = KINDS["mlp"]
    model = tiny.attach(kind.build(0), lorakit.get_method(name), kind, **WITHIN_THREE_STEPS.get(name, {}))
    tiny.perturb(model)  # B ≠ 0: every factor gets a gradient from the first step
    if hasattr(lorakit.hooks(model), "set_validation_data"):  # ALoRA scores ranks on held-out batches
        lorakit.hooks(model).set_validation_data(kind.batches(2, seed=300))
    result = train(model, mlp_features(12), TrainConfig(steps=3, batch_size=4, lr=1e-2, group_by_length=False,
                                                          progress=False, compile=compile), collate=mlp_collate)
    return result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", [n for n in METHODS if n not in COMPILE_REFUSED])
def test_three_compiled_steps_equal_eager(name: str) -> None:
    losses, params = _three_steps(name, False)
    compiled_losses, compiled_params = _three_steps(name, "aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert compiled_losses == pytest.approx(losses, abs=1e-5)
    for key, value in params.items():
        tiny.assert_close(compiled_params[key], value, 1e-5, key)


def test_inductor_steps_equal_eager() -> None:
    """The default backend (inductor: C++ kernels on CPU) trains as eager does."""
    losses, params = _three_steps("lora", False)
    compiled_losses, compiled_params = _three_steps("lora", True)
    assert counters["inductor"], "inductor compiled nothing"
    assert compiled_losses == pytest.approx(losses, abs=1e-5)
    for key, value in params.items():
        tiny.assert_close(compiled_params[key], value, 1e-5, key)


@pytest.mark.parametrize("name", sorted(COMPILE_REFUSED))
def test_refused_methods_name_the_reason(name: str) -> None:
    kind = KINDS["mlp"]
    model = tiny.attach(kind.build(0), lorakit.get_method(name), kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=f"cannot train {name}"):
        train(model, mlp_features(4), TrainConfig(steps=1, batch_size=4, progress=False, compile=True),
              collate=mlp_collate)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match=r"torch\.compile backend"):
        TrainConfig(compile="no-such-backend")


def test_dylora_recompiles_for_every_sampled_rank() -> None:
    """Why DyLoRA is refused: each sampled rank b is a new graph."""
    kind = KINDS["llama"]
    model = tiny.attach(kind.build(0), lorakit.get_method("dylora"), kind)
    model.train()
    layer = next(iter(lorakit.get_state(model).layers.values()))
    graphs = []
    step = torch.compile(layer, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    for b in (1, 2, 3):
        layer.sampled_rank = b
        step(torch.randn(2, 8, layer.in_features))
    assert len(graphs) == 3


def test_cli_compile_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    """``lorakit train --compile`` trains a tiny Llama with its decoder compiled (with aot_eager here: inductor's compile
    of a Llama takes minutes on a loaded CPU; it is tested above); a refused method exits 2 with the reason."""
    model_dir = save_tiny_lm(tmp_path / "model", 32, 64, 2, 4)
    backends, real_compile = [], torch.compile

    def compile_with_aot_eager(fn, backend):
        backends.append(backend)
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    logging.disable(logging.INFO)
    try:
        out = tmp_path / "run"
        code = main(train_args(model_dir, out, "--method", "lora", "-o", "r=2", "--steps", "1", "--eval-limit", "1",
                               "--compile"))
        assert code == 0, capsys.readouterr().err
        capsys.readouterr()
        refused = main(train_args(model_dir, tmp_path / "refused", "--method", "dylora", "--compile"))
    finally:
        logging.disable(logging.NOTSET)
    assert backends == ["inductor"]
    assert counters["stats"]["unique_graphs"] >= 1
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["compile"] is True and len(run["train"]["losses"]) == 1
    assert refused == 2
    assert capsys.readouterr().err.strip().startswith("lorakit: error: compile=True cannot train dylora")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_prilora_input_norms_under_compile_and_checkpointing() -> None:
    """PRILoRA's pruning statistic ‖x‖ is recorded once per compiled forward, with the eager value, also when
    gradient checkpointing recomputes the forward inside the compiled backward."""
    kind = KINDS["llama"]
    model = tiny.attach(kind.build(0), lorakit.get_method("prilora"), kind)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = list(lorakit.get_state(model).layers.values())
    step = torch.compile(model, backend="aot_eager")
    for seed in (1, 2):  # the second call runs the cached graph: the attribute write is replayed, not traced
        batch = kind.batches(1, seed=seed)[0]
        step(**batch).loss.backward()
        compiled_norms = [layer.input_norms for layer in layers]
        model(**batch).loss.backward()
        for layer, norms in zip(layers, compiled_norms):
            assert torch.equal(norms, layer.input_norms), layer.name
