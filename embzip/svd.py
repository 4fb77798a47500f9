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


def check_inputs(embedding, rank, weights=None, metric=None, device: str = "cpu") -> str:
    """Refuse what a (weighted, metric-aware) SVD cannot take, naming it: `embedding` a float V x d tensor, `rank`
    1..min(V, d), `weights` V finite numbers >= 0, `metric` a finite d x d matrix. Returns the device to use."""
    from numbers import Integral

    from .errors import OptionError, RankError
    from .models import resolve_device

    if not isinstance(embedding, torch.Tensor) or embedding.ndim != 2 or not embedding.is_floating_point():
        what = (f"a {embedding.ndim}-D {embedding.dtype} tensor" if isinstance(embedding, torch.Tensor)
                else type(embedding).__name__)
        raise TypeError(f"embedding must be a V x d float torch.Tensor, got {what}")
    vocab, hidden = embedding.shape
    if isinstance(rank, bool) or not isinstance(rank, Integral) or not 1 <= rank <= min(vocab, hidden):
        raise RankError(f"rank must be an integer from 1 to {min(vocab, hidden)} (a {vocab} x {hidden} matrix has "
                        f"no more directions), got {rank!r}")
    for name, value, shape in (("weights", weights, (vocab,)), ("metric", metric, (hidden, hidden))):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise OptionError(f"{name} must be a tensor of shape {shape} for a {vocab} x {hidden} embedding, got {got}")
        if not torch.isfinite(value).all() or (name == "weights" and (value < 0).any()):
            raise OptionError(f"{name} must be finite" + (" and >= 0" if name == "weights" else ""))
    return resolve_device(device)


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
    g = gram(embedding, weights, device)
    if not torch.isfinite(g).all():
        from .errors import FactorsError

        raise FactorsError("the embedding has NaN or Inf values (its Gram matrix is not finite); nothing to factor")
    evals, evecs = torch.linalg.eigh(g)
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
                device: str = "cpu", measure: bool = True) -> Factors:
    """Rank-`rank` factors of `embedding` by (weighted) truncated SVD; no bias. Made in float32; `meta` records the
    embedding's bits (source_bits), so a file saved from them states its compression ratio against it, and with
    `measure` how well they rebuild it (metrics: one more pass over the matrix), so splice.check_source can tell
    its model from another of the same shape."""
    device = check_inputs(embedding, rank, weights, device=device)
    factors = factor_rows(embedding, rank, weights=weights, device=device,
                          meta={"source_bits": torch.finfo(embedding.dtype).bits})
    return record_fit(factors, embedding) if measure else factors


def record_fit(factors: Factors, embedding: torch.Tensor) -> Factors:
    """`factors` with meta["metrics"]: their reconstruction metrics against `embedding`."""
    from .compressed import reconstruction_metrics

    factors.meta["metrics"] = reconstruction_metrics(embedding, factors)
    return factors


def factor_rows(rows, rank: int, *, weights: torch.Tensor | None = None, device: str = "cpu",
                meta: dict | None = None) -> Factors:
    """svd_factors without the checks, of anything sliced by rows (aware.py's transformed rows)."""
    directions, _ = top_directions(rows, rank, weights, device)
    return Factors(project(rows, directions, device), directions.T.contiguous().cpu(), meta=meta)
