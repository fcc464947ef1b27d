"""em stops when it should (issue 16): never descends, converges only at a stationary point,
and stops by itself on Monte-Carlo objectives. References are independent of em: the
Tipping-Bishop eigen-decomposition, closed forms, L-BFGS on an exact log-likelihood, quadrature."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from simulate import factor_data, mixture_data
from sklearn.datasets import load_iris

import freqvi
from freqvi.errors import ConvergenceWarning, FreqviInputError
from freqvi.models import FactorAnalysis, GaussianMixture, RandomInterceptLogistic

SCORE_TOL = 1e-5  # em's default, per observation


def ppca_maximum(x: np.ndarray, q: int) -> float:
    """The PPCA maximum log-likelihood from the sample covariance's eigenvalues (Tipping and Bishop 1999)."""
    n, d = x.shape
    lam = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
    noise = lam[q:].mean()
    return -n / 2 * (d * np.log(2 * np.pi) + np.log(lam[:q]).sum() + (d - q) * np.log(noise) + d)


def assert_never_decreases(path):
    path = np.asarray(path)
    assert np.all(np.diff(path) >= -1e-12 * np.abs(path[1:])), np.diff(path).min()


@pytest.mark.slow
def test_readme_ppca_gradient_m_step_stays_at_the_tipping_bishop_maximum():
    x = torch.tensor(load_iris().data, dtype=torch.float64)
    fa = FactorAnalysis(dim=4, latent_dim=2, noise="isotropic")
    result = freqvi.em(fa, guide=fa.guide, data=x, m_step="gradient", progress=False, seed=0)
    assert_never_decreases(result.log_likelihood)
    assert result.converged and result.stop_reason == "tolerance"
    assert result.score <= SCORE_TOL * len(x)
    assert fa.log_marginal(x).sum().item() == pytest.approx(ppca_maximum(x.numpy(), 2), abs=1e-6)


@pytest.mark.slow
def test_ppca_gradient_m_step_ascends_to_the_tipping_bishop_maximum():
    x = factor_data(n=300, isotropic=True)
    g = torch.Generator().manual_seed(7)
    init = {"mean": np.zeros(5), "loading": torch.randn(5, 2, generator=g).numpy(), "noise_variance": 1.0}
    fa = FactorAnalysis(5, 2, "isotropic", init=init)
    result = freqvi.em(fa, guide=fa.guide, data=x, m_step="gradient", progress=False, seed=0)
    assert_never_decreases(result.log_likelihood)
    assert result.log_likelihood[-1] > result.log_likelihood[0] + 10
    assert result.converged and result.score <= SCORE_TOL * len(x)
    assert fa.log_marginal(x).sum().item() == pytest.approx(ppca_maximum(x.numpy(), 2), abs=1e-5)


def test_mixture_gradient_m_step_never_decreases_and_stops_at_a_stationary_point():
    x = mixture_data()
    reference = GaussianMixture(3, 2)
    freqvi.em(reference, guide=reference.guide, data=x, tol=1e-12, max_iter=5000, progress=False, seed=0)
    gm = GaussianMixture(3, 2)
    result = freqvi.em(gm, guide=gm.guide, data=x, m_step="gradient", progress=False, seed=0)
    assert_never_decreases(result.log_likelihood)
    assert result.converged and result.score <= SCORE_TOL * len(x)
    # the same maximum as closed-form EM run far past its tolerance
    assert gm.log_marginal(x).sum().item() == pytest.approx(reference.log_marginal(x).sum().item(), abs=1e-4)


def latent_class_data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = 0.1 + 0.8 * torch.rand(3, 6, generator=g, dtype=torch.float64)
    z = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g)
    return torch.bernoulli(probs[z], generator=g)


def latent_class_params(x):
    g = torch.Generator().manual_seed(1)
    weights = pyro.param("lc_weights", torch.full((3,), 1 / 3, dtype=x.dtype), constraint=constraints.simplex)
    probs = pyro.param("lc_probs", lambda: 0.3 + 0.4 * torch.rand(3, x.shape[1], generator=g, dtype=x.dtype),
                       constraint=constraints.unit_interval)
    return weights, probs


def latent_class_joint(x):
    """log p(x_i, z_i = k), shape (n, 3)."""
    weights, probs = latent_class_params(x)
    return dist.Bernoulli(probs).log_prob(x.unsqueeze(-2)).sum(-1) + weights.log()


def latent_class_model(x):
    weights, probs = latent_class_params(x)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Bernoulli(probs[z]).to_event(1), obs=x[i])


def latent_class_guide(x):
    """The exact posterior, enumerated."""
    logits = latent_class_joint(x)
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})


def latent_class_log_likelihood(x) -> torch.Tensor:
    return torch.logsumexp(latent_class_joint(x), -1).sum()


@pytest.mark.slow
def test_latent_class_gradient_em_converges_only_at_the_maximum():
    x = latent_class_data()
    result = freqvi.em(latent_class_model, guide=latent_class_guide, data=x, progress=False, seed=0)
    assert result.m_step == "gradient"
    assert_never_decreases(result.log_likelihood)
    params = [pyro.param(name).unconstrained() for name in ("lc_weights", "lc_probs")]
    score = torch.autograd.grad(latent_class_log_likelihood(x), params)
    assert result.converged and max(float(s.abs().max()) for s in score) <= SCORE_TOL * len(x)
    reached = latent_class_log_likelihood(x).item()
    # independent maximum: L-BFGS on the exact log-likelihood from em's end point
    optimizer = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -latent_class_log_likelihood(x)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert reached == pytest.approx(latent_class_log_likelihood(x).item(), abs=1e-4)


def hierarchical_params(x):
    mu = pyro.param("h_mu", torch.tensor(0.0, dtype=x.dtype))
    tau = pyro.param("h_tau", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    return mu, tau


def hierarchical_model(x):
    """z_i ~ N(0, tau^2), x_i ~ N(mu + z_i, 1)."""
    mu, tau = hierarchical_params(x)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(0.0, tau))
        pyro.sample("x", dist.Normal(mu + z, 1.0), obs=x[i])


def hierarchical_guide(x):
    """The exact posterior N(s (x_i - mu), s), s = tau^2 / (tau^2 + 1): drawn, not enumerable."""
    mu, tau = hierarchical_params(x)
    shrink = tau**2 / (tau**2 + 1)
    with pyro.plate("data", len(x)) as i:
        pyro.sample("z", dist.Normal(shrink * (x[i] - mu), shrink.sqrt()))


def test_monte_carlo_e_step_with_the_exact_guide_stops_at_the_closed_form_mle():
    g = torch.Generator().manual_seed(3)
    x = 1.0 + 1.5 * torch.randn(200, generator=g, dtype=torch.float64) + torch.randn(200, generator=g,
                                                                                      dtype=torch.float64)
    result = freqvi.em(hierarchical_model, guide=hierarchical_guide, data=x, progress=False, seed=0)
    assert result.converged and result.num_iter <= 100
    assert_never_decreases(result.log_likelihood)  # every draw of the exact guide gives log p(x)
    # MLE in closed form: mu = mean(x), tau^2 + 1 = var(x)
    assert pyro.param("h_mu").item() == pytest.approx(x.mean().item(), abs=1e-4)
    assert pyro.param("h_tau").item() ** 2 + 1 == pytest.approx(x.var(correction=0).item(), rel=1e-4)


@pytest.mark.slow
def test_default_em_on_a_glmm_stops_by_itself_near_the_quadrature_mle():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(4, 17, (150,), generator=g)
    groups = torch.repeat_interleave(torch.arange(150), sizes)
    covariate = torch.randn(len(groups), generator=g, dtype=torch.float64)
    X = torch.stack([torch.ones_like(covariate), covariate], -1)
    u = torch.randn(150, generator=g, dtype=torch.float64)
    logits = X @ torch.tensor([-0.5, 1.0], dtype=torch.float64) + u[groups]
    y = torch.bernoulli(torch.sigmoid(logits), generator=g)
    data = RandomInterceptLogistic.pad(X, y, groups.numpy())
    reference = RandomInterceptLogistic(2)
    freqvi.maximize_likelihood(reference, data)
    mle = reference.estimates()
    model = RandomInterceptLogistic(2)
    result = freqvi.em(model, guide=model.guide, data=data, progress=False, seed=0)
    assert result.converged and result.stop_reason == "tolerance" and result.num_iter <= 150
    estimates = model.estimates()
    assert (estimates["beta"] - mle["beta"]).abs().max() < 0.05
    assert abs(estimates["sigma"] - mle["sigma"]) < 0.1
    # the recorded ELBO uses draws independent of the fit: below the log-likelihood
    assert result.log_likelihood[-1] < reference.log_marginal(*data).sum().item()


def test_a_run_stopped_by_max_iter_is_not_converged_and_says_why():
    x = latent_class_data()
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        result = freqvi.em(latent_class_model, guide=latent_class_guide, data=x, max_iter=2, progress=False)
    assert not result.converged and result.stop_reason == "max_iter"


def test_bad_score_tol_is_refused():
    with pytest.raises(FreqviInputError, match="score_tol"):
        freqvi.em(latent_class_model, guide=latent_class_guide, data=latent_class_data(n=20), score_tol=-1.0)


def test_local_guide_with_a_drawn_discrete_site_is_refused_before_any_work():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        p = pyro.param("local_p", torch.full((len(x),), 0.5), constraint=constraints.unit_interval)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(p))

    with pytest.raises(FreqviInputError, match=r"reparameterised latent sites; \['z'\]"):
        freqvi.em(model, guide=guide, data=torch.randn(10), progress=False)


def test_variational_em_recorded_elbo_is_below_the_mixture_log_likelihood():
    x = mixture_data(n=200)
    gm = GaussianMixture(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = freqvi.em(gm, guide=gm.mean_field_guide(), data=x, max_iter=30, progress=False, seed=0)
    assert result.log_likelihood[-1] <= gm.log_marginal(x).sum().item() + 1e-6
    assert_never_decreases(result.log_likelihood)  # enumerated: exact, no draws


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_a_checkpoint_without_common_random_numbers_is_refused(tmp_path):
    from freqvi.infer.checkpoint import load_checkpoint, save_checkpoint

    x = factor_data(n=40)
    path = tmp_path / "em.ckpt"
    fa = FactorAnalysis(5, 2)
    freqvi.em(fa, guide=fa.guide, data=x, max_iter=2, tol=0.0, checkpoint=path, progress=False)
    state, metadata = load_checkpoint(path)
    del state["seeds"]  # as written before common random numbers
    save_checkpoint(path, state, {k: v for k, v in metadata.items() if k not in ("format", "sha256")})
    with pytest.raises(FreqviInputError, match="no 'seeds' in it"):
        freqvi.em(FactorAnalysis(5, 2), data=x, max_iter=4, resume=path, progress=False)


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_mean_field_e_step_of_a_mixture_is_the_exact_posterior():
    """One discrete site per observation: the E-step's coordinate-ascent sweep gives the
    responsibilities, checked against scipy's densities at em's final parameters."""
    from scipy.special import softmax
    from scipy.stats import multivariate_normal

    x = mixture_data(n=200)
    gm = GaussianMixture(3, 2)
    guide = gm.mean_field_guide()
    freqvi.em(gm, guide=guide, data=x, max_iter=3, tol=0.0, progress=False, seed=0)
    est = {k: v.numpy() for k, v in gm.estimates().items()}
    components = zip(est["weights"], est["locs"], est["covariances"], strict=True)
    log_joint = np.stack([np.log(w) + multivariate_normal(loc, cov).logpdf(x.numpy())
                          for w, loc, cov in components], -1)
    responsibilities = softmax(guide.categorical_logits()[0].detach().numpy(), -1)
    np.testing.assert_allclose(responsibilities, softmax(log_joint, -1), atol=1e-9)  # exact, up to rounding
