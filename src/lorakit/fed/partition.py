"""Splitting a task's training examples across clients: IID, or non-IID by label with Dirichlet(α).

Dirichlet partitioning (Hsu, Qi & Brown 2019, arXiv 1909.06335): for each class, draw the clients'
shares from Dir(α·1) and deal that class's (shuffled) examples out in those proportions; small α gives
clients few classes, large α approaches IID.  Both are deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..train.data import Example
from .errors import FedConfigError


def iid(n_examples: int, n_clients: int, seed: int) -> list[list[int]]:
    """A seeded shuffle cut into ``n_clients`` shards whose sizes differ by at most one."""
    _check(n_examples, n_clients)
    order = np.random.default_rng(seed).permutation(n_examples)
    return [sorted(int(i) for i in shard) for shard in np.array_split(order, n_clients)]


def dirichlet(labels: Sequence[int], n_clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 100) -> list[list[int]]:
    """Label-skewed shards: per class, client shares ~ Dir(α); redrawn until every client has ``min_size``."""
    _check(len(labels), n_clients)
    if alpha <= 0:
        raise FedConfigError(f"alpha must be positive, got {alpha}")
    if n_clients * min_size > len(labels):
        raise FedConfigError(f"{len(labels)} examples cannot give {n_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for cls in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                shards[client].extend(int(i) for i in part)
        if min(len(s) for s in shards) >= min_size:
            return [sorted(s) for s in shards]
    raise FedConfigError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {n_clients} "
                         f"clients {min_size} example(s); raise alpha or lower the number of clients")


def partition(examples: Sequence[Example], n_clients: int, scheme: str, alpha: float, seed: int,
              min_size: int = 1) -> list[list[int]]:
    """Index shards of ``examples`` for ``n_clients`` clients (``scheme``: iid or dirichlet)."""
    if scheme == "iid":
        return iid(len(examples), n_clients, seed)
    if scheme == "dirichlet":
        labels = [e.label for e in examples]
        if any(label is None for label in labels):
            raise FedConfigError("Dirichlet partitioning is by label: this task's examples have no labels; "
                                 "use --partition iid")
        return dirichlet(labels, n_clients, alpha, seed, min_size)  # type: ignore[arg-type]
    raise FedConfigError(f"partition must be 'iid' or 'dirichlet', got {scheme!r}")


def label_counts(examples: Sequence[Example], shards: Sequence[Sequence[int]], num_labels: int) -> list[list[int]]:
    """Per client, how many examples of each label it holds."""
    return [[sum(1 for i in shard if examples[i].label == c) for c in range(num_labels)] for shard in shards]


def _check(n_examples: int, n_clients: int) -> None:
    if n_clients < 1:
        raise FedConfigError(f"the number of clients must be positive, got {n_clients}")
    if n_examples < n_clients:
        raise FedConfigError(f"{n_examples} examples cannot be split across {n_clients} clients")
