"""Bad input: each case raises a `LorakitError` whose message names the item and says what to do, and a failed
attach or load leaves the model exactly as it was."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.core.layer import AdapterLayer
from lorakit.errors import UnknownMethodError
from tests.tiny_models import KINDS, assert_close, output, perturb

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# -- helpers ------------------------------------------------------------------------------------------------
class Snapshot:
    """Everything a failed attach/load must leave as it was: module objects, weights, flags, output."""

    def __init__(self, model: nn.Module, inputs: dict) -> None:
        self.modules = dict(model.named_modules())
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.inputs = inputs
        self.out = output(model, inputs)

    def assert_untouched(self, model: nn.Module) -> None:
        assert getattr(model, "_lorakit", None) is None, "an adapter is still attached"
        assert not any(isinstance(m, AdapterLayer) for m in model.modules()), "an adapter layer is left"
        after = dict(model.named_modules())
        assert list(after) == list(self.modules)
        assert all(after[n] is m for n, m in self.modules.items()), "a module object was replaced"
        for key, value in model.state_dict().items():
            assert torch.equal(value, self.weights[key]), f"{key} changed"
        assert {n: p.requires_grad for n, p in model.named_parameters()} == self.flags
        assert torch.equal(output(model, self.inputs), self.out)


def fresh(kind_name: str = "llama") -> tuple[nn.Module, Snapshot]:
    kind = KINDS[kind_name]
    model = kind.build(0)
    return model, Snapshot(model, kind.inputs())


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A trained-looking LoRA adapter of the tiny Llama, saved."""
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=4))
    perturb(model)
    return lorakit.save(model, tmp_path / "adapter")


def edit_config(directory: Path, edit) -> None:
    path = directory / CONFIG
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "lorakit"})


def failed_load(directory: Path, match: str, kind_name: str = "llama",
                error: type[Exception] = lorakit.AdapterFileError) -> str:
    """Load into a fresh model: must raise ``error`` matching ``match`` and leave the model untouched."""
    model, snap = fresh(kind_name)
    with pytest.raises(error, match=match) as err:
        lorakit.load(model, directory)
    assert isinstance(err.value, lorakit.LorakitError)
    snap.assert_untouched(model)
    return str(err.value)


# -- unknown method -----------------------------------------------------------------------------------------
def test_unknown_method_name() -> None:
    with pytest.raises(UnknownMethodError, match=r"unknown method 'nope'") as err:
        lorakit.get_method("nope")
    assert isinstance(err.value, lorakit.LorakitError)
    for name in ("lora", "pissa"):  # lists what is available
        assert name in str(err.value)


def test_config_of_unknown_method() -> None:
    @dataclass(frozen=True)
    class NopeConfig(lorakit.AdapterConfig):
        method: ClassVar[str] = "nope"

    model, snap = fresh()
    with pytest.raises(lorakit.LorakitError, match=r"unknown method 'nope'.*available:.*lora"):
        lorakit.attach(model, NopeConfig(r=2))
    snap.assert_untouched(model)


def test_config_that_is_not_a_lorakit_config() -> None:
    from peft import LoraConfig as PeftLoraConfig

    model, snap = fresh()
    with pytest.raises(lorakit.ConfigError, match=r"lorakit method config.*LoraConfig"):
        lorakit.attach(model, PeftLoraConfig(r=2))
    snap.assert_untouched(model)


def test_config_of_another_method() -> None:
    @dataclass(frozen=True)
    class Foreign(lorakit.AdapterConfig):  # claims to be LoRA but is not a LoraConfig
        method: ClassVar[str] = "lora"

    model, snap = fresh()
    with pytest.raises(lorakit.ConfigError, match=r"method 'lora' takes LoraConfig, got Foreign"):
        lorakit.attach(model, Foreign(r=2))
    snap.assert_untouched(model)


def test_unknown_method_in_adapter_file(saved: Path) -> None:
    edit_config(saved, lambda d: d.update(method="nope"))
    failed_load(saved, r"unknown method 'nope'", error=lorakit.LorakitError)


# -- targets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [("nonexistent",), r"model\.nothing\..*"], ids=["names", "regex"])
def test_no_module_matched_lists_existing_names(targets) -> None:
    model, snap = fresh()
    with pytest.raises(lorakit.TargetError, match="matched no module") as err:
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=targets))
    message = str(err.value)
    assert "nonexistent" in message or "nothing" in message, "the message does not repeat the request"
    assert "model.layers.0.self_attn.q_proj" in message, f"no existing module names listed: {message}"
    snap.assert_untouched(model)


def test_invalid_regex() -> None:
    model, snap = fresh()
    with pytest.raises(lorakit.TargetError, match=r"not a valid regular expression"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules="q_proj(["))
    snap.assert_untouched(model)


@pytest.mark.parametrize("method_name", ["lora", "pissa", "lora-xs"])
def test_rank_larger_than_layer(method_name: str) -> None:
    model, snap = fresh("mlp")  # lin2 is 32 -> 8
    method = lorakit.get_method(method_name)
    with pytest.raises(lorakit.ConfigError, match=r"r=9 is larger than min\(d_in, d_out\) = 8") as err:
        lorakit.attach(model, method.config_class(r=9, target_modules=("lin1", "lin2")))
    assert "'lin2'" in str(err.value) and "lower r" in str(err.value)
    snap.assert_untouched(model)


@pytest.mark.parametrize(("kind_name", "target", "type_name"), [
    ("llama", "embed_tokens", "Embedding"),
    ("llama", "input_layernorm", "LlamaRMSNorm"),
    ("bert", "bert.embeddings.LayerNorm", "LayerNorm"),
])
def test_incompatible_layer_type(kind_name: str, target: str, type_name: str) -> None:
    model, snap = fresh(kind_name)
    with pytest.raises(lorakit.TargetError, match=rf"is a {type_name}; lorakit wraps nn.Linear") as err:
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=(target,)))
    assert target in str(err.value) and "Narrow target_modules" in str(err.value)
    snap.assert_untouched(model)


def test_unknown_modules_to_save() -> None:
    model, snap = fresh("bert")
    with pytest.raises(lorakit.TargetError, match=r"modules_to_save entry 'head' matched no module.*bert"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, modules_to_save=("head",)))
    snap.assert_untouched(model)


def test_attach_twice() -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    layers = dict(lorakit.adapter_layers(model))
    with pytest.raises(lorakit.LorakitError, match=r"already has a lorakit adapter; detach\(model\) it first"):
        lorakit.attach(model, lorakit.PissaConfig(r=2))
    assert lorakit.adapter_layers(model) == layers  # the first adapter is intact
    assert not any(isinstance(m.base, AdapterLayer) for m in layers.values())


def test_data_driven_init_without_data() -> None:
    methods = [m for m in lorakit.methods().values() if m.needs_data]
    if not methods:
        pytest.skip("no data-driven method registered")
    for method in methods:
        model, snap = fresh()
        with pytest.raises(lorakit.LorakitError, match=r"pass data="):
            lorakit.attach(model, method.config_class(r=2))
        snap.assert_untouched(model)


@pytest.mark.parametrize(("data", "loss_fn", "match"), [
    ([], None, r"init data is empty"),
    ([{"input_ids": torch.ones(2, 8, dtype=torch.long)}], None, r"returned no loss: include labels"),
    (None, lambda model, batch: model(**batch).loss * float("nan"), r"loss of init batch 0 is nan"),
], ids=["empty", "no-labels", "nan-loss"])
def test_data_driven_init_failure_leaves_model_untouched(data, loss_fn, match: str) -> None:
    methods = [m for m in lorakit.methods().values() if m.needs_data]
    if not methods:
        pytest.skip("no data-driven method registered")
    for method in methods:
        model, snap = fresh()
        batches = KINDS["llama"].batches() if data is None else data
        with pytest.raises(lorakit.LorakitError, match=match):
            eta = {"init_lr": 1e-3} if method.name == "lora-sb" else {}  # LoRA-SB's η: the bare API needs it
            lorakit.attach(model, method.config_class(r=2, **eta), data=batches, loss_fn=loss_fn)
        snap.assert_untouched(model)


# -- loading: wrong model -------------------------------------------------------------------------------------
def test_load_into_different_base_weights(saved: Path) -> None:
    model = KINDS["llama"].build(seed=1)  # same architecture, other weights
    snap = Snapshot(model, KINDS["llama"].inputs())
    with pytest.raises(lorakit.AdapterFileError, match=r"base weights differ at 'model\.layers\.0\..*load it on"):
        lorakit.load(model, saved)
    snap.assert_untouched(model)


def test_load_into_different_architecture(saved: Path) -> None:
    message = failed_load(saved, r"does not fit this model|matched no module", kind_name="gpt2",
                          error=lorakit.LorakitError)
    assert "q_proj" in message or "c_attn" in message


def test_load_into_model_with_adapter(saved: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    layers = dict(lorakit.adapter_layers(model))
    with pytest.raises(lorakit.LorakitError, match="already has a lorakit adapter"):
        lorakit.load(model, saved)
    assert lorakit.adapter_layers(model) == layers


# -- loading: tensors -----------------------------------------------------------------------------------------
KEY = "model.layers.1.self_attn.v_proj.lora_B"


def test_missing_tensor(saved: Path) -> None:
    edit_tensors(saved, lambda t: t.pop(KEY))
    message = failed_load(saved, r"tensors missing from the file")
    assert KEY in message


def test_extra_tensor(saved: Path) -> None:
    extra = "model.layers.1.self_attn.v_proj.lora_C"
    edit_tensors(saved, lambda t: t.update({extra: torch.zeros(2, 2)}))
    message = failed_load(saved, r"unexpected tensors")
    assert extra in message


def test_extra_tensor_for_missing_layer(saved: Path) -> None:
    extra = "model.layers.7.self_attn.v_proj.lora_A"
    edit_tensors(saved, lambda t: t.update({extra: torch.zeros(4, 32)}))
    assert extra in failed_load(saved, r"unexpected tensors")


def test_misshapen_tensor(saved: Path) -> None:
    edit_tensors(saved, lambda t: t.update({KEY: torch.zeros(t[KEY].shape[0], 3)}))
    message = failed_load(saved, r"has shape \(16, 3\), expected \(16, 4\)")
    assert KEY in message


def test_missing_modules_to_save_tensor(tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["bert"].build(0), lorakit.LoraConfig(r=2, modules_to_save=("classifier",)))
    lorakit.save(model, tmp_path)
    edit_tensors(tmp_path, lambda t: t.pop("modules_to_save.classifier.weight"))
    assert "modules_to_save.classifier.weight" in failed_load(tmp_path, r"tensors missing", kind_name="bert")


def test_integer_tensor(saved: Path) -> None:
    edit_tensors(saved, lambda t: t.update({KEY: t[KEY].to(torch.int32)}))
    assert KEY in failed_load(saved, r"dtype torch.int32, expected float")


@pytest.mark.parametrize("method_name", ["olora", "pissa"])
def test_missing_base_offset(method_name: str, tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.get_method(method_name).config_class(r=4))
    lorakit.save(model, tmp_path)
    key = "model.layers.0.mlp.up_proj.base_offset_A"
    edit_tensors(tmp_path, lambda t: t.pop(key))
    message = failed_load(tmp_path, r"lacks its base-offset factors")
    assert "'model.layers.0.mlp.up_proj'" in message


@pytest.mark.parametrize("method_name", ["olora", "pissa"])
def test_misshapen_base_offset(method_name: str, tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.get_method(method_name).config_class(r=4))
    lorakit.save(model, tmp_path)
    key = "model.layers.0.mlp.up_proj.base_offset_A"
    edit_tensors(tmp_path, lambda t: t.update({key: torch.zeros(4, 7)}))
    assert "model.layers.0.mlp.up_proj" in failed_load(tmp_path, r"base-offset factors .* do not fit")


@pytest.mark.parametrize("keep", [0.5, 0.99, 4], ids=["half", "last-byte", "header-only"])
def test_truncated_safetensors(saved: Path, keep: float) -> None:
    path = saved / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep) if keep < 1 else int(keep)])
    failed_load(saved, r"adapter_model\.safetensors is truncated or corrupt")


def test_garbage_safetensors(saved: Path) -> None:
    (saved / WEIGHTS).write_bytes(bytes(range(256)) * 8)
    failed_load(saved, r"adapter_model\.safetensors is truncated or corrupt")


def test_missing_weights_file(saved: Path) -> None:
    (saved / WEIGHTS).unlink()
    failed_load(saved, r"no adapter_model\.safetensors in")


def test_not_an_adapter_directory(tmp_path: Path) -> None:
    failed_load(tmp_path, r"no adapter_config\.json in .*not an adapter directory")
    failed_load(tmp_path / "does-not-exist", r"no adapter_config\.json")


# -- loading: config JSON -------------------------------------------------------------------------------------
def test_unknown_config_keys_warn_and_are_ignored(saved: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = lorakit.load(KINDS["llama"].build(0), saved)
    expected = output(reference, KINDS["llama"].inputs())
    edit_config(saved, lambda d: d["config"].update(future_option=3, use_magic=True))
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        model = lorakit.load(KINDS["llama"].build(0), saved)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("future_option" in w and "use_magic" in w for w in warnings), warnings
    assert_close(output(model, KINDS["llama"].inputs()), expected, 1e-6, "load with unknown keys")


@pytest.mark.parametrize("key", ["r", "target_modules"])
def test_missing_required_config_key(saved: Path, key: str) -> None:
    edit_config(saved, lambda d: d["config"].pop(key))
    failed_load(saved, rf"config is missing the required key '{key}'")


@pytest.mark.parametrize("key", ["method", "config", "fingerprint"])
def test_missing_required_top_level_key(saved: Path, key: str) -> None:
    edit_config(saved, lambda d: d.pop(key))
    failed_load(saved, rf"missing the required key '{key}'")


def test_invalid_config_value(saved: Path) -> None:
    edit_config(saved, lambda d: d["config"].update(r=0))
    failed_load(saved, r"r must be a positive integer, got 0", error=lorakit.ConfigError)


def test_newer_format_version(saved: Path) -> None:
    edit_config(saved, lambda d: d.update(lorakit_format_version=99))
    failed_load(saved, r"format version 99; this lorakit reads up to 1: upgrade lorakit")


def test_corrupt_config_json(saved: Path) -> None:
    (saved / CONFIG).write_text('{"method": "lora", ')
    failed_load(saved, r"is not valid JSON")


def test_peft_adapter_directory(tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    perturb(model)
    lorakit.export_peft(model, tmp_path)
    edit_config(tmp_path, lambda d: d.update(peft_type="IA3"))
    failed_load(tmp_path, r"peft_type is 'IA3'; lorakit loads PEFT LoRA adapters")


# -- save / export in the wrong state --------------------------------------------------------------------------
def test_save_while_merged(tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    lorakit.merge(model)
    with pytest.raises(lorakit.LorakitError, match=r"is merged; unmerge\(model\) before saving"):
        lorakit.save(model, tmp_path / "a")
    assert not (tmp_path / "a" / CONFIG).exists()


def test_export_while_merged(tmp_path: Path) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    lorakit.merge(model)
    with pytest.raises(lorakit.LorakitError, match=r"merged into the base weights; unmerge\(model\) before exporting"):
        lorakit.export_peft(model, tmp_path / "a")


def test_no_adapter_attached(tmp_path: Path) -> None:
    model, snap = fresh()
    for call in (lorakit.merge, lorakit.unmerge, lorakit.detach, lorakit.adapter_layers,
                 lambda m: lorakit.save(m, tmp_path), lambda m: lorakit.export_peft(m, tmp_path)):
        with pytest.raises(lorakit.LorakitError, match=r"no lorakit adapter is attached.*lorakit\.attach"):
            call(model)
    with pytest.raises(lorakit.LorakitError, match=r"no lorakit adapter is attached"), lorakit.disabled(model):
        pass
    snap.assert_untouched(model)


# -- merge ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_nonfinite_merge(value: float) -> None:
    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    perturb(model)
    name = "model.layers.1.mlp.gate_proj"
    with torch.no_grad():
        lorakit.adapter_layers(model)[name].lora_A[0, 3] = value
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.LorakitError, match=rf"refusing to merge: layer '{name}' has NaN or inf"):
        lorakit.merge(model, safe=True)
    with pytest.raises(lorakit.LorakitError, match=rf"layer '{name}'"):
        lorakit.merge_and_unload(model)
    assert not any(layer.merged for layer in lorakit.adapter_layers(model).values())
    for key, value_after in model.state_dict().items():
        assert torch.equal(value_after, before[key]) or key.endswith("gate_proj.lora_A"), key
