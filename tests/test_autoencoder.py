import pytest
import torch

from embzip.autoencoder import FitConfig, fit_autoencoder, paper_loss


def _matrix():
    g = torch.Generator().manual_seed(1)
    return torch.randn(300, 6, generator=g) @ torch.randn(6, 16, generator=g) + 0.05 * torch.randn(300, 16, generator=g)


SHORT = dict(epochs=6, anneal_epochs=4, batch_size=32)


def test_alpha_anneals_linearly_then_holds():
    c = FitConfig()
    assert c.alpha(0) == 1.0 and abs(c.alpha(19) - 0.1) < 1e-12 and c.alpha(29) == pytest.approx(0.1)
    assert c.alpha(5) > c.alpha(6) > c.alpha(7)


def test_default_recipe_is_the_papers():
    c = FitConfig()
    assert (c.epochs, c.anneal_epochs, c.batch_size, c.lr, c.lr_step, c.lr_gamma, c.seed) == (30, 20, 32, 1e-3, 4, 0.5, 1)
    assert (c.cos_weight, c.l1_weight, c.alpha_start, c.alpha_end, c.eps) == (0.1995, 0.0025, 1.0, 0.1, 1e-10)


def test_fit_lowers_its_loss():
    factors, history = fit_autoencoder(_matrix(), 4, FitConfig(**SHORT))
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["cosine_distance"] < history[0]["cosine_distance"]
    assert factors.codes.shape == (300, 4) and factors.decoder.shape == (4, 16) and factors.bias.shape == (16,)


def test_seeded_fit_repeats_exactly_and_seed_matters():
    a, _ = fit_autoencoder(_matrix(), 4, FitConfig(seed=3, **SHORT))
    b, _ = fit_autoencoder(_matrix(), 4, FitConfig(seed=3, **SHORT))
    c, _ = fit_autoencoder(_matrix(), 4, FitConfig(seed=4, **SHORT))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.decoder, b.decoder) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.codes, c.codes)


def test_fit_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_autoencoder(_matrix(), 4, FitConfig(epochs=1, anneal_epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_svd_init_starts_at_the_svd_solution():
    from embzip.svd import svd_factors

    e = _matrix()
    f, history = fit_autoencoder(e, 4, FitConfig(init="svd", epochs=1, anneal_epochs=1, lr=1e-12))
    assert torch.allclose(f.reconstruct(), svd_factors(e, 4).reconstruct(), atol=1e-4)


def test_loss_is_weighted_cosine_plus_annealed_l1():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    loss, cos = paper_loss(x_hat, x, 1.0, FitConfig())
    # cosine distances 1 and 0 -> mean 0.5; |diff| = [1,1,0,0] + eps -> mean 0.5
    assert cos.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.1995 * 0.5 + 0.0025 * 0.5, rel=1e-6)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(epochs=0), r"epochs \(--epochs\) must be positive"), (dict(anneal_epochs=40), "cannot exceed"),
    (dict(lr=0), r"lr \(--lr\) must be positive"), (dict(lr_gamma=1.5), "lr_gamma"), (dict(init="pca"), "init must be"),
    (dict(cos_weight=0, l1_weight=0), "loss weights"),
])
def test_bad_recipe_is_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        FitConfig(**kwargs)
