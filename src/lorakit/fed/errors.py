"""Errors of the federated package; each is a `LorakitError`, so the CLI reports it as bad input."""

from ..errors import ConfigError, LorakitError


class FedError(LorakitError):
    """A federated run cannot go on (no usable client update, a missing shared init, a failed deployment)."""


class FedConfigError(FedError, ConfigError):
    """A federated setting is out of range or inconsistent (strategy, partition, privacy budget, ...)."""


class CheckpointError(FedError):
    """A server checkpoint is missing, corrupt, or was written for another run."""
