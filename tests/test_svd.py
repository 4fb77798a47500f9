import torch

from embzip.factors import reconstruction_metrics
from embzip.svd import svd_factors


def _matrix(v=200, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, d, generator=g) @ torch.diag(torch.linspace(3, 0.1, d)) + 0.1


def test_full_rank_svd_reconstructs_the_matrix():
    e = _matrix()
    f = svd_factors(e, e.shape[1])
    assert torch.allclose(f.reconstruct(), e, atol=1e-4)


def test_truncated_svd_has_the_optimal_frobenius_error():
    e = _matrix()
    k = 7
    f = svd_factors(e, k)
    s = torch.linalg.svdvals(e.double())
    optimal = s[k:].pow(2).sum().sqrt().item()
    got = (f.reconstruct().double() - e.double()).norm().item()
    assert abs(got - optimal) / optimal < 1e-5
    assert f.bias is None and f.codes.shape == (200, k) and f.decoder.shape == (k, 24)


def test_svd_codes_equal_u_times_s():
    e = _matrix()
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    f = svd_factors(e, 5)
    # Singular vectors are unique up to sign: compare |codes| with |U_k S_k|.
    assert torch.allclose(f.codes.abs().double(), (u[:, :5] * s[:5]).abs(), atol=1e-4)


def test_lower_rank_reconstructs_worse():
    e = _matrix()
    errs = [reconstruction_metrics(e, svd_factors(e, k))["rmse"] for k in (2, 6, 12, 20)]
    assert errs == sorted(errs, reverse=True)
