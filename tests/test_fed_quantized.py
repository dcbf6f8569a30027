"""Federated runs on a quantized base (``FedConfig(quantize=...)`` / ``lorakit fed --quantize``): every party loads
the tiny classifier in nf4, Fed-SB's aggregate stays exactly centralised LoRA-SB on that nf4 base, and the adapter
records the quantized base's fingerprint.  FedEx-LoRA, which folds residuals into W0, is refused on it."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit import api
from lorakit.cli import build_parser
from lorakit.fed import checkpoint, local
from lorakit.fed.config import FedConfig
from lorakit.fed.errors import CheckpointError, FedConfigError, FedError
from lorakit.fed.strategies import STRATEGIES, fed_sb, fedsb_shared_init
from lorakit.io.persistence import adapter_tensors
from lorakit.models import load_model
from lorakit.train.data import collate
from lorakit.train.trainer import TrainConfig, train
from tests.test_fed_common import save_tiny_classifier, tiny_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


def test_fed_sb_on_an_nf4_base_equals_centralised_lora_sb_and_keeps_the_nf4_fingerprint(tiny_dir, tmp_path) -> None:
    """Three clients with the same data, one local step each: Fed-SB's init (from the clients' gradient sums on
    the nf4 base) and its aggregate are centralised LoRA-SB training on the same nf4 base, within 1e-6."""
    cfg = tiny_config(tiny_dir, tmp_path, strategy="fed-sb", local_steps=1, lr=1e-2, quantize="nf4")
    ws = local.workspace(cfg)
    assert {layer.quant for layer in ws.layers.values()} == {"nf4"}
    assert local.workspace(cfg.replace(quantize=None)) is not ws  # a float base is another model
    ws = local.workspace(cfg)
    features = local.client_features(cfg, 0, cfg.clients)

    model, tokenizer = load_model(str(tiny_dir), "classification", num_labels=2, quantize="nf4")
    batches = [collate(features[:cfg.init_samples][i:i + cfg.batch_size], tokenizer.pad_token_id).inputs
               for i in range(0, cfg.init_samples, cfg.batch_size)]
    api.attach(model, api.get_state(ws.model).config, data=batches)
    head = {k: v.detach().clone() for k, v in adapter_tensors(model).items() if k.startswith("modules_to_save.")}
    train(model, features, TrainConfig(steps=1, batch_size=cfg.batch_size, lr=1e-2, schedule="constant", warmup_steps=0,
                                       seed=local.local_seed(cfg, 1, 0), log_every=0, progress=False, save_adapter=False),
          pad_token_id=tokenizer.pad_token_id)
    central = adapter_tensors(model)

    init = fedsb_shared_init([local.gradient_sum(ws, features) for _ in range(cfg.clients)],
                             api.get_state(ws.model).config)
    updates = []
    for _ in range(cfg.clients):
        local.load_tensors(ws, {**init, **head})
        local.set_base_offsets(ws, {})  # what a client does each round: the quantized W0 stays as loaded
        local.train_round(ws, features, 1, 0)
        updates.append(local.select(ws, "trainable"))
    federated = fed_sb(updates, [len(features)] * cfg.clients).tensors
    assert set(federated) == {k for k in central if STRATEGIES["fed-sb"].is_trainable(k)}
    for key in init:
        if not key.endswith("lora_R"):
            torch.testing.assert_close(init[key], central[key], atol=1e-6, rtol=0, msg=key)
    for key, value in federated.items():
        torch.testing.assert_close(value, central[key], atol=1e-6, rtol=0, msg=key)
    assert max(float((federated[k] - init[k]).abs().max()) for k in init if k.endswith("lora_R")) > 1e-4

    local.load_tensors(ws, {**init, **federated})  # the global adapter, saved from the server's nf4 workspace
    lorakit.save(ws.model, tmp_path / "global")
    saved = json.loads((tmp_path / "global" / "adapter_config.json").read_text())["fingerprint"]
    assert set(saved) == set(ws.layers) and {entry["quant"] for entry in saved.values()} == {"nf4"}
    fresh, _ = load_model(str(tiny_dir), "classification", num_labels=2, quantize="nf4")
    loaded = adapter_tensors(lorakit.load(fresh, tmp_path / "global"))  # the fingerprint matches the nf4 base
    assert all(torch.equal(loaded[k], v) for k, v in adapter_tensors(ws.model).items())
    with pytest.raises(FedError, match="quantized \\(nf4\\) and cannot hold them"):
        local.set_base_offsets(ws, {next(iter(ws.layers)): torch.zeros(1)})


def test_quantize_is_validated_refused_with_fedex_lora_and_fixed_across_a_resume(tiny_dir, tmp_path) -> None:
    with pytest.raises(FedConfigError, match="quantize must be one of nf4, fp4"):
        FedConfig(quantize="q4")
    with pytest.raises(FedConfigError, match="fedex-lora folds each round's residual into the base weights"):
        FedConfig(strategy="fedex-lora", quantize="nf4")
    args = build_parser().parse_args(["fed", "--quantize", "int8", "--strategy", "fedit"])
    assert args.quantize == "int8"
    cfg = FedConfig.from_record(FedConfig(quantize="nf4", output_dir=str(tmp_path)).to_record())
    assert cfg.quantize == "nf4"
    checkpoint.save(tmp_path, checkpoint.ServerState(round=1), cfg)
    with pytest.raises(CheckpointError, match="quantize"):
        checkpoint.load(tmp_path, cfg.replace(quantize=None))


@pytest.mark.parametrize("strategy", ["fedit", "ffa-lora"])
def test_lora_strategies_train_on_an_nf4_base(tiny_dir, tmp_path, strategy) -> None:
    """A LoRA client round on the nf4 BERT (bitsandbytes' 4-bit matmul with a bias returns a view, which the LoRA
    layer must not add to in place): the trainable factors move, the quantized W0 does not."""
    cfg = tiny_config(tiny_dir, tmp_path, strategy=strategy, local_steps=2, quantize="nf4")
    ws = local.workspace(cfg)
    local.reset(ws)
    packed = {name: layer.base.weight.detach().clone() for name, layer in ws.layers.items()}
    before = local.select(ws, "trainable")
    metrics = local.train_round(ws, local.client_features(cfg, 0, cfg.clients), 1, 0)
    after = local.select(ws, "trainable")
    assert torch.isfinite(torch.tensor(metrics["train-loss"]))
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_" in k)
    assert all(torch.equal(packed[n], layer.base.weight) for n, layer in ws.layers.items())
