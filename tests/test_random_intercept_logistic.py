"""Random-intercept logistic regression: quadrature against scipy, VI against the quadrature MLE."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from numpy.polynomial.hermite import hermgauss
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.optim import ClippedAdam
from scipy.integrate import quad
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_expit
from scipy.stats import norm
from simulate import grouped_logistic_data

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.handlers import SubsamplePlate
from freqvi.models import RandomInterceptLogistic

BETA, SIGMA = (-0.5, 1.0), 1.0
TRUTH = {"beta": BETA, "sigma": SIGMA}
BETA_TOL, SIGMA_TOL = 0.05, 0.1


def padded(**options):
    return RandomInterceptLogistic.pad(*grouped_logistic_data(**options))


# ----- independent references ------------------------------------------------------------------
def group_log_likelihood(x, y, beta, sigma):
    """``log p(y_i)`` of one group's observed rows by scipy.integrate.quad (float64).

    The integrand is divided by its maximum (found by Brent's method) and integrated
    on either side of it.
    """
    offsets = x @ beta

    def log_f(u):
        eta = offsets + u
        return np.where(y == 1, log_expit(eta), log_expit(-eta)).sum() + norm.logpdf(u, 0.0, sigma)

    mode = minimize_scalar(lambda u: -log_f(u)).x
    peak = log_f(mode)
    halves = [quad(lambda u: np.exp(log_f(u) - peak), a, b, epsabs=0, epsrel=1e-12, limit=200)[0]
              for a, b in ((-np.inf, mode), (mode, np.inf))]
    return peak + np.log(sum(halves))


def reference_log_likelihood(data, beta, sigma):
    X, y, mask = (t.numpy() for t in data)
    mask = mask.astype(bool)
    return np.array([group_log_likelihood(X[i][mask[i]], y[i][mask[i]], np.asarray(beta), sigma)
                     for i in range(len(X))])


def theta(model):
    """The unconstrained parameters ``(beta, log sigma)``."""
    return [model.beta_unconstrained, model.sigma_unconstrained]


def quadrature_mle(data):
    """The reference MLE: the AGHQ log-likelihood maximised by L-BFGS-B over ``(beta, log sigma)``."""
    model = RandomInterceptLogistic(2, init={"beta": [0.0, 0.0], "sigma": 1.0})
    model.log_marginal(*data)
    params = theta(model)

    def negative_log_likelihood(vector):
        with torch.no_grad():
            params[0].copy_(torch.as_tensor(vector[:2]))
            params[1].copy_(torch.as_tensor(vector[2]))
        loss = -model.log_marginal(*data).sum()
        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        return loss.item(), grad.numpy()

    fit = minimize(negative_log_likelihood, np.zeros(3), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-9, "ftol": 1e-15})
    assert np.abs(fit.jac).max() < 1e-6
    return SimpleNamespace(beta=fit.x[:2], sigma=math.exp(fit.x[2]), log_likelihood=-fit.fun)


def decaying_adam(num_steps, lr=0.05, final_lr=1e-3):
    """Adam with the learning rate decayed geometrically to ``final_lr``.

    ClippedAdam only for its decay: ``clip_norm=inf``, because clamping the elements of
    a noisy gradient biases SVI (with the default clip, minibatch fits ended at sigma
    1.43 for an MLE of 1.16).
    """
    decay = (final_lr / lr) ** (1 / num_steps)
    return ClippedAdam({"lr": lr, "lrd": decay, "clip_norm": math.inf})


def monte_carlo_elbo(model, guide, data, repeats=20, particles=500):
    """Mean and standard error of ``repeats`` Trace_ELBO estimates of ``particles`` draws each."""
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.tensor([-elbo.loss(model.model, guide, *data) for _ in range(repeats)],
                         dtype=torch.float64)
    return float(draws.mean()), float(draws.std() / math.sqrt(repeats))


def gauss_hermite_elbo(model, guide, data, num_nodes=60):
    """The same ELBO computed deterministically: each q(u_i) = N(mu_i, s_i^2) is Gaussian, so
    ``E_q log p(y_i | u)`` is a Gauss-Hermite sum, and the prior term and entropy are closed forms."""
    X, y, mask = data
    beta, sigma = model.beta.detach(), model.sigma.detach()
    mu, s = guide.intercept_loc.detach(), guide.intercept_scale.detach()
    nodes, weights = (torch.as_tensor(a).unsqueeze(-1) for a in hermgauss(num_nodes))
    logits = X @ beta + (mu + math.sqrt(2) * s * nodes).unsqueeze(-1)  # (Q, m, n_max)
    log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
        logits, y.expand_as(logits), reduction="none")
    expected_log_lik = (weights * (log_lik * mask).sum(-1)).sum(0) / math.sqrt(math.pi)
    expected_log_prior = -0.5 * math.log(2 * math.pi) - sigma.log() - (mu**2 + s**2) / (2 * sigma**2)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + s.log()
    return float((expected_log_lik + expected_log_prior + entropy).sum())


@pytest.fixture(scope="module")
def data():
    return padded()


@pytest.fixture(scope="module")
def mle(data):
    return quadrature_mle(data)


@pytest.fixture(scope="module")
def full_batch_fit(data):
    model = RandomInterceptLogistic(2)
    freqvi.fit(model, data, loss="mean_field", optim=decaying_adam(600), num_steps=600, seed=0,
               progress=False)
    return model


def assert_near(estimates, reference):
    np.testing.assert_allclose(estimates["beta"].numpy(), reference.beta, atol=BETA_TOL)
    assert abs(float(estimates["sigma"]) - reference.sigma) < SIGMA_TOL


# ----- the exact log-likelihood ----------------------------------------------------------------
@pytest.mark.parametrize(("beta", "sigma"), [(BETA, 0.5), (BETA, 1.0), ((1.0, -2.0), 3.0)])
def test_quadrature_matches_scipy_quad(beta, sigma):
    data = padded(m=20, n=8, beta=beta, sigma=sigma, ragged=True)
    model = RandomInterceptLogistic(2, init={"beta": beta, "sigma": sigma})
    ours = model.log_marginal(*data).detach().numpy()
    # an absolute tolerance on log p(y_i) is a relative one on the likelihood p(y_i)
    np.testing.assert_allclose(ours, reference_log_likelihood(data, beta, sigma), rtol=0, atol=1e-8)


def central_differences(f, x, h):
    """Gradient and Hessian of ``f`` at ``x`` by central differences with step ``h``."""
    steps = h * np.eye(len(x))
    grad = np.array([(f(x + e) - f(x - e)) / (2 * h) for e in steps])
    hessian = np.array([[(f(x + a + b) - f(x + a - b) - f(x - a + b) + f(x - a - b)) / (4 * h * h)
                         for b in steps] for a in steps])
    return grad, hessian


def test_derivatives_hold_with_the_quadrature_centre_held_fixed():
    data = padded(m=30, ragged=True)

    def log_likelihood(vector):  # (beta, log sigma); the mode and curvature are found afresh
        model = RandomInterceptLogistic(2, init={"beta": vector[:2], "sigma": math.exp(vector[2])})
        return model.log_marginal(*data).sum().item()

    model = RandomInterceptLogistic(2, init={"beta": BETA, "sigma": 1.3})
    total = model.log_marginal(*data).sum()  # creates the parameters on this first call
    params = theta(model)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, params, create_graph=True)])
    hessian = torch.stack([
        torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, retain_graph=True)]) for g in grad])
    fd_grad, fd_hessian = central_differences(log_likelihood, np.array([*BETA, math.log(1.3)]), 1e-4)
    np.testing.assert_allclose(grad.detach().numpy(), fd_grad, rtol=1e-6)
    np.testing.assert_allclose(hessian.detach().numpy(), fd_hessian, rtol=1e-4)


def test_log_likelihood_takes_the_exact_route():
    data = padded(m=20, ragged=True)
    model = RandomInterceptLogistic(2, init=TRUTH)
    result = freqvi.log_likelihood(model, data)
    assert result.method == "exact"
    assert result.per_observation.shape == (20,)
    assert result.total == pytest.approx(reference_log_likelihood(data, BETA, SIGMA).sum(), rel=1e-10)


# ----- variational fits against the quadrature MLE ---------------------------------------------
def test_maximize_likelihood_agrees_with_scipy_on_the_quadrature_mle(data, mle):
    model = RandomInterceptLogistic(2)
    result = freqvi.maximize_likelihood(model, data)
    assert result.converged
    np.testing.assert_allclose(model.beta.detach().numpy(), mle.beta, atol=1e-6)
    assert float(model.sigma) == pytest.approx(mle.sigma, abs=1e-6)
    assert result.log_likelihood == pytest.approx(mle.log_likelihood, abs=1e-8)


def test_the_mle_of_simulated_data_is_within_four_standard_errors_of_the_truth():
    data = RandomInterceptLogistic.simulate(200, 8, beta=(0.3, -0.8, 0.5), sigma=1.5, seed=7)
    assert [tuple(t.shape) for t in data] == [(200, 8, 3), (200, 8), (200, 8)]
    model = RandomInterceptLogistic(3, quadrature_nodes=40)
    freqvi.maximize_likelihood(model, data)
    summary = freqvi.observed_information(model, data).summary()
    truth = np.array([0.3, -0.8, 0.5, 1.5])
    z = (summary["estimate"].to_numpy() - truth) / summary["std_err"].to_numpy()
    assert np.abs(z).max() < 4, summary


def test_maximize_likelihood_needs_an_exact_log_likelihood():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(())), 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(FreqviInputError, match="exact log-likelihood"):
        freqvi.maximize_likelihood(model, torch.randn(5))


def test_joint_svi_reaches_the_quadrature_mle_with_elbo_below_the_log_likelihood(data, mle, full_batch_fit):
    model = full_batch_fit
    assert_near(model.estimates(), mle)
    log_likelihood = model.log_marginal(*data).sum().item()
    assert log_likelihood <= mle.log_likelihood
    elbo, se = monte_carlo_elbo(model, model.guide, data)
    assert abs(elbo - gauss_hermite_elbo(model, model.guide, data)) < 4 * se
    assert log_likelihood - elbo > 4 * se  # the KL gap of Gaussian q to the skewed posterior


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_variational_em_reaches_the_quadrature_mle(data, mle):
    model = RandomInterceptLogistic(2)
    result = freqvi.em(model, data, max_iter=12, m_step_iters=20,
                       seed=0, progress=False)
    assert result.m_step == "gradient"
    assert_near(model.estimates(), mle)


@pytest.mark.slow
def test_minibatch_fit_reaches_the_full_batch_optimum(data, mle, full_batch_fit):
    model = RandomInterceptLogistic(2)
    freqvi.fit(model, data, optim=decaying_adam(3000), num_steps=3000, batch_size=len(data[0]) // 10,
               seed=0, progress=False)
    full = full_batch_fit.estimates()
    assert_near(model.estimates(), SimpleNamespace(beta=full["beta"].numpy(), sigma=float(full["sigma"])))
    assert_near(model.estimates(), mle)


def test_guide_follows_a_subsampled_plate(data):
    model = RandomInterceptLogistic(2, init=TRUTH)
    guide = model.guide
    guide(*data)
    with torch.no_grad():
        guide.intercept_loc_unconstrained.copy_(torch.arange(200.0, dtype=torch.float64))
    batch = torch.tensor([3, 141, 17])
    with SubsamplePlate("data", batch):
        guide_trace = poutine.trace(guide).get_trace(*data)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(*data)
    assert torch.equal(guide_trace.nodes["intercept"]["fn"].mean, batch.to(torch.float64))
    assert model_trace.nodes["obs"]["value"].shape == (3, data[1].shape[1])
    assert model_trace.nodes["obs"]["scale"] == pytest.approx(200 / 3)


# ----- data layout and input validation --------------------------------------------------------
def test_pad_groups_rows_by_sorted_label_keeping_order():
    X = torch.arange(12.0).reshape(6, 2)
    y = torch.tensor([1, 0, 1, 1, 0, 0])
    groups = np.array(["b", "a", "b", "c", "b", "a"])
    Xp, yp, mask = RandomInterceptLogistic.pad(X, y, groups)
    assert Xp.shape == (3, 3, 2) and mask.dtype == Xp.dtype
    np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(Xp[1, :, 0], X[[0, 2, 4], 0])  # group "b", in its original order
    np.testing.assert_array_equal(yp, [[0, 0, 0], [1, 1, 0], [1, 0, 0]])


def bad(data, key, fix):
    """A copy of the padded ``data`` with one array changed by ``fix``."""
    arrays = dict(zip("Xym", (t.clone() for t in data), strict=True))
    arrays[key] = fix(arrays[key])
    return arrays["X"], arrays["y"], arrays["m"]


def set_item(index, value):
    def fix(t):
        t[index] = value
        return t
    return fix


BAD_DATA = [  # m = 20 groups padded to n_max = 5, p = 2
    ("y", set_item((0, 0), 2.0), "y must hold only 0 and 1"),
    ("y", set_item((4, 1), 0.5), "the first 0.5 at index (4, 1)"),
    ("X", set_item((2, 0, 1), float("nan")), "non-finite value(s) (first: NaN"),
    ("X", set_item((2, 0, 1), float("inf")), "non-finite value(s) (first: infinite"),
    ("m", set_item(5, 0.0), "1 group(s) are all 0 (first: group 5)"),
    ("m", set_item((0, 0), 0.5), "mask must hold only 0 and 1"),
    ("X", lambda t: t[:, :, :1], "X must have shape (groups, max_group_size, 2)"),
    ("X", lambda t: t[0], "X must have shape"),
    ("y", lambda t: t[:, :-1], "y must have shape (20, 5) (groups, max_group_size), matching X; got (20, 4)"),
    ("m", lambda t: t[:-1], "mask must have shape (20, 5)"),
]


@pytest.mark.parametrize(("key", "fix", "message"), BAD_DATA)
def test_bad_data_is_refused_before_any_work(key, fix, message):
    data = bad(padded(m=20, n=3, ragged=True), key, fix)
    with pytest.raises(FreqviInputError, match=re.escape(message)):
        RandomInterceptLogistic(2, init=TRUTH).log_marginal(*data)
    with pytest.raises(FreqviInputError):
        freqvi.fit(RandomInterceptLogistic(2), data, num_steps=1, progress=False)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: RandomInterceptLogistic(0), "dim must be an integer >= 1"),
    (lambda: RandomInterceptLogistic(2, quadrature_nodes=0), "quadrature_nodes"),
    (lambda: RandomInterceptLogistic(2, init={"beta": [0.0, 0.0]}), "exactly the keys"),
    (lambda: RandomInterceptLogistic(2, init={"beta": [0.0], "sigma": 1.0}), "init['beta']"),
    (lambda: RandomInterceptLogistic(2, init={"beta": [0.0, 0.0], "sigma": 0.0}), "must be positive"),
    (lambda: RandomInterceptLogistic.pad(torch.ones(4, 2), torch.ones(3), np.arange(4)),
     "y and groups must have shape (4,)"),
    (lambda: RandomInterceptLogistic.pad(torch.ones(4), torch.ones(4), np.arange(4)), "X must have shape"),
])
def test_bad_options_are_refused(build, message):
    with pytest.raises(FreqviInputError, match=re.escape(message)):
        build()
