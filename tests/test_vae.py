"""The VAE: checked against PPCA's closed forms, the analytic KL, a second estimator of the same
ELBO, a closed-form baseline on the digits, and itself (early stopping, saving and loading)."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from sklearn import datasets

import freqvi
from freqvi import plots
from freqvi.datasets import load_digits
from freqvi.errors import FreqviInputError, ImportanceSamplingWarning
from freqvi.estimators import IWAE_ELBO
from freqvi.infer.evaluation import amortization_gap, elbo_terms
from freqvi.models import VAE, FactorAnalysis, mlp

D, Q, N = 5, 2, 40


def elbo_mean(estimator, model, data, batches=8):
    """The mean of ``batches`` independent ELBO estimates and its standard error."""
    values = torch.tensor([-estimator.loss(model.model, model.guide, data) for _ in range(batches)],
                          dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(batches))


@pytest.fixture
def ppca():
    r"""A linear-Gaussian VAE (``hidden=()``, isotropic noise): PPCA, with data drawn from it.

    Decoder ``x = b + W z + sigma eps``; the encoder is set to the exact posterior mean
    ``M^{-1} W^T (x - b) / sigma^2`` with scales 1.2 times the posterior's marginal standard
    deviations, ``M = I + W^T W / sigma^2``: a good but not exact (diagonal) proposal.
    Returns the VAE (float64), the data and FactorAnalysis at the same parameters.
    """
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(D, Q, generator=gen, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    sigma = 0.7
    x = b + torch.randn(N, Q, generator=gen, dtype=torch.float64) @ w.T \
        + sigma * torch.randn(N, D, generator=gen, dtype=torch.float64)
    vae = VAE(D, Q, hidden=(), likelihood="gaussian", noise="isotropic", init_noise_scale=sigma).double()
    m_inv = torch.linalg.inv(torch.eye(Q, dtype=torch.float64) + w.T @ w / sigma**2)
    gain = m_inv @ w.T / sigma**2  # (Q, D)
    raw_scale = torch.log(torch.expm1(1.2 * m_inv.diagonal().sqrt() - 1e-5))  # inverse softplus
    with torch.no_grad():
        vae.decoder[0].weight.copy_(w)
        vae.decoder[0].bias.copy_(b)
        head = vae.guide.encoder.net[0]
        head.weight.copy_(torch.cat([gain, torch.zeros(Q, D, dtype=torch.float64)]))
        head.bias.copy_(torch.cat([-gain @ b, raw_scale]))
    fa = FactorAnalysis(D, Q, "isotropic", init={"mean": b, "loading": w, "noise_variance": sigma**2})
    fa.log_marginal(x)  # creates its parameters
    return vae, x, fa


def test_mlp_widths_and_the_vae_architecture():
    net = mlp((3, 7, 5))
    assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear"]
    assert net(torch.zeros(4, 3)).shape == (4, 5)
    vae = VAE(64, 8, hidden=(32, 16))
    widths = [m.out_features for m in vae.decoder if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 32, 64]
    loc, scale = vae.encode(torch.rand(6, 64))
    assert loc.shape == scale.shape == (6, 8) and (scale > 0).all()
    assert vae.sample(3).shape == (3, 64) and vae.reconstruct(torch.rand(2, 64)).shape == (2, 64)


def test_linear_gaussian_vae_has_the_ppca_log_likelihood(ppca):
    vae, x, fa = ppca
    ll = freqvi.log_likelihood(vae, x, num_samples=2000, seed=0)
    exact = float(fa.log_marginal(x).detach().sum())
    assert ll.method == "importance" and ll.pareto_k.max() < 0.7
    assert abs(ll.total - exact) < 4 * ll.standard_error + 1e-6
    terms = elbo_terms(vae, x, num_samples=2000, seed=0)
    assert terms.elbo < exact - 4 * terms.standard_error  # the proposal is not the posterior


def test_local_optimum_reaches_the_best_diagonal_gaussian_elbo(ppca):
    """For PPCA the best diagonal q_i is N(m_i, diag(1 / Lambda_jj)), Lambda = I + W^T W / sigma^2,
    at KL = (sum_j log Lambda_jj - log det Lambda) / 2 from the posterior."""
    vae, x, fa = ppca
    x = x[:5]
    est = fa.estimates()
    precision = torch.eye(Q, dtype=torch.float64) + est["loading"].T @ est["loading"] / est["noise_variance"]
    kl = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    best = float(fa.log_marginal(x).detach().sum() - len(x) * kl)
    gap = amortization_gap(vae, x, vae.guide, num_steps=400, lr=0.05, num_samples=4000, seed=0)
    optimized = float(gap.optimized_elbo.sum())
    assert optimized == pytest.approx(best, abs=4 * gap.standard_error + 0.01)
    assert gap.gap > 0  # the encoder's scales are 1.2 times too wide


def test_analytic_and_monte_carlo_kl_agree(ppca):
    vae, x, _ = ppca
    terms = elbo_terms(vae, x, num_samples=500, seed=0)
    loc, scale = vae.encode(x)
    kl = 0.5 * (loc.square() + scale.square() - 1).sum() - scale.log().sum()  # closed form, by hand
    assert terms.analytic_kl and terms.kl == pytest.approx(float(kl), rel=1e-10)
    assert terms.elbo == pytest.approx(terms.reconstruction - terms.kl, rel=1e-12)
    analytic, se_a = elbo_mean(TraceMeanField_ELBO(num_particles=500, vectorize_particles=True), vae, x)
    monte_carlo, se_m = elbo_mean(Trace_ELBO(num_particles=500, vectorize_particles=True), vae, x)
    assert abs(analytic - monte_carlo) < 4 * math.hypot(se_a, se_m)
    assert abs(terms.elbo - analytic) < 4 * math.hypot(terms.standard_error, se_a)


def test_iwae_with_one_particle_is_the_elbo(ppca):
    vae, x, _ = ppca
    iwae, se_i = elbo_mean(IWAE_ELBO(num_particles=1, max_plate_nesting=1), vae, x, batches=400)
    elbo, se_e = elbo_mean(Trace_ELBO(num_particles=400, vectorize_particles=True), vae, x)
    assert abs(iwae - elbo) < 4 * math.hypot(se_i, se_e)
    bound, se_b = elbo_mean(IWAE_ELBO(num_particles=50, max_plate_nesting=1), vae, x)
    assert bound > elbo + 4 * math.hypot(se_b, se_e)  # L_50 > L_1 = ELBO for this imperfect proposal


@pytest.fixture
def digits():
    x, x_test = load_digits("train"), load_digits("test")
    return x, x_test


def trained_vae(x, steps=300, **options):
    torch.manual_seed(0)
    vae = VAE(64, 8)
    freqvi.fit(vae, x, loss="mean_field", lr=2e-3, num_steps=steps, batch_size=128, progress=False,
               seed=0, **options)
    return vae


def independent_bernoulli(x, x_test):
    """Held-out log-likelihood per observation of independent pixels, p_j the training mean
    (clipped to [1e-3, 1 - 1e-3], as pixels blank in training would give -inf)."""
    p = x.double().mean(0).clamp(1e-3, 1 - 1e-3)
    t = x_test.double()
    return float((t * p.log() + (1 - t) * (1 - p).log()).sum(1).mean())


def test_training_beats_the_untrained_network_and_independent_pixels(digits):
    x, x_test = digits
    torch.manual_seed(0)
    before = elbo_terms(VAE(64, 8), x_test, num_samples=20, seed=0).elbo / len(x_test)
    vae = trained_vae(x)
    after = elbo_terms(vae, x_test, num_samples=20, seed=0)
    assert after.elbo / len(x_test) > before + 10  # stated margin: 10 nats per test image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # counted below
        ll = freqvi.log_likelihood(vae, x_test, num_samples=1000, seed=0)
    assert (ll.pareto_k > 0.7).mean() < 0.05
    assert ll.total > after.elbo  # log p(x) >= ELBO
    assert ll.total / len(x_test) > independent_bernoulli(x, x_test) + 1.0


@pytest.mark.slow
def test_importance_sampled_log_likelihood_is_stable_in_k(digits):
    x, x_test = digits
    vae = trained_vae(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportanceSamplingWarning)  # a few k-hat near 0.7 at K = 1000
        small = freqvi.log_likelihood(vae, x_test, num_samples=1000, seed=1)
        large = freqvi.log_likelihood(vae, x_test, num_samples=5000, seed=2)
    assert abs(small.total - large.total) < 2 * math.hypot(small.standard_error, large.standard_error)
    assert large.total > elbo_terms(vae, x_test, num_samples=100, seed=0).elbo


def test_early_stopping_keeps_the_parameters_of_the_best_held_out_step(digits):
    x, x_test = digits
    small = x[:60]  # a large step size on 60 images overfits within a few hundred steps
    options = {"lr": 0.02, "batch_size": 30, "seed": 0, "progress": False, "loss": "mean_field"}
    torch.manual_seed(0)
    vae = VAE(64, 8)
    result = freqvi.fit(vae, small, num_steps=2000, validation_data=x_test[:100], eval_every=25,
                        patience=3, **options)
    assert result.stopped_early and result.best_step < result.num_steps
    assert result.validation_steps[-1] == result.num_steps
    torch.manual_seed(0)
    rerun = VAE(64, 8)
    freqvi.fit(rerun, small, num_steps=result.best_step, **options)
    for (name, kept), (_, again) in zip(vae.state_dict().items(), rerun.state_dict().items(), strict=True):
        torch.testing.assert_close(kept, again, msg=name)


def test_saving_and_loading_gives_identical_outputs(tmp_path, digits):
    x, x_test = digits
    vae = trained_vae(x, steps=20)
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    loaded = VAE(64, 8)
    loaded.load_state_dict(torch.load(tmp_path / "vae.pt"))
    assert torch.equal(vae.reconstruct(x_test), loaded.reconstruct(x_test))
    assert torch.equal(vae.encode(x_test)[1], loaded.encode(x_test)[1])
    freqvi.log_likelihood(loaded, x_test[:1], num_samples=1)  # the guide's first call draws
    first = freqvi.log_likelihood(vae, x_test[:20], num_samples=50, proposal="guide", seed=0).total
    assert freqvi.log_likelihood(loaded, x_test[:20], num_samples=50, proposal="guide", seed=0).total == first


@pytest.mark.parametrize("loss, options", [("trace", {}), ("mean_field", {}), ("iwae", {"num_particles": 5}),
                                           ("dreg", {"num_particles": 5}), ("stl", {})])
def test_every_estimator_fits_every_likelihood(loss, options, digits):
    x = digits[0][:200]
    for likelihood in ("bernoulli", "continuous_bernoulli", "gaussian"):
        vae = VAE(64, 2, hidden=(16,), likelihood=likelihood)
        result = freqvi.fit(vae, x, loss=loss, lr=1e-2, num_steps=40, batch_size=50, progress=False,
                            seed=0, **options)
        assert np.mean(result.elbo[-10:]) > np.mean(result.elbo[:10])


@pytest.mark.parametrize("make_data, message", [
    (lambda: torch.rand(10, 63), "shape (n_observations, 64)"),
    (lambda: torch.rand(10, 64) * 2, "values in [0, 1]"),
    (lambda: torch.rand(10, 64) - 0.5, "values in [0, 1]"),
    (lambda: torch.full((10, 64), float("nan")), "non-finite"),
], ids=["wrong-dim", "above-1", "negative", "nan"])
def test_bad_data_is_refused_before_training(make_data, message):
    for likelihood in ("bernoulli", "continuous_bernoulli"):
        with pytest.raises(FreqviInputError, match=re.escape(message)):
            freqvi.fit(VAE(64, 2, likelihood=likelihood), make_data(), num_steps=1, progress=False)


def test_a_bad_row_beyond_the_first_minibatch_is_refused_before_training():
    """fit traces the pair on one minibatch; the VAE's check_data still reads every row."""
    x = torch.rand(40, 64)
    x[-1, 0] = 1.5
    with pytest.raises(FreqviInputError, match=re.escape("values in [0, 1]")):
        freqvi.fit(VAE(64, 2), x, batch_size=8, num_steps=1, progress=False)


def test_gaussian_likelihood_takes_any_real_values():
    x = torch.randn(20, 64) * 3
    result = freqvi.fit(VAE(64, 2, (8,), "gaussian"), x, num_steps=2, progress=False)
    assert all(math.isfinite(v) for v in result.elbo)


@pytest.mark.parametrize("arguments, message", [
    ({"latent_dim": 0}, "latent_dim must be an integer >= 1"),
    ({"data_dim": 64, "latent_dim": 2, "likelihood": "poisson"}, "likelihood must be one of"),
    ({"hidden": (16, 0)}, "hidden width must be an integer >= 1"),
])
def test_bad_settings_are_refused(arguments, message):
    arguments = {"data_dim": 64, "latent_dim": 2, **arguments}
    with pytest.raises(FreqviInputError, match=message):
        VAE(**arguments)


def test_digits_loader_and_its_fixed_split():
    train, train_labels = load_digits("train", return_labels=True)
    test = load_digits("test", dtype=torch.float64)
    everything = load_digits("all")
    reference = datasets.load_digits()
    assert train.shape == (1500, 64) and test.shape == (297, 64) and test.dtype == torch.float64
    np.testing.assert_allclose(everything.numpy(), reference.data / 16, rtol=1e-6)
    assert 0 <= float(everything.min()) and float(everything.max()) == 1
    rows = sorted(map(tuple, np.concatenate([train.numpy(), test.float().numpy()]).tolist()))
    assert rows == sorted(map(tuple, everything.numpy().tolist()))
    assert torch.equal(load_digits("train"), train) and set(train_labels.tolist()) == set(range(10))
    with pytest.raises(FreqviInputError, match="split must be one of"):
        load_digits("validation")


def test_binarised_digits_are_the_raw_pixels_above_8_of_16():
    everything, labels = load_digits("all", return_labels=True, binarize=True)
    np.testing.assert_array_equal(everything.numpy(), (datasets.load_digits().data > 8).astype(np.float32))
    test = load_digits("test", dtype=torch.float64, binarize=True)
    grey = load_digits("test", torch.float64)
    assert test.dtype == torch.float64 and torch.equal(test, (grey > 0.5).double())
    assert torch.equal(labels, load_digits("all", return_labels=True)[1])
    with pytest.raises(FreqviInputError, match=r"binarize must be True or False; got 0\.5"):
        load_digits(binarize=0.5)


def test_pictures_are_written(tmp_path, digits):
    x_test = digits[1]
    labels = load_digits("test", return_labels=True)[1]
    vae = VAE(64, 2, hidden=(16,))
    paths = [plots.reconstructions(vae, x_test, tmp_path / "rec.png"),
             plots.samples(vae, tmp_path / "samples.png"),
             plots.latent_scatter(vae, x_test, tmp_path / "latent.png", labels)]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FreqviInputError, match="latent_dim = 2"):
        plots.latent_scatter(VAE(64, 3), x_test, tmp_path / "no.png")
    figure = plots.samples(vae, num_images=20)  # no path: the figure, to show or restyle
    assert isinstance(figure, Figure) and sum(ax.has_data() for ax in figure.axes) == 20
