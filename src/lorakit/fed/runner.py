"""Running a federation: Flower's simulation engine (many virtual clients in one machine, Ray listening on
loopback only), or real processes (a ``flower-superlink`` on ``config.host``, one ``flower-supernode`` per
client, and ``flwr run``), with TLS and SuperNode authentication when asked for and always off loopback
(`security` says what each protects).

Both run the same `ServerApp` and `ClientApp`; both return the server's result (history, bytes) and
leave it, with the per-round checkpoint, in ``config.output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flwr.clientapp import ClientApp

from ..core.files import locked_dir, write_text
from ..ray_loopback import ray_on_loopback
from . import security
from .config import FedConfig
from .errors import FedError
from .server import RESULT_FILE, build_server_app

logger = logging.getLogger(__name__)

APP_NAME = "lorakit-fed"


def output_lock(config: FedConfig) -> contextlib.AbstractContextManager[None]:
    """One run per output directory (`lorakit.core.files.locked_dir`, as `lorakit train` takes it), held by the
    process that starts the federation for its whole run."""
    out = Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FedError(f"cannot create the output directory {out} ({err.strerror or err})") from None
    return locked_dir(out)


def simulate(config: FedConfig, client_app: ClientApp | None = None, actors: int = 1) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation engine with ``config.clients`` virtual SuperNodes.

    Ray, which runs the clients, listens on loopback only (`ray_on_loopback`).  ``actors``: client processes
    working in parallel (one CPU each, as Ray counts them).  ``client_app`` replaces lorakit's (tests wrap it
    in Flower mods to inject faults).
    """
    from flwr.simulation import run_simulation

    from .client import app as default_client_app
    results: list[dict[str, Any]] = []
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": actors}}
    with output_lock(config), ray_on_loopback():
        run_simulation(build_server_app(config, results), client_app or default_client_app, config.clients,
                       backend_config=backend)
    if not results:
        raise FedError("the Flower simulation ended without a result: the ServerApp failed (see the log above)")
    return results[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_app(directory: Path, config: FedConfig) -> Path:
    """A Flower App project whose components are lorakit's apps and whose run config is ``config``."""
    import tomli_w
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": APP_NAME, "version": "1.0.0", "description": "lorakit federated fine-tuning",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "lorakit",
                                  "components": {"serverapp": "lorakit.fed.server:app",
                                                 "clientapp": "lorakit.fed.client:app"},
                                  "config": config.to_record()}}},
    }
    write_text(directory / "pyproject.toml", tomli_w.dumps(project))
    return directory


def _executable(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        raise FedError(f"{name} was not found; install Flower with: pip install 'lorakit[fed]'")
    return found


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, with everything it spawned (its process group)."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _connect_host(host: str) -> str:
    """Where local processes reach a SuperLink bound to ``host`` (a wildcard address is reached on loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


@contextlib.contextmanager
def federation(config: FedConfig, workdir: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A SuperLink on ``config.host`` (a free port) and ``config.clients`` SuperNodes (partition-id 0..n-1).

    With ``config.use_tls`` the SuperLink serves TLS with a certificate from a fresh private CA
    (`security.tls_certificates`) that the SuperNodes and ``flwr`` trust; with ``config.use_supernode_auth``
    it admits only SuperNodes whose public keys were registered (``flwr supernode register``) before they
    started.  Both are forced on when ``host`` is not loopback; on loopback without them it runs
    ``--insecure``, reachable by every local user for the duration of the run (`security` says what each
    measure protects).  Yields the SuperLink connection name and the environment (``FLWR_HOME``) ``flwr run``
    needs; every process is stopped (its process group killed) on exit, whatever happened.
    """
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"{_connect_host(config.host)}:{port}"
    link = [_executable("flower-superlink"), "--host", config.host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    connection = f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{address}"\n'
    node_tls = ["--insecure"]
    if config.use_tls:
        ca, cert, key = security.tls_certificates(workdir / "certificates", [_connect_host(config.host)])
        link += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        connection += f'root-certificates = "{ca}"\n'
        node_tls = ["--root-certificates", str(ca)]
    else:
        link.append("--insecure")
        connection += "insecure = true\n"
    if config.use_supernode_auth:
        link.append("--enable-supernode-auth")
    write_text(home / "config.toml", connection)
    env = {**os.environ, "FLWR_HOME": str(home)}
    processes: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        with open(workdir / log, "wb") as sink:
            processes.append(subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
    try:
        start(link, "superlink.log")
        _wait_for_port(_connect_host(config.host), port, processes[0], workdir / "superlink.log")
        for i in range(config.clients):
            auth = []
            if config.use_supernode_auth:
                private, public = security.supernode_keys(workdir / "keys", f"supernode-{i}")
                _register(public, env)
                auth = ["--auth-supernode-private-key", str(private)]
            start([_executable("flower-supernode"), *node_tls, *auth, "--superlink", address,
                   "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions={config.clients}"],
                  f"supernode-{i}.log")
        yield "local", env
    finally:
        for process in reversed(processes):
            _stop(process)


def _register(public_key: Path, env: dict[str, str]) -> None:
    """Register a SuperNode's public key with the SuperLink (needed before it connects with auth on)."""
    done = subprocess.run([_executable("flwr"), "supernode", "register", str(public_key), "local"], env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise FedError(f"registering the SuperNode key {public_key} failed (flwr supernode register exit code "
                       f"{done.returncode}): {(done.stdout + done.stderr)[-1000:]}")


def _wait_for_port(host: str, port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedError(f"flower-superlink exited with code {process.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.2)
    raise FedError(f"flower-superlink did not open port {port} within {timeout:.0f} s; see {log}")


def deploy(config: FedConfig, workdir: str | os.PathLike | None = None, timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``config`` as real processes on loopback: SuperLink, ``config.clients`` SuperNodes, ``flwr run``."""
    config = config.replace(output_dir=str(Path(config.output_dir).resolve()))
    if config.data_dir is not None:
        config = config.replace(data_dir=str(Path(config.data_dir).resolve()))
    with contextlib.ExitStack() as stack:
        stack.enter_context(output_lock(config))
        work = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        app_dir = write_app(work / "app", config)
        result_file = Path(config.output_dir) / RESULT_FILE
        result_file.unlink(missing_ok=True)
        connection, env = stack.enter_context(federation(config, work))
        try:
            done = subprocess.run([_executable("flwr"), "run", str(app_dir), connection, "--stream"], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            output = "".join(o.decode(errors="replace") if isinstance(o, bytes) else o
                             for o in (err.stdout, err.stderr) if o)
            logs = f"the processes' logs are in {work}; " if workdir is not None else ""
            raise FedError(f"the deployed run did not finish within its time limit ({timeout:.0f} s; each round "
                           f"starts a process per client, so raise it on a slow machine); {logs}`flwr run` output "
                           f"ends:\n{output[-2000:]}") from err
        if done.returncode != 0 or not result_file.is_file():
            raise FedError(f"the deployed run failed (flwr run exit code {done.returncode}); its output ends:\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
        return json.loads(result_file.read_text())


def run(config: FedConfig) -> dict[str, Any]:
    """``config.mode``: ``simulation`` or ``deployment`` (loopback processes)."""
    return simulate(config) if config.mode == "simulation" else deploy(config)
