"""How far a codebook factors file is from the best any quantizer could do at its size, if the rows were Gaussian.

    python scripts/rate_gap.py MODEL FACTORS [FACTORS ...] [--synthetic]

For each codebook file (fitted on MODEL with the default recipe) it prints:
- bpw: bits per weight stored, everything counted;
- err: the fit's objective as a share of the rows' weighted variance, sum_i w_i ||y_i - y_hat_i||^2 / sum_i w_i
  ||y_i - mean||^2, in the coordinates y where the codebook measures error (the file's stored transform, so the
  metric is the one the fit used) with the token weights the default recipe gives at that size;
- bound: the Gaussian rate-distortion function of rows with the same weighted covariance at `bpw` bits per
  coordinate (reverse water-filling over its eigenvalues): what an ideal quantizer reaches on Gaussian rows;
- rate: the bits per coordinate at which that bound equals err. bpw - rate is what the quantizer loses.

With --synthetic it also fits a codebook (no focus stage, uniform weights) to Gaussian rows with the same
spectrum and the same budget, to separate the quantizer's own loss from what the real rows add.

The weights come from the model's samples like a fit's (cached in $EMBZIP_CACHE, by default ~/.cache/embzip, after the first run). A
Gaussian source is the hardest one for a given covariance, so the bound is what an ideal quantizer reaches on
Gaussian rows, not a limit for every distribution: docs/method.md says why these rows behave like Gaussian ones.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

import embzip
from embzip import codebook as cb
from embzip.factors import load_factors
from embzip.methods import recipe
from embzip.methods.base import Inputs


def _theta(evals: torch.Tensor, inside) -> float:
    """The water level theta in (0, max eig] at which `inside(theta)` turns false (a bisection; both uses are
    monotone in theta)."""
    lo, hi = float(evals.min()) * 1e-12, float(evals.max())  # rates up to about 20 bits per coordinate
    for _ in range(100):
        theta = math.sqrt(lo * hi)
        lo, hi = (theta, hi) if inside(theta) else (lo, theta)
    return math.sqrt(lo * hi)


def bound(evals: torch.Tensor, rate: float) -> float:
    """Gaussian D(R) (summed over coordinates) at `rate` bits per coordinate, by reverse water-filling: the
    level theta spends sum_j max(0, log2(eig_j / theta) / 2) = rate x coordinates, and D = sum_j min(eig_j, theta)."""
    theta = _theta(evals, lambda t: float((0.5 * torch.log2(evals / t)).clamp_min(0).sum()) > rate * len(evals))
    return float(evals.clamp_max(theta).sum())


def equivalent_rate(evals: torch.Tensor, err: float) -> float:
    """The rate at which the Gaussian bound equals `err` (summed over coordinates): the level whose
    distortion is err, then the bits it spends."""
    theta = _theta(evals, lambda t: float(evals.clamp_max(t).sum()) < err)
    return float((0.5 * torch.log2(evals / theta)).clamp_min(0).sum()) / len(evals)


def coordinates(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """`rows` (float64) in the coordinates a codebook file codes them in: times the inverse of its stored
    transform, as the fit computes them."""
    return rows.double() @ torch.linalg.inv(cb.dequantized(tensors, "transform").double())


def report(name: str, y: torch.Tensor, w: torch.Tensor, recon: torch.Tensor, bits: float) -> torch.Tensor:
    V = len(w)
    mean = (w @ y) / V
    z = (y - mean) * w.sqrt().unsqueeze(1)
    evals = torch.linalg.eigvalsh(z.T @ z / V).clamp_min(1e-30)
    err = float(w @ (y - recon).pow(2).sum(1)) / V
    total = float(evals.sum())
    print(f"{name}: bpw {bits:.3f}  err {err / total:.4g}  bound {bound(evals, bits) / total:.4g}  "
          f"rate {equivalent_rate(evals, err):.3f}", flush=True)
    return evals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("factors", nargs="+")
    parser.add_argument("--synthetic", action="store_true", help="also fit Gaussian rows with the same spectrum")
    args = parser.parse_args()
    opened = embzip.open_model(args.model)
    embedding = opened.model.get_input_embeddings().weight.detach().double()
    V, d = embedding.shape
    r = recipe("codebook")
    inputs = Inputs(opened, r)
    for path in args.factors:
        tensors = load_factors(path).tensors()
        if "transform" not in tensors:
            raise SystemExit(f"{path}: not a codebook factors file")
        bits = cb.stored_bits(tensors) / (V * d)
        coded = torch.ones(V, dtype=torch.bool)
        if "absent" in tensors:  # rows the file leaves out (never read) are not measured
            coded[tensors["absent"].long()] = False
        w = inputs.weights(replace(r.codebook, bits=bits).weight_power(opened.tied)).double()[coded]
        w = w / w.mean()
        y = coordinates(tensors, embedding[coded])
        evals = report(path, y, w, cb.decode_transformed(tensors).double(), bits)
        if args.synthetic:
            n = len(y)
            gen = torch.Generator().manual_seed(0)
            g = torch.randn(n, d, generator=gen, dtype=torch.float64) * evals.flip(0).sqrt()
            fitted = cb.fit_codebook(g.float(), config=replace(r.codebook, bits=bits, focus=0.0))
            report("  Gaussian rows, same spectrum", coordinates(fitted, g), torch.ones(n, dtype=torch.float64),
                   cb.decode_transformed(fitted).double(), cb.stored_bits(fitted) / (n * d))


if __name__ == "__main__":
    main()
