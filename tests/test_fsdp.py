"""FSDP2 under torchrun: 2 CPU processes (gloo) with ``fsdp=True`` hold half of every frozen base weight each and
train the same adapter as one process, for each method of `tests.fsdp_train.METHODS` (one launch for all), and
resume a sharded run bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.api import STATE_ATTR
from lorakit.errors import ConfigError
from lorakit.train.trainer import TrainConfig, train
from tests.ddp_train import features
from tests.fsdp_train import METHODS, build_model, run
from tests.torchrun import torchrun


def test_sharded_runs_match_single_process_runs_and_write_the_same_adapter(tmp_path):
    torchrun("tests/fsdp_train.py", tmp_path / "fsdp", timeout=300)
    sharded = json.loads((tmp_path / "fsdp" / "sharded.json").read_text())
    # q_proj is 32 x 32: each of the 2 ranks held 16 rows of the base weight, as a DTensor; the ranks' adapters agree
    assert sharded == {name: {"type": "DTensor", "local_rows": 16, "ranks_agree": True}
                       for name in (*METHODS, "prilora")}

    for name in METHODS:
        single = run(name, str(tmp_path / "single" / name))
        one, two = tmp_path / "single" / name, tmp_path / "fsdp" / name
        a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys(), name
        initial = lorakit.io.persistence.adapter_tensors(build_model(name))
        moved = 0
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=0, atol=1e-5), f"{name} {key}"
            moved += key in initial and not torch.allclose(a[key], initial[key], rtol=0, atol=1e-4)
        assert moved > 0, name  # training changed the adapter
        config_one = json.loads((one / "adapter" / "adapter_config.json").read_text())
        config_two = json.loads((two / "adapter" / "adapter_config.json").read_text())
        assert config_two == config_one, name  # same method, config and fingerprints of the (unsharded) base
        records = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
        assert [r["loss"] for r in records] == pytest.approx(single.losses, abs=1e-5), name
        assert (two / "checkpoint" / "trainer_state.json").is_file()
    run("lora", str(tmp_path / "single" / "lora-short"), batch_size=3, group_by_length=False)
    short = [load_file(str(tmp_path / kind / "lora-short" / "adapter" / "adapter_model.safetensors"))
             for kind in ("single", "fsdp")]
    assert all(torch.allclose(short[0][k], short[1][k], rtol=0, atol=1e-5) for k in short[0])
    resumed = load_file(str(tmp_path / "fsdp" / "xgblora-resumed" / "adapter" / "adapter_model.safetensors"))
    full = load_file(str(tmp_path / "fsdp" / "xgblora" / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)


def test_fsdp_needs_torchrun():
    model = build_model("lora")
    with pytest.raises(ConfigError, match="fsdp=True shards the model across torchrun ranks"):
        train(model, features(), TrainConfig(steps=1, batch_size=4, progress=False, fsdp=True))


def _trainer(tmp_path, model, callback):
    from transformers import Trainer, TrainingArguments, default_data_collator

    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=[{"input_ids": i, "labels": i} for i in ids],
                   data_collator=default_data_collator, callbacks=[callback])


def test_hf_callback_refuses_deepspeed_zero3_and_accelerate_fsdp_at_attach(tmp_path, monkeypatch):
    from lorakit.integrations import hf
    from lorakit.integrations.hf import LorakitCallback
    from tests.tiny_models import KINDS

    monkeypatch.setattr(hf, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(lorakit.LorakitError, match="DeepSpeed ZeRO-3 partitions the base weights"):
        _trainer(tmp_path, KINDS["llama"].build(0), LorakitCallback(lorakit.LoraConfig(r=2)))
    monkeypatch.undo()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    model = KINDS["llama"].build(0)
    with pytest.raises(lorakit.LorakitError, match="does not support accelerate's FSDP"):
        _trainer(tmp_path, model, LorakitCallback(lorakit.LoraConfig(r=2)))
    assert getattr(model, STATE_ATTR, None) is None  # refused before anything was attached


def test_a_model_sharded_elsewhere_is_refused():
    """A model that FSDP2 sharded after the adapter was attached (accelerate wraps in ``Trainer.train``), or before."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    from lorakit.integrations.hf import LorakitCallback
    from tests.tiny_models import KINDS

    model = lorakit.attach(KINDS["llama"].build(0), lorakit.LoraConfig(r=2))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(lorakit.LorakitError, match="does not support accelerate's FSDP"):
            LorakitCallback().on_train_begin(None, TrainerState(), TrainerControl(), model=model)
        # lorakit's trainer shards the model itself, after attach; it refuses one sharded already, and attach
        # refuses a sharded base
        with pytest.raises(ConfigError, match="already sharded"):
            train(model, features(), TrainConfig(steps=1, batch_size=4, progress=False, fsdp=True))
        bare = KINDS["llama"].build(0)
        fully_shard(bare, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(lorakit.LorakitError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' is sharded"):
            lorakit.attach(bare, lorakit.LoraConfig(r=2))
    finally:
        dist.destroy_process_group()
