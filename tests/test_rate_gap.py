"""scripts/rate_gap.py: the Gaussian rate-distortion bound and the equivalent rate it reports."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from rate_gap import bound, coordinates, equivalent_rate  # noqa: E402

from embzip import codebook as cb  # noqa: E402


def test_equal_variances_lose_a_quarter_per_bit():
    evals = torch.ones(8, dtype=torch.float64)
    for rate in (0.5, 1.0, 2.0, 4.0):
        assert bound(evals, rate) == pytest.approx(8 * 2 ** (-2 * rate), rel=1e-6)


def test_water_filling_leaves_small_variances_uncoded():
    # variances 4 and 1/16 at 1 bit per coordinate (2 bits in all): both bits go to the first coordinate
    # (4 * 2^-4 = 1/4 > 1/16), which keeps 1/4, and the second keeps all of its 1/16.
    evals = torch.tensor([4.0, 1 / 16], dtype=torch.float64)
    assert bound(evals, 1.0) == pytest.approx(4 / 16 + 1 / 16, rel=1e-6)
    assert bound(evals, 0.0) == pytest.approx(4 + 1 / 16, rel=1e-6)


def test_equivalent_rate_inverts_the_bound():
    evals = torch.logspace(0, -3, 32, dtype=torch.float64)
    for rate in (0.3, 1.0, 2.5):
        assert equivalent_rate(evals, bound(evals, rate)) == pytest.approx(rate, abs=1e-6)


def test_a_codebook_on_gaussian_rows_stays_above_the_bound():
    """A Gaussian source's bound is a true limit: a fitted codebook's equivalent rate is below the bits it
    stores (with rows enough that the codebooks cannot memorise them)."""
    gen = torch.Generator().manual_seed(0)
    V, d = 8192, 16
    evals = torch.logspace(0, -2, d, dtype=torch.float64)
    rows = torch.randn(V, d, generator=gen, dtype=torch.float64) * evals.sqrt()
    tensors = cb.fit_codebook(rows.float(), config=replace(cb.CodebookConfig(), bits=2.0, focus=0.0))
    bits = cb.stored_bits(tensors) / (V * d)
    y = coordinates(tensors, rows)
    err = float((y - cb.decode_transformed(tensors).double()).pow(2).sum(1).mean())
    rate = equivalent_rate(evals, err)
    assert 0 < rate < bits
