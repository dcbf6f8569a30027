"""Truncated and randomized SVD, seeded generators, and subspace comparison, all in float32 or wider."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor


def seeded_generator(seed: int, name: str = "") -> torch.Generator:
    """A CPU generator whose stream depends only on ``seed`` and a layer name (stable across runs)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def truncated_svd(m: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact top-r SVD ``m ≈ U diag(S) Vh`` via the full thin SVD (float32)."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


def orthonormalize(y: Tensor) -> Tensor:
    return torch.linalg.qr(y).Q


def randomized_svd(m: Tensor, r: int, niter: int = 4, oversample: int | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD by subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4), seeded.

    ``oversample`` extra columns (default ``r``, capped by the matrix size) and ``niter`` power
    iterations with re-orthonormalisation; returns ``U (m×r), S (r), Vh (r×n)``.
    """
    m = m.float()
    rows, cols = m.shape
    k = min(r + (r if oversample is None else oversample), rows, cols)
    omega = torch.randn(cols, k, generator=generator).to(m.device)
    q = orthonormalize(m @ omega)
    for _ in range(niter):
        q = orthonormalize(m.T @ q)
        q = orthonormalize(m @ q)
    u_small, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u_small)[:, :r], s[:r], vh[:r]


def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spaces of ``a`` and ``b`` (descending)."""
    qa, qb = orthonormalize(a.double()), orthonormalize(b.double())
    return torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
