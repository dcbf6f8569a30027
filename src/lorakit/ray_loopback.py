"""An embedded Ray that listens on loopback only, shared by `lorakit fed` (Flower's simulation engine) and
`lorakit sweep` (Ray Tune)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# Ray binds its GCS, raylet, object manager and worker ports to the node's IP address, and its servers to all
# interfaces, without authentication; its single-machine mode (meant for macOS and Windows, where Ray makes the
# loopback address the node's and every server listens on it only) is switched on by this variable.
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_on_loopback() -> Iterator[None]:
    """Make the Ray instance started inside the block listen on 127.0.0.1 only.

    Ray reads the variable when it is imported (and the processes it starts read it again), so the flag it
    set from it is updated too, in case Ray was imported earlier in this process.
    """
    from ray._private import ray_constants
    saved_env, saved_flag = os.environ.get(RAY_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(RAY_LOOPBACK_ENV, None)
        else:
            os.environ[RAY_LOOPBACK_ENV] = saved_env
