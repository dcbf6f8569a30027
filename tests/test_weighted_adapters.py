"""`lorakit.add_weighted_adapter`: "linear" is exactly Σ w_i ΔW_i (each relative to the original W0), "svd" is its
truncated SVD with the Eckart-Young error reported per layer; the result is a plain, PEFT-exportable LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lorakit
from tests.tiny_models import KINDS, assert_close, make_config, output, perturb

LLAMA = KINDS["llama"]
X = LLAMA.inputs()
W0 = {k: v.clone() for k, v in LLAMA.build(0).state_dict().items()}
WEIGHTS = [0.7, -1.3, 0.5]


def add(model: nn.Module, method: str, name: str, seed: int = 0, **changes) -> None:
    m = lorakit.get_method(method)
    lorakit.attach(model, make_config(m, LLAMA, seed=seed, **changes), name=name,
                   data=LLAMA.batches() if m.needs_data else None)
    perturb(model, seed=seed + 3)


@pytest.fixture(scope="module")
def sources() -> nn.Module:
    """LoRA, PiSSA (W0 moved) and another LoRA on one model."""
    model = LLAMA.build(0)
    add(model, "lora", "a")
    add(model, "pissa", "p")
    add(model, "lora", "b", seed=1)
    return model


@torch.no_grad()
def full_updates(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter ``name``'s effective weight minus the original W0, per layer (independent of the export factors)."""
    with lorakit.use_adapter(model, name):
        return {n: layer.weight.float() + layer.delta_weight().float() - W0[f"{n}.weight"]
                for n, layer in lorakit.adapter_layers(model).items()}


def weighted_sum(model: nn.Module, names: list[str], weights: list[float]) -> dict[str, Tensor]:
    total: dict[str, Tensor] = {}
    for name, w in zip(names, weights):
        for layer, update in full_updates(model, name).items():
            total[layer] = total.get(layer, 0) + w * update
    return total


@torch.no_grad()
def combined_deltas(model: nn.Module, name: str) -> dict[str, Tensor]:
    return {n: layer.delta_weight() for n, layer in lorakit.get_state(model, name).layers.items()}


def test_linear_is_the_exact_weighted_sum(sources: nn.Module) -> None:
    names = ["a", "p", "b"]
    expected = weighted_sum(sources, names, WEIGHTS)
    before = {}
    for name in names:
        with lorakit.use_adapter(sources, name):
            before[name] = output(sources, X)
    result = lorakit.add_weighted_adapter(sources, names, WEIGHTS, "mix")
    assert (result.name, result.combination, result.r, result.errors) == ("mix", "linear", 4 + 8 + 4, {})
    assert lorakit.active_adapter(sources) == "mix"
    state = lorakit.get_state(sources)
    assert state.method.name == "lora" and state.config.scale == 1.0
    for layer, delta in combined_deltas(sources, "mix").items():
        assert_close(delta, expected[layer], 1e-5, layer)
    reference = LLAMA.build(0)  # W0 + Σ w_i ΔW_i written into the weights
    with torch.no_grad():
        for layer, update in expected.items():
            reference.get_submodule(layer).weight += update
    assert_close(output(sources, X), output(reference, X), 1e-5, "model output")
    for name in names:  # the sources are untouched
        lorakit.set_active(sources, name)
        assert torch.equal(output(sources, X), before[name])
    lorakit.detach(sources, "mix")


def test_svd_full_rank_is_exact_and_lower_rank_has_the_eckart_young_error(sources: nn.Module) -> None:
    names = ["a", "p"]
    expected = weighted_sum(sources, names, WEIGHTS[:2])
    full = lorakit.add_weighted_adapter(sources, names, WEIGHTS[:2], "full", combination="svd", r=4 + 8)
    assert full.r == 12 and set(full.errors) == set(expected)
    assert max(full.errors.values()) < 1e-5
    for layer, delta in combined_deltas(sources, "full").items():
        assert_close(delta, expected[layer], 1e-5, layer)

    low = lorakit.add_weighted_adapter(sources, names, WEIGHTS[:2], "low", combination="svd", r=2)
    for layer, delta in combined_deltas(sources, "low").items():
        s = torch.linalg.svdvals(expected[layer].double())
        optimal = float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert optimal > 0.1  # a real truncation
        assert low.errors[layer] == pytest.approx(optimal, abs=1e-5)
        assert float((expected[layer] - delta).norm() / expected[layer].norm()) == pytest.approx(optimal, abs=1e-5)
        assert torch.linalg.matrix_rank(delta) == 2
    lorakit.detach(sources, "full")
    lorakit.detach(sources, "low")


def test_dora_combines_by_svd_only() -> None:
    model = LLAMA.build(0)
    add(model, "dora", "d")
    add(model, "lora", "l")
    with pytest.raises(lorakit.LorakitError, match=r"adapter 'd' is dora, whose update is not low-rank.*"
                                                   r"combination='svd'"):
        lorakit.add_weighted_adapter(model, ["l", "d"], [1.0, 1.0], "mix")
    assert lorakit.active_adapter(model) == "l" and lorakit.adapter_names(model) == ["d", "l"]
    expected = weighted_sum(model, ["l", "d"], [1.0, 0.5])
    result = lorakit.add_weighted_adapter(model, ["l", "d"], [1.0, 0.5], "mix", combination="svd", r=3)
    for layer, delta in combined_deltas(model, "mix").items():
        s = torch.linalg.svdvals(expected[layer].double())
        optimal = float((s[3:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        assert result.errors[layer] == pytest.approx(optimal, abs=1e-5)
        assert float((expected[layer] - delta).norm() / expected[layer].norm()) == pytest.approx(optimal, abs=1e-5)


def test_result_exports_to_peft(sources: nn.Module, tmp_path: Path) -> None:
    lorakit.add_weighted_adapter(sources, ["a", "p"], [1.0, 1.0], "both", combination="svd", r=3)
    combined = output(sources, X)
    lorakit.export_peft(sources, tmp_path)
    fresh = lorakit.load(LLAMA.build(0), tmp_path, name="peft")
    assert_close(output(fresh, X), combined, 1e-5, "PEFT round trip")
    lorakit.detach(sources, "both")


@pytest.mark.parametrize(("args", "error", "match"), [
    ((["a"], [1.0, 2.0], "n"), lorakit.ConfigError, r"1 adapters \['a'\] need 1 weights, got 2"),
    ((["a", "a"], [1.0, 2.0], "n"), lorakit.ConfigError, r"lists a name twice"),
    ((["a"], [float("nan")], "n"), lorakit.ConfigError, r"weight of adapter 'a' must be a finite number"),
    ((["a", "zz"], [1.0, 1.0], "n"), lorakit.LorakitError, r"no adapter named 'zz'.*\['a', 'p', 'b'"),
    ((["a"], [1.0], "a"), lorakit.LorakitError, r"already has a lorakit adapter.*asked for 'a'"),
    ((["a"], [1.0], "../n"), lorakit.ConfigError, r"adapter name '\.\./n' is not allowed"),
    ((["a"], [1.0], "n", "cat"), lorakit.ConfigError, r"one of \('linear', 'svd'\).*PEFT's exact 'cat' is "
                                                      r"lorakit's 'linear'"),
    ((["a"], [1.0], "n", "svd"), lorakit.ConfigError, r"combination='svd' needs the rank r="),
    ((["a"], [1.0], "n", "svd", 17), lorakit.ConfigError, r"r=17 is larger than the smallest adapted layer"),
    ((["a"], [1.0], "n", "linear", 2), lorakit.ConfigError, r"'linear' takes no r"),
])
def test_bad_arguments_leave_the_model_as_it_was(sources: nn.Module, args, error, match: str) -> None:
    lorakit.set_active(sources, "b")
    with pytest.raises(error, match=match):
        lorakit.add_weighted_adapter(sources, *args)
    assert lorakit.adapter_names(sources) == ["a", "p", "b"] and lorakit.active_adapter(sources) == "b"


def test_refused_combinations() -> None:
    model = LLAMA.build(0)
    add(model, "pissa", "p", r=8)
    add(model, "lora", "l")
    out = output(model, X)
    with pytest.raises(lorakit.ConfigError, match=r"linear combination has rank 20.*smallest adapted layer.*"
                                                  r"min\(d_out, d_in\) = 16.*combination='svd' with r <= 16"):
        lorakit.add_weighted_adapter(model, ["p", "l"], [1.0, 1.0], "mix")
    assert lorakit.adapter_names(model) == ["p", "l"] and torch.equal(output(model, X), out)
    bert = KINDS["bert"]
    model = bert.build(0)
    lorakit.attach(model, make_config(lorakit.get_method("lora"), bert), name="h")
    with pytest.raises(lorakit.LorakitError, match=r"adapter 'h' trains modules_to_save \['classifier'\]"):
        lorakit.add_weighted_adapter(model, ["h"], [1.0], "mix", combination="svd", r=2)
