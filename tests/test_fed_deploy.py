"""Deployment-shaped runs: a real SuperLink and SuperNodes on loopback, driven by ``flwr run``, with TLS and
SuperNode authentication; and what those two refuse (plain HTTP, an unregistered SuperNode)."""

from __future__ import annotations

import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from lorakit.fed import checkpoint, runner, security
from lorakit.fed.config import FedConfig
from tests.test_fed_common import save_tiny_classifier, tiny_config


def test_loopback_superlink_and_two_supernodes_over_tls_with_supernode_auth(tmp_path) -> None:
    model_dir = save_tiny_classifier(tmp_path / "tiny-bert")
    cfg = tiny_config(model_dir, tmp_path, strategy="fedex-lora", clients=2, rounds=2, mode="deployment", tls=True,
                      supernode_auth=True)
    # Bounded, but generously: every round starts a ClientApp process per client (torch, the model), which a slow
    # or loaded machine makes slow; the processes are stopped in a finally whatever happens.
    result = runner.deploy(cfg, workdir=tmp_path / "work", timeout=900)
    assert [h["round"] for h in result["history"]] == [0, 1, 2]
    assert all(h.get("clients") == 2 and not h["excluded"] for h in result["history"][1:]), \
        [h["excluded"] for h in result["history"]]  # each excluded client with its reason
    comm = {int(k): v for k, v in result["comm"].items()}
    assert comm[1]["up"] == comm[2]["up"] > 0
    assert comm[2]["down"] > comm[1]["down"]  # round 2 also carries FedEx-LoRA's folded residuals
    state = checkpoint.load(cfg.output_dir, cfg)
    assert state is not None and state.round == 2 and state.offsets
    work = tmp_path / "work"
    for name in ("superlink.log", "supernode-0.log", "supernode-1.log"):
        assert (work / name).is_file()
    assert "Uvicorn running on https://127.0.0.1" in (work / "superlink.log").read_text()
    for key in ("certificates/server.key", "keys/supernode-0", "keys/supernode-1"):
        assert stat.S_IMODE((work / key).stat().st_mode) == 0o600, key


def test_tls_refuses_plain_http_and_auth_refuses_an_unregistered_supernode(tmp_path) -> None:
    cfg = FedConfig(clients=1, mode="deployment", supernode_auth=True, output_dir=str(tmp_path / "run"))
    assert cfg.use_tls  # SuperNode authentication needs TLS
    with runner.federation(cfg, tmp_path) as (_, env):
        toml = (tmp_path / "flwr-home" / "config.toml").read_text()
        address = toml.split('address = "')[1].split('"')[0]
        assert "insecure" not in toml and "root-certificates" in toml
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{address}/", timeout=10)
        trusted = ssl.create_default_context(cafile=str(tmp_path / "certificates" / "ca.crt"))
        with pytest.raises(urllib.error.HTTPError) as answered:  # the handshake verifies; no page at "/"
            urllib.request.urlopen(f"https://{address}/", timeout=10, context=trusted)
        assert answered.value.code == 404
        private, _ = security.supernode_keys(tmp_path / "keys", "intruder")  # never registered
        with open(tmp_path / "intruder.log", "wb") as sink:
            intruder = subprocess.Popen([runner._executable("flower-supernode"), "--root-certificates",
                                         str(tmp_path / "certificates" / "ca.crt"), "--auth-supernode-private-key",
                                         str(private), "--superlink", address, "--port", str(runner.free_port()),
                                         "--node-config", "partition-id=0 num-partitions=1"],
                                        stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline, log = time.monotonic() + 120, ""
            while time.monotonic() < deadline and "Failed to activate SuperNode" not in log:
                time.sleep(0.5)
                log = (tmp_path / "intruder.log").read_text()
        finally:
            runner._stop(intruder)
        assert "Failed to activate SuperNode" in log, log[-2000:]
        registered = (tmp_path / "supernode-0.log").read_text()
        assert "Failed to activate" not in registered, registered[-2000:]


def test_non_loopback_host_forces_tls_and_supernode_auth() -> None:
    assert not FedConfig().use_tls and not FedConfig().use_supernode_auth  # loopback: optional
    assert FedConfig(tls=True).use_tls and not FedConfig(tls=True).use_supernode_auth
    for host in ("0.0.0.0", "10.1.2.3", "node.example.org"):
        cfg = FedConfig(host=host)
        assert cfg.use_tls and cfg.use_supernode_auth, host
