"""Hostile adapter files, case by case: the config schema, non-finite and oversized tensors, the base offsets a
method owns, fingerprint entries, deep JSON and catastrophic regexes.  Each refusal is a `LorakitError` naming
the file and the item, and leaves the model as it was."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.config import check_schema
from lorakit.core.inject import find_targets, regex_matcher
from lorakit.errors import AdapterConfigError, AdapterFileError, ConfigError, TargetError
from lorakit.io.persistence import read_adapter_config
from tests.tiny_models import KINDS, output, perturb

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LAYER = "model.layers.0.self_attn.q_proj"


def save_adapter(directory: Path, config: lorakit.AdapterConfig, merge: bool = False) -> torch.Tensor:
    """Attach ``config`` to the tiny Llama, perturb, save; ``merge``: merge a boosting round on every other layer.
    Returns the adapter's outputs."""
    kind = KINDS["llama"]
    model = lorakit.attach(kind.build(0), config)
    perturb(model, std=0.1)
    if merge:
        layers = lorakit.get_state(model).layers
        for name in sorted(layers)[::2]:
            layers[name].merge_booster(1.0)
        perturb(model, seed=8, std=0.1)
    lorakit.save(model, directory)
    return output(model, kind.inputs())


@pytest.fixture
def lora_dir(tmp_path: Path) -> Path:
    save_adapter(tmp_path / "lora", lorakit.LoraConfig(r=4, alpha=8))
    return tmp_path / "lora"


def edit_config(directory: Path, edit: Any) -> None:
    data = json.loads((directory / CONFIG).read_text())
    edit(data)
    (directory / CONFIG).write_text(json.dumps(data))


def edit_tensors(directory: Path, edit: Any) -> None:
    tensors = load_file(directory / WEIGHTS)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS)


def refused(directory: Path, match: str, error: type[Exception] = AdapterFileError) -> str:
    """Load into a fresh tiny Llama: ``error`` matching ``match``, and the model as it was."""
    kind = KINDS["llama"]
    model = kind.build(0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = output(model, kind.inputs())
    with pytest.raises(error, match=match) as err:
        lorakit.load(model, directory)
    assert getattr(model, "_lorakit", None) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(output(model, kind.inputs()), before)
    return str(err.value)


# -- the config schema ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "match"), [
    ("use_rslora", "no", r"'use_rslora' must be true or false, got 'no'"),
    ("use_rslora", -1, r"'use_rslora' must be true or false, got -1"),
    ("alpha", "x", r"'alpha' must be a number, got 'x'"),
    ("alpha", float("inf"), r"'alpha' must be a finite number, got inf"),
    ("alpha", float("nan"), r"'alpha' must be a finite number, got nan"),
    ("r", True, r"'r' must be an integer, got True"),
    ("r", 4.0, r"'r' must be an integer, got 4.0"),
    ("dropout", None, r"'dropout' must be a number, got None"),
    ("target_modules", [1], r"'target_modules' must be str \| tuple\[str, ...\], got \[1\]"),
    ("modules_to_save", None, r"'modules_to_save' must be a list, got None"),
    ("seed", "0", r"'seed' must be an integer"),
])
def test_config_value_of_wrong_type(lora_dir: Path, key: str, value: Any, match: str) -> None:
    edit_config(lora_dir, lambda d: d["config"].__setitem__(key, value))
    message = refused(lora_dir, match, error=AdapterConfigError)
    assert str(lora_dir / CONFIG) in message and "lora config" in message


def test_config_out_of_range_is_a_config_error_naming_the_file(lora_dir: Path) -> None:
    edit_config(lora_dir, lambda d: d["config"].__setitem__("dropout", 2.0))
    message = refused(lora_dir, r"dropout must be in \[0, 1\), got 2.0", error=ConfigError)
    assert str(lora_dir / CONFIG) in message


def test_rank_beyond_every_layer_is_refused_before_allocating(lora_dir: Path) -> None:
    edit_config(lora_dir, lambda d: d["config"].__setitem__("r", 10**12))
    refused(lora_dir, r"config 'r' is 1000000000000, larger than every targeted layer \(the largest dimension is 64\)")


@pytest.mark.parametrize(("key", "value", "match"), [
    ("config", None, r"'config' must be an object, found None"),
    ("method", [], r"'method' must be a method name \(string\), found \[\]"),
    ("method", "nope", r"unknown method 'nope'"),
    ("fingerprint", [], r"'fingerprint' must be an object"),
    ("base_model", 5, r"'base_model' must be a string, found 5"),
    ("modules_to_save", [1], r"'modules_to_save' must be a list of module names"),
    ("base_offsets", {LAYER: "x"}, r"'base_offsets' must be an object \(layer name -> positive rank\)"),
    ("lorakit_format_version", True, r"format version True"),
    ("lorakit_format_version", 0, r"'lorakit_format_version' must be an integer from 1 to 1, found 0"),
])
def test_top_level_value_of_wrong_type(lora_dir: Path, key: str, value: Any, match: str) -> None:
    edit_config(lora_dir, lambda d: d.__setitem__(key, value))
    assert str(lora_dir / CONFIG) in refused(lora_dir, match)


@pytest.mark.parametrize(("entry", "value", "match"), [
    ("shape", "x", r"'shape' must be two positive integers, found 'x'"),
    ("shape", [32, True], r"'shape' must be two positive integers"),
    ("norm", float("nan"), r"'norm' must be a finite number >= 0, found nan"),
    ("norm", "1", r"'norm' must be a finite number >= 0, found '1'"),
    ("probe", [0.0] * 15, r"'probe' must be a list of 16 finite numbers"),
    ("probe", ["x"] * 16, r"'probe' must be a list of 16 finite numbers"),
])
def test_fingerprint_entry_of_wrong_type(lora_dir: Path, entry: str, value: Any, match: str) -> None:
    edit_config(lora_dir, lambda d: d["fingerprint"][LAYER].__setitem__(entry, value))
    assert f"fingerprint of '{LAYER}'" in refused(lora_dir, match)


def test_fingerprint_entry_that_is_not_an_object(lora_dir: Path) -> None:
    edit_config(lora_dir, lambda d: d["fingerprint"].__setitem__(LAYER, None))
    refused(lora_dir, r"must be an object with 'shape', 'norm' and 'probe', found None")


def test_deeply_nested_json(lora_dir: Path) -> None:
    (lora_dir / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    refused(lora_dir, r"is not valid JSON \(RecursionError")


def test_every_method_config_round_trips_through_the_schema() -> None:
    """The schema knows every field type of every method; a saved config passes it unchanged."""
    for method in lorakit.methods().values():
        config = method.config_class(r=4, target_modules=("q_proj",))
        assert method.config_class.from_dict(json.loads(json.dumps(config.to_dict()))) == config, method.name
        assert check_schema(method.config_class, config.to_dict()) is not None


# -- tensors --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_tensor_entry(lora_dir: Path, value: float) -> None:
    edit_tensors(lora_dir, lambda t: t[f"{LAYER}.lora_A"].view(-1).__setitem__(5, value))
    refused(lora_dir, rf"tensor '{LAYER}\.lora_A' holds NaN or inf values")


@pytest.mark.parametrize("method_name", ["lora", "dora", "lora-xs"])
def test_huge_finite_tensor_entry(method_name: str, tmp_path: Path) -> None:
    """3e38 is finite, but no training writes it: refused by the bound on loaded tensors and updates."""
    save_adapter(tmp_path, lorakit.get_method(method_name).config_class(r=4))
    edit_tensors(tmp_path, lambda t: t[f"{LAYER}.lora_A"].view(-1).__setitem__(0, 3e38))
    refused(tmp_path, rf"the loaded (tensor|update of layer) '{LAYER}.*' has entries up to (3e\+38|inf), expected at "
                      r"most .* \(100000 x max\(1, max\|W0\|\)\)")


def test_huge_alpha_is_refused_by_the_update_bound(lora_dir: Path) -> None:
    edit_config(lora_dir, lambda d: d["config"].__setitem__("alpha", 1e30))
    refused(lora_dir, r"the loaded update of layer '.*' has entries up to .*e\+2\d, expected at most")


def test_float16_and_float64_tensors_load(lora_dir: Path, tmp_path: Path) -> None:
    reference = output(lorakit.load(KINDS["llama"].build(0), lora_dir), KINDS["llama"].inputs())
    edit_tensors(lora_dir, lambda t: t.update({k: v.double() for k, v in t.items()}))
    loaded = output(lorakit.load(KINDS["llama"].build(0), lora_dir), KINDS["llama"].inputs())
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn])
def test_non_float_tensor(lora_dir: Path, dtype: torch.dtype) -> None:
    edit_tensors(lora_dir, lambda t: t.__setitem__(f"{LAYER}.lora_B", t[f"{LAYER}.lora_B"].to(dtype)))
    refused(lora_dir, rf"tensor '{LAYER}\.lora_B' has dtype {dtype}, expected float")


# -- base offsets -----------------------------------------------------------------------------------------------
def test_offsets_injected_into_a_lora_adapter(lora_dir: Path) -> None:
    """LoRA never moves W0: offsets in its file would silently rewrite the base weights."""
    edit_tensors(lora_dir, lambda t: t.update({f"{LAYER}.base_offset_B": torch.randn(32, 2),
                                               f"{LAYER}.base_offset_A": torch.randn(2, 32)}))
    refused(lora_dir, rf"unexpected tensors: base-offset factors for \['{LAYER}'\], which the adapter does not declare")
    edit_config(lora_dir, lambda d: d.__setitem__("base_offsets", {LAYER: 2}))
    refused(lora_dir, rf"'base_offsets' lists \['{LAYER}'\], but lora never moves the base weights")


def test_xgblora_round_trip_with_merged_rounds(tmp_path: Path) -> None:
    expected = save_adapter(tmp_path, lorakit.get_method("xgblora").config_class(r=4), merge=True)
    recorded = read_adapter_config(tmp_path)["base_offsets"]
    assert len(recorded) == 7 and set(recorded.values()) == {4}  # every other of the 14 layers, rank 4
    loaded = lorakit.load(KINDS["llama"].build(0), tmp_path)
    torch.testing.assert_close(output(loaded, KINDS["llama"].inputs()), expected, rtol=1e-5, atol=1e-5)


def test_xgblora_merged_rounds_removed(tmp_path: Path) -> None:
    """The merged boosting rounds are part of the adapter: a file without them is incomplete, not a lighter one."""
    save_adapter(tmp_path, lorakit.get_method("xgblora").config_class(r=4), merge=True)
    layer = sorted(read_adapter_config(tmp_path)["base_offsets"])[0]
    edit_tensors(tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith(layer + ".base_offset_")])
    refused(tmp_path, rf"layer '{layer}' lacks its base-offset factors")
    edit_config(tmp_path, lambda d: d.pop("base_offsets"))  # a record removed too: the other offsets are unexpected
    refused(tmp_path, r"unexpected tensors: base-offset factors for")


def test_offset_rank_must_match_the_record(tmp_path: Path) -> None:
    save_adapter(tmp_path, lorakit.get_method("xgblora").config_class(r=4), merge=True)
    layer = sorted(read_adapter_config(tmp_path)["base_offsets"])[0]
    edit_config(tmp_path, lambda d: d["base_offsets"].__setitem__(layer, 8))
    refused(tmp_path, rf"base-offset factors of '{layer}' have shapes .* at the recorded rank 8")


def test_integer_offsets(tmp_path: Path) -> None:
    save_adapter(tmp_path, lorakit.get_method("pissa").config_class(r=4))
    edit_tensors(tmp_path, lambda t: t.__setitem__(f"{LAYER}.base_offset_A", t[f"{LAYER}.base_offset_A"].long()))
    refused(tmp_path, rf"tensor '{LAYER}\.base_offset_A' has dtype torch.int64, expected float")


def test_pissa_file_without_the_offsets_record_loads(tmp_path: Path) -> None:
    """PiSSA moves every layer's W0, so its offsets need no record (files written before the record existed)."""
    expected = save_adapter(tmp_path, lorakit.get_method("pissa").config_class(r=4))
    edit_config(tmp_path, lambda d: d.pop("base_offsets"))
    loaded = lorakit.load(KINDS["llama"].build(0), tmp_path)
    torch.testing.assert_close(output(loaded, KINDS["llama"].inputs()), expected, rtol=1e-5, atol=1e-5)


def test_methods_declare_their_base_offsets() -> None:
    declared = {name: m.base_offsets for name, m in lorakit.methods().items() if m.base_offsets != "none"}
    assert declared == {"pissa": "every-layer", "olora": "every-layer", "lora-ga": "every-layer",
                        "ba-lora": "every-layer", "xgblora": "merged-rounds", "cola": "merged-rounds"}
    assert all(m.moves_base == (m.base_offsets == "every-layer") for m in lorakit.methods().values())


# -- target_modules regexes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pattern", "match"), [
    ("(.|.)*q", r"took over 1.0 s to match the module names \(catastrophic backtracking\)"),
    ("a{1000000}", r"counted repeats \(\{n\}\) whose bounds multiply to 1000000"),
    ("((a{100}){100}){100}", r"bounds multiply to 1000000"),
    ("a" * 1001, r"regex is 1001 characters long; at most 1000"),
])
def test_hostile_regex_in_an_adapter_file_returns_quickly(lora_dir: Path, pattern: str, match: str) -> None:
    edit_config(lora_dir, lambda d: d["config"].__setitem__("target_modules", pattern))
    start = time.monotonic()
    assert str(lora_dir / CONFIG) in refused(lora_dir, match)
    assert time.monotonic() - start < 20  # a 1 s budget; the regex timeout overshoots on a busy machine


def test_regex_matches_as_before() -> None:
    model = KINDS["llama"].build(0)
    found = [n for n, _ in find_targets(model, r"model\.layers\.\d+\.self_attn\.(q|v)_proj")]
    assert found == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    matches = regex_matcher(r"(.*)*X")  # the pattern: regex's matcher does not backtrack on it
    assert not any(matches(n) for n, _ in model.named_modules())
    with pytest.raises(TargetError, match="not a valid regular expression"):
        regex_matcher("q_proj([")


def test_attach_with_a_catastrophic_regex_raises_target_error() -> None:
    model: nn.Module = KINDS["llama"].build(0)
    with pytest.raises(TargetError, match="catastrophic backtracking"):
        lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules="(.|.)*q"))


# -- loading cost -----------------------------------------------------------------------------------------------
def test_twenty_thousand_pattern_keys_compile_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20k-key rank_pattern (2k regex keys, 18k module names) compiles each regex key once, not once per key x
    layer x call (which took 88 s to load); plain names need no regex.  The first matching key still wins."""
    import regex
    keys: dict[str, int] = {f"layers\\.{i}\\.never_proj": 2 for i in range(2000)}
    keys.update({f"model.layers.{i}.self_attn.x_proj": 2 for i in range(18000)})
    keys[r"layers\.0\.self_attn\.q_proj"] = 2
    save_adapter(tmp_path / "a", lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                    rank_pattern=keys))
    compiled = []
    original = regex.compile
    monkeypatch.setattr(regex, "compile", lambda pattern, *a, **k: compiled.append(pattern) or original(pattern, *a,
                                                                                                           **k))
    model = lorakit.load(KINDS["llama"].build(0), tmp_path / "a")
    layers = lorakit.get_state(model).layers
    assert layers[LAYER].lora_A.shape[0] == 2 and layers["model.layers.1.self_attn.q_proj"].lora_A.shape[0] == 4
    assert 2001 <= len(compiled) <= 2 * 2001, len(compiled)  # at most one config built per file read and attach


def _with_extra_tensor(path: Path, name: str, nbytes: int) -> None:
    """Declare an extra float32 tensor of ``nbytes`` after the others; its data is a hole (a sparse file)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    header[name] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [len(data), len(data) + nbytes]}
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)
        f.truncate(8 + len(text) + len(data) + nbytes)


def test_names_shapes_and_dtypes_are_checked_before_any_tensor_data_is_read(
        lora_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 6 GiB extra tensor (once a raw MemoryError) and a wrong shape are refused from the header alone."""
    import lorakit.io.persistence as persistence
    reads: list[str] = []
    real = persistence.safe_open

    class Counting:
        def __init__(self, *args: Any) -> None:
            self.file = real(*args)

        def __enter__(self) -> Any:
            handle = self.file.__enter__()
            return type("Handle", (), {"keys": handle.keys, "get_slice": handle.get_slice,
                                       "get_tensor": lambda _, k: reads.append(k) or handle.get_tensor(k)})()

        def __exit__(self, *exc: Any) -> None:
            self.file.__exit__(*exc)

    monkeypatch.setattr(persistence, "safe_open", Counting)
    _with_extra_tensor(lora_dir / WEIGHTS, "model.layers.0.self_attn.q_proj.extra", 6 << 30)
    refused(lora_dir, r"unexpected tensors \['model.layers.0.self_attn.q_proj.extra'\]")
    assert reads == []
    edit_tensors(lora_dir, lambda t: t.pop("model.layers.0.self_attn.q_proj.extra"))
    edit_tensors(lora_dir, lambda t: t.update({f"{LAYER}.lora_B": torch.zeros(32, 5)}))
    refused(lora_dir, rf"tensor '{LAYER}\.lora_B' has shape \(32, 5\), expected \(32, 4\)")
    assert reads == []
    edit_tensors(lora_dir, lambda t: t.update({f"{LAYER}.lora_B": torch.zeros(32, 4)}))
    lorakit.load(KINDS["llama"].build(0), lora_dir)
    assert f"{LAYER}.lora_B" in reads  # data is read once everything was checked


def test_weights_that_are_not_a_regular_file_are_refused_without_blocking(lora_dir: Path) -> None:
    (lora_dir / WEIGHTS).unlink()
    os.mkfifo(lora_dir / WEIGHTS)
    refused(lora_dir, r"adapter_model.safetensors is not a regular file")
