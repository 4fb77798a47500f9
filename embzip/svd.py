"""Truncated (optionally row-weighted) SVD of an embedding matrix.

Plain SVD: codes = U_k S_k, decoder = Vh_k. It is computed through the d x d Gram matrix
E^T E (each row chunk's product in float32, summed in float64), so memory stays O(V*k + d^2) and no V x V or
V x d copy of U is ever formed: the top right singular vectors V_k are the top eigenvectors of
E^T E, and U_k S_k = E V_k.

Weighted SVD minimises sum_i w_i ||E_i - C_i D||^2. The optimal D is the top eigenvectors of
E^T diag(w) E, and with orthonormal D each row's best code is still E_i D^T, whatever w_i.
"""

from __future__ import annotations

import torch

from .factors import Factors

_CHUNK_ROWS = 32768
_GRAM_CHUNK_BYTES = 32 << 20


def gram(embedding: torch.Tensor, weights: torch.Tensor | None = None, device: str = "cpu") -> torch.Tensor:
    """E^T diag(w) E in float64, accumulated over row chunks.

    Each chunk's product is a float32 matmul (twice the speed of float64 on a CPU; a chunk sums at
    most a few thousand rows, so its rounding stays near 1e-6 relative) added to a float64 total.
    """
    d = embedding.shape[1]
    g = torch.zeros(d, d, dtype=torch.float64, device=device)
    step = max(1, min(4096, _GRAM_CHUNK_BYTES // (4 * d)))  # float32 rows: a few tens of MB whatever d is
    for i in range(0, embedding.shape[0], step):
        x = embedding[i:i + step].to(device=device, dtype=torch.float32)
        if weights is not None:
            g += ((x * weights[i:i + step].to(device=device, dtype=torch.float32).unsqueeze(1)).T @ x).double()
        else:
            g += (x.T @ x).double()
    return g


def top_directions(embedding: torch.Tensor, rank: int, weights: torch.Tensor | None = None,
                   device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` right singular vectors (d x rank, float32) and singular values (rank)."""
    evals, evecs = torch.linalg.eigh(gram(embedding, weights, device))
    order = torch.argsort(evals, descending=True)[:rank]
    vecs = evecs[:, order]
    # Fix each vector's sign (largest entry positive) so results do not depend on the LAPACK build.
    signs = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
    return (vecs * signs).float(), evals[order].clamp_min(0).sqrt().float()


def project(embedding: torch.Tensor, directions: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Codes E @ directions, row chunk by row chunk, in float32 on the CPU."""
    directions = directions.to(device)
    codes = torch.empty(embedding.shape[0], directions.shape[1])  # filled in place: no second copy
    for i in range(0, embedding.shape[0], _CHUNK_ROWS):
        codes[i:i + _CHUNK_ROWS] = (embedding[i:i + _CHUNK_ROWS].to(device=device, dtype=torch.float32)
                                    @ directions).cpu()
    return codes


def svd_factors(embedding: torch.Tensor, rank: int, *, weights: torch.Tensor | None = None,
                device: str = "cpu") -> Factors:
    """Rank-`rank` factors of `embedding` by (weighted) truncated SVD; no bias."""
    directions, _ = top_directions(embedding, rank, weights, device)
    return Factors(project(embedding, directions, device), directions.T.contiguous().cpu())
