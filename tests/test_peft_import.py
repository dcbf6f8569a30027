"""`lorakit.load` on PEFT LoRA adapter directories: PEFT-trained adapters give PEFT's outputs, lorakit -> PEFT ->
lorakit round trips, and whatever lorakit cannot reproduce exactly is refused with an `AdapterFileError`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file
from tiny_models import KINDS
from torch import Tensor, nn
from transformers import AutoTokenizer, LlamaForCausalLM

import lorakit
from lorakit.api import STATE_ATTR
from lorakit.cli import main
from lorakit.core.layer import AdapterLayer
from lorakit.io.peft_export import export_peft
from lorakit.methods.dora import export_peft_dora
from lorakit.methods.lora import pattern_key
from lorakit.models import minilm_dir

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def output(model: nn.Module, kind: str) -> Tensor:
    with torch.no_grad():
        return model(**KINDS[kind].inputs()).logits


def peft_trained(kind: str, directory: Path, steps: int = 3, **options: Any) -> Tensor:
    """A PEFT adapter trained ``steps`` Adam steps from a random B (``init_lora_weights=False``), saved to
    ``directory``; returns PEFT's output on the fixed batch."""
    model = get_peft_model(KINDS[kind].build(0), PeftLoraConfig(init_lora_weights=False, **options))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for batch in KINDS[kind].batches(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(str(directory))
    return output(model, kind)


CASES = {
    "lora-list": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    "rslora-all-linear": ("llama", {"r": 4, "lora_alpha": 3, "use_rslora": True, "target_modules": "all-linear"}),
    "dora": ("llama", {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "down_proj"]}),
    "patterns-regex": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": r".*\.(q|k|v)_proj",
                                 "rank_pattern": {"layers.0.self_attn.q_proj": 2, "v_proj": 3},
                                 "alpha_pattern": {"k_proj": 5, "layers\\.1\\..*q_proj": 2.5}}),
    "dora-rslora-patterns": ("llama", {"r": 4, "lora_alpha": 8, "use_dora": True, "use_rslora": True,
                                       "target_modules": ["q_proj", "o_proj"], "rank_pattern": {"o_proj": 2},
                                       "alpha_pattern": {"layers.1.self_attn.q_proj": 16}}),
    "exclude-modules": ("llama", {"r": 2, "target_modules": ["q_proj", "v_proj"], "exclude_modules": ["layers.1.self_attn.v_proj"]}),
    "exclude-regex": ("llama", {"r": 2, "target_modules": r".*_proj", "exclude_modules": r".*\.mlp\..*"}),
    "gpt2-conv1d": ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
    "bert-modules-to-save": ("bert", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
                                      "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_trained_adapter_gives_peft_outputs(case: str, tmp_path: Path) -> None:
    kind, options = CASES[case]
    expected = peft_trained(kind, tmp_path, **options)
    base = output(KINDS[kind].build(0), kind)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the outputs: the comparison tests something
    model = lorakit.load(KINDS[kind].build(0), tmp_path).eval()
    torch.testing.assert_close(output(model, kind), expected, atol=1e-5, rtol=1e-5)
    state = lorakit.get_state(model)
    assert state.method.name == ("dora" if options.get("use_dora") else
                                 "rslora" if options.get("use_rslora") else "lora")
    peft_ranks = {k[len("base_model.model."):-len(".lora_A.weight")]: v.shape[0]
                  for k, v in load_file(tmp_path / WEIGHTS).items() if k.endswith("lora_A.weight")}
    assert {n: layer.lora_A.shape[0] for n, layer in state.layers.items()} == peft_ranks
    if "rank_pattern" in options:  # per-layer ranks, as PEFT gives them
        assert len(set(peft_ranks.values())) > 1
    if kind == "bert":  # SEQ_CLS: PEFT trains the classifier as a modules_to_save copy
        assert list(state.saved_modules) == ["classifier"]
    # lorakit's own save/load keeps the result (the patterns are part of LoraConfig)
    lorakit.save(model, tmp_path / "lorakit")
    again = lorakit.load(KINDS[kind].build(0), tmp_path / "lorakit").eval()
    torch.testing.assert_close(output(again, kind), expected, atol=1e-5, rtol=1e-5)


def test_lorakit_peft_lorakit_round_trip(tmp_path: Path) -> None:
    config = lorakit.LoraConfig(r=4, alpha=6, target_modules=("q_proj", "v_proj", "up_proj"),
                                rank_pattern={"up_proj": 2}, alpha_pattern={"layers.0.self_attn.v_proj": 1.5},
                                init_weights=False)
    model = lorakit.attach(KINDS["llama"].build(0), config).eval()
    expected = output(model, "llama")
    assert model.model.layers[0].mlp.up_proj.lora_A.shape == (2, 32)
    for rank_pattern in (False, True):
        directory = tmp_path / f"peft-{rank_pattern}"
        export_peft(model, directory, rank_pattern=rank_pattern)
        loaded = lorakit.load(KINDS["llama"].build(0), directory).eval()
        torch.testing.assert_close(output(loaded, "llama"), expected, atol=1e-5, rtol=1e-5)
    dora = lorakit.attach(KINDS["llama"].build(0), lorakit.DoraConfig(r=2, target_modules=("q_proj",),
                                                                       init_weights=False)).eval()
    with torch.no_grad():
        for layer in lorakit.get_state(dora).layers.values():
            layer.lora_magnitude.mul_(1.1)
    export_peft_dora(dora, tmp_path / "dora")
    loaded = lorakit.load(KINDS["llama"].build(0), tmp_path / "dora").eval()
    torch.testing.assert_close(output(loaded, "llama"), output(dora, "llama"), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("peft")
    peft_trained("llama", directory, steps=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return directory


def hostile(source: Path, target: Path, config: Any = None, tensors: Any = None) -> Path:
    target.mkdir()
    data = json.loads((source / CONFIG).read_text())
    weights = load_file(source / WEIGHTS)
    if config:
        config(data)
    if tensors:
        tensors(weights)
    (target / CONFIG).write_text(json.dumps(data))
    save_file(weights, target / WEIGHTS)
    return target


def refused(directory: Path, match: str, kind: str = "llama") -> None:
    model = KINDS[kind].build(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.AdapterFileError, match=match):
        lorakit.load(model, directory)
    assert getattr(model, STATE_ATTR, None) is None
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def _set(**values: Any) -> Any:
    return lambda d: d.update(values)


HOSTILE_CONFIGS = {
    "ia3": (_set(peft_type="IA3"), r"peft_type is 'IA3'; lorakit loads PEFT LoRA"),
    "loha": (_set(peft_type="LOHA"), r"peft_type is 'LOHA'"),
    "bias": (_set(bias="all"), r"option 'bias' is set to 'all'; lorakit cannot reproduce it"),
    "layers_to_transform": (_set(layers_to_transform=[0]), r"option 'layers_to_transform'"),
    "unknown-option": (_set(use_future_trick=True), r"option 'use_future_trick'"),
    "pissa-init": (_set(init_lora_weights="pissa"), r"init_lora_weights='pissa' is not one of .*move or quantize"),
    "dora-fan-in-fan-out": (_set(use_dora=True, fan_in_fan_out=True), r"use_dora with fan_in_fan_out"),
    "rank-mismatch": (_set(r=3), r"needs lora_A 3x32 .* found \(4, 32\)"),
    "rank-pattern-mismatch": (_set(rank_pattern={"q_proj": 2}), r"rank 2 from the config"),
    "targets-without-factors": (_set(target_modules=["q_proj", "v_proj", "o_proj"]),
                                r"selects layers the file has no factors for \['model.layers.0.self_attn.o_proj'"),
    "excluded-layers-with-factors": (_set(exclude_modules=["v_proj"]),
                                     r"has factors for layers it does not select \['model.layers.0.self_attn.v_proj'"),
    "bad-pattern-regex": (_set(rank_pattern={"(": 2}), r"pattern key '\('"),
    "bad-alpha": (_set(lora_alpha=-1), r"alpha must be positive"),
    "null-alpha": (_set(lora_alpha=None), r"lora_alpha must be a number, found None; PEFT cannot load"),
    "string-r": (_set(r="4"), r"r must be a number, found '4'"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_foreign_peft_config_refused(case: str, peft_dir: Path, tmp_path: Path) -> None:
    edit, match = HOSTILE_CONFIGS[case]
    refused(hostile(peft_dir, tmp_path / case, config=edit), match)


def test_hostile_peft_tensors_refused(peft_dir: Path, tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    refused(hostile(peft_dir, tmp_path / "nan", tensors=lambda t: t[key].fill_(float("nan"))), r"NaN or inf")
    refused(hostile(peft_dir, tmp_path / "int", tensors=lambda t: t.update({key: t[key].long()})), r"dtype torch.int64")
    refused(hostile(peft_dir, tmp_path / "huge", tensors=lambda t: t[key].fill_(1e6)),
            r"tensor .model.layers.0.self_attn.q_proj.lora_B. has entries up to 1e\+06")
    refused(hostile(peft_dir, tmp_path / "extra", tensors=lambda t: t.update(evil=torch.zeros(2))),
            r"unexpected tensor 'evil'")
    refused(hostile(peft_dir, tmp_path / "magnitude", tensors=lambda t: t.update(
        {key.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(32)})), r"unexpected tensors")
    # the adapter of another base model: the layers do not exist, or have other shapes
    refused(peft_dir, r"layer 'model.layers.0.self_attn.q_proj' is missing in this model", kind="gpt2")
    wide = hostile(peft_dir, tmp_path / "wide", tensors=lambda t: t.update(
        {k: torch.zeros(4, 64) for k in t if k.endswith("lora_A.weight")}))
    refused(wide, r"needs lora_A 4x32 .* found \(4, 64\)")


def test_pickled_peft_weights_never_loaded(peft_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / CONFIG).write_text((peft_dir / CONFIG).read_text())
    (directory / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    refused(directory, r"adapter_model.bin \(pickle\), which lorakit never loads.*safetensors")


def test_cli_merge_export_peft_adapter(peft_dir: Path, tmp_path: Path) -> None:
    """``lorakit merge|export ADAPTER --model M`` with a PEFT adapter directory (in process: `cli.main`): the
    merged model and the re-exported adapter compute the PEFT adapter's outputs."""
    KINDS["llama"].build(0).save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(tmp_path / "base")  # merge saves one
    for command in ("merge", "export"):
        assert main([command, str(peft_dir), "--model", str(tmp_path / "base"), "--out", str(tmp_path / command)]) == 0
    expected = output(lorakit.load(KINDS["llama"].build(0), peft_dir).eval(), "llama")
    again = lorakit.load(KINDS["llama"].build(0), tmp_path / "export").eval()
    torch.testing.assert_close(output(again, "llama"), expected, atol=1e-5, rtol=1e-5)
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merge").eval()
    torch.testing.assert_close(output(merged, "llama"), expected, atol=1e-5, rtol=1e-5)


def test_pattern_keys_match_as_in_peft() -> None:
    """`pattern_key` picks the key PEFT's ``get_pattern_key`` picks (first match, regex on a dotted suffix)."""
    # literal keys (matched without a regex, '.' still any character) and regex keys, in PEFT's order
    keys = ["layers.0.self_attn.q_proj", "v_proj", r"layers\.1\..*", "proj", "k_pro", "a.b", "", "x\n.y"]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj", "v_proj", "model.layers.10.mlp.proj",
             "model.layersX0.self_attn.q_proj", "m.a_b", "ma_b", "a.b", "m.", "m\n.a.b", "x\nzy", "m.x\n.y"]
    for name in names:
        ours = pattern_key(dict.fromkeys(keys), name)
        assert (ours if ours is not None else name) == get_pattern_key(keys, name), name
    config = lorakit.LoraConfig(r=8, alpha=16, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 2})
    assert config.rank_for("a.v_proj") == 4 and config.scale_for("a.v_proj") == pytest.approx(2 / 2)
    assert config.rank_for("a.q_proj") == 8 and config.scale_for("a.q_proj") == pytest.approx(16 / 8 ** 0.5)
    with pytest.raises(lorakit.ConfigError, match="rank_pattern/alpha_pattern are supported by"):
        lorakit.PissaConfig(rank_pattern={"v_proj": 4})
    with pytest.raises(lorakit.ConfigError, match=r"rank_pattern\['v_proj'\] must be a positive integer"):
        lorakit.LoraConfig(rank_pattern={"v_proj": 0})


def test_peft_embedding_lora_refused(tmp_path: Path) -> None:
    peft_trained("llama", tmp_path, steps=1, r=2, target_modules=["q_proj", "embed_tokens"])
    refused(tmp_path, r"adapts an Embedding layer; lorakit adapts nn.Linear and Conv1D layers only")
