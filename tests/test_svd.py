import pytest
import torch

from embzip.factors import reconstruction_metrics
from embzip.aware import aware_factors
from embzip.errors import FactorsError, OptionError, RankError
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


@pytest.mark.parametrize("call, error, fragment", [
    (lambda e: svd_factors(e, 500), RankError, r"rank must be an integer from 1 to 32 \(a 100 x 32 matrix"),
    (lambda e: svd_factors(e, 4.0), RankError, "rank must be an integer"),
    (lambda e: svd_factors(e.numpy(), 4), TypeError, "must be a V x d float torch.Tensor, got ndarray"),
    (lambda e: svd_factors(e[0], 4), TypeError, "got a 1-D torch.float32 tensor"),
    (lambda e: svd_factors(e.long(), 4), TypeError, "got a 2-D torch.int64 tensor"),
    (lambda e: svd_factors(e * float("nan"), 4), FactorsError, "NaN or Inf"),
    (lambda e: svd_factors(e, 4, weights=torch.ones(99)), OptionError, r"weights must be a tensor of shape \(100,\)"),
    (lambda e: aware_factors(e, 4, weights=-torch.ones(100)), OptionError, "weights must be finite and >= 0"),
    (lambda e: aware_factors(e, 4, metric=torch.eye(5)), OptionError, r"metric must be a tensor of shape \(32, 32\)"),
    (lambda e: svd_factors(e, 4, device="nosuchdevice"), OptionError, "nosuchdevice"),
])
def test_bad_inputs_of_the_direct_functions_are_refused_by_name(call, error, fragment):
    with pytest.raises(error, match=fragment):
        call(torch.randn(100, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_factors_state_their_ratio_against_the_embeddings_own_bits(dtype, tmp_path):
    """svd_factors / aware_factors make float32 factors and record the embedding's bits, so a file saved from them
    says how much smaller it is than the matrix it came from (a bfloat16 one: half what float32 would claim)."""
    from embzip.factors import load_factors, save_factors

    e = torch.randn(100, 32).to(dtype)
    for factors in (svd_factors(e, 8), aware_factors(e, 8, keep_norms=True)):
        expected = 100 * 32 * torch.finfo(dtype).bits / (8 * factors.stored_bytes())
        assert factors.meta["source_bits"] == torch.finfo(dtype).bits
        assert factors.compression_ratio() == pytest.approx(expected)
        save_factors(factors, tmp_path / "f.safetensors", force=True)
        assert load_factors(tmp_path / "f.safetensors").compression_ratio() == pytest.approx(expected)
