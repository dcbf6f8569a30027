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


def gram_svd(m: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD from the eigendecomposition of the smaller Gram matrix (``m mᵀ`` or ``mᵀ m``), float32.

    Squaring the matrix squares its condition number, so only the leading singular triplets are
    accurate, and those are what a top-r init uses; on CPU it is 2-5x faster than a full SVD and, unlike
    a few power iterations, exact for the flat spectra of pretrained weights.
    """
    m = m.float()
    wide = m.shape[0] <= m.shape[1]
    evals, evecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
    top = evecs[:, -r:].flip(1)
    s = evals[-r:].flip(0).clamp_min(0).sqrt()
    safe = s.clamp_min(torch.finfo(s.dtype).tiny ** 0.5)
    if wide:
        return top, s, (top.T @ m) / safe[:, None]
    return (m @ top) / safe, s, top.T


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
