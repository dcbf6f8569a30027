"""Shared pieces of the federated tests (a tiny BERT classifier saved to disk, the in-repo data slice) and tests
of `FedConfig` and the ``lorakit fed`` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.fed.config import FedConfig
from lorakit.fed.errors import FedConfigError

DATA = Path(__file__).resolve().parent / "data"  # the in-repo SST-2 slice (800 train sentences)


def save_tiny_classifier(path: Path) -> Path:
    """A random 2-layer, 32-wide BERT with a 2-class head and MiniLM's tokenizer, saved with save_pretrained
    (so every process, Ray actor and SuperNode loads the same weights by path).  Dropout is off."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorakit.models import minilm_dir
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        classifier_dropout=0.0, max_position_embeddings=128, num_labels=2, initializer_range=0.2)
    BertForSequenceClassification(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def tiny_config(model_dir: Path, tmp: Path, **changes: object) -> FedConfig:
    """A fast run on the tiny model: 300 SST-2 sentences, rank 4, 5 local steps of 8.

    The time limits are generous on purpose: a run without faults never waits for them, and a slow or
    loaded CI machine (Ray starting, every client loading its model) must not turn them into exclusions.
    """
    values = dict(model=str(model_dir), task="sst2", data_dir=str(DATA), clients=3, rounds=2, train_limit=300, r=4,
                  local_steps=5, batch_size=8, max_length=32, eval_split="train", eval_limit=128, init_samples=16,
                  output_dir=str(tmp / "run"), round_timeout=600.0, init_timeout=1800.0)
    values.update(changes)
    return FedConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes", [{"strategy": "fedavg"}, {"partition": "shards"}, {"clients": 0},
                                     {"alpha": 0.0}, {"fraction": 1.5}, {"dp_epsilon": -1.0}, {"dp_delta": 1.0},
                                     {"mode": "cloud"}, {"lora_alpha": 0.0}, {"init_source": "everyone"},
                                     {"weighting": "by-loss"}, {"init_lr": float("inf")}, {"init_lr": 0.0},
                                     {"max_client_examples": 0}, {"host": ""}])
def test_config_rejects_bad_values(changes: dict) -> None:
    with pytest.raises(FedConfigError):
        FedConfig(**changes)


def test_config_round_trips_through_a_flower_record() -> None:
    from flwr.app import ConfigRecord
    cfg = FedConfig(strategy="fedex-lora", clients=4, alpha=0.3, dp_epsilon=2.0, lr=5e-4, resume=True)
    back = FedConfig.from_record(ConfigRecord(cfg.to_record()))
    assert back == cfg


def test_fed_sb_init_lr_is_the_official_dp_scripts_lr_over_every_clients_steps() -> None:
    """η = lr / (len(pooled loader) × local_epochs) in the official script = lr over the local steps all sampled
    clients take in the run: 10 clients × 10 steps × 5 rounds; half the clients sampled per round halve it."""
    cfg = FedConfig(strategy="fed-sb", lr=1e-2, clients=10, rounds=5, local_steps=10)
    assert cfg.sb_init_lr == pytest.approx(1e-2 / 500)
    assert FedConfig(strategy="fed-sb", rounds=5, local_steps=10).sb_init_lr == pytest.approx(1e-2 / 500)  # DEFAULT_LR
    assert cfg.replace(fraction=0.5).sb_init_lr == pytest.approx(1e-2 / 250)
    assert cfg.replace(init_lr=3e-6).sb_init_lr == 3e-6  # an explicit η wins


def test_cli_fed_help_shows_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", "fed", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for text in ("--strategy", "fed-sb", "--clients", "[default: 10]", "--partition", "--dp-epsilon", "--mode",
                 "simulation", "deployment", "--resume", "--init-source", "--init-data", "--weighting", "--tls",
                 "--supernode-auth", "--host", "--max-client-examples"):
        assert text in out
