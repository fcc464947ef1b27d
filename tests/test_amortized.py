"""AmortizedNormal: an encoder guide for any model with continuous latents in the data plate,
checked against closed-form ELBO optima, exact log-likelihoods and the free-parameter guide."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.optim import ClippedAdam
from scipy.stats import dirichlet_multinomial, norm
from simulate import factor_data, grouped_logistic_data
from torch import nn

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.guides import AmortizedNormal, LocalMeanField
from freqvi.models import FactorAnalysis, GaussianMixture, RandomInterceptLogistic


def elbo_estimate(model, guide, data, batches=8, particles=500):
    """The ELBO and its Monte-Carlo standard error, from independent batches of particles."""
    est = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=2)
    values = torch.tensor([-est.loss(model, guide, *data) for _ in range(batches)], dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(batches))


def in_param_store(parameters):
    """Whether these very tensors are leaves of Pyro's parameter store."""
    leaves = {id(p) for _, p in pyro.get_param_store().named_parameters()}
    return all(id(p) in leaves for p in parameters)


def mean_field_optimum(fa, x):
    r"""The best ELBO of any diagonal Gaussian q for factor analysis, in closed form.

    The posterior is N(m_i, Lambda^{-1}) with Lambda = I + W^T Psi^{-1} W; the best diagonal
    q_i is N(m_i, diag(1 / Lambda_jj)), at KL = (sum_j log Lambda_jj - log det Lambda) / 2 from it.
    """
    w, psi = fa.loading.detach(), fa.noise_variance.detach().expand(fa.dim)
    precision = torch.eye(fa.latent_dim, dtype=x.dtype) + w.T @ (w / psi[:, None])
    kl = 0.5 * (precision.diagonal().log().sum() - torch.logdet(precision))
    return freqvi.log_likelihood(fa, x).total - len(x) * float(kl)


@pytest.fixture(scope="module")
def fitted_fa():
    """FA at its MLE; the free and the amortised guide fitted with theta held fixed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x, held_out = factor_data(n=400).split([300, 100])
    fa = FactorAnalysis(5, 2)
    freqvi.em(fa, x, tol=1e-8, max_iter=2000, progress=False)
    frozen = poutine.block(fa.model, hide_types=["param"])
    free, amortized = fa.mean_field_guide(), AmortizedNormal(fa.model)
    # a decaying learning rate takes both fits below Adam's noise floor, near their optima
    freqvi.fit(frozen, x, free, loss="mean_field", optim=ClippedAdam({"lr": 0.05, "lrd": 0.99}),
               num_steps=400, progress=False)
    amortized_fit = freqvi.fit(frozen, x, amortized, loss="mean_field",
                               optim=ClippedAdam({"lr": 0.03, "lrd": 0.99}), num_steps=400, progress=False)
    return {"fa": fa, "x": x, "held_out": held_out, "frozen": frozen, "free": free, "amortized": amortized,
            "start": amortized_fit.elbo[0]}


@pytest.mark.slow
def test_amortized_elbo_matches_the_free_guide_on_factor_analysis(fitted_fa):
    x, frozen = fitted_fa["x"], fitted_fa["frozen"]
    optimum = mean_field_optimum(fitted_fa["fa"], x)
    free, free_se = elbo_estimate(frozen, fitted_fa["free"], (x,))
    amortized, amortized_se = elbo_estimate(frozen, fitted_fa["amortized"], (x,))
    assert 4 * max(free_se, amortized_se) < 1e-3 * abs(free)  # MC error small against 1%
    assert abs(amortized - free) < 0.01 * abs(free)
    # no diagonal Gaussian beats the closed-form optimum; the encoder gets close to it
    assert amortized < optimum + 4 * amortized_se
    assert optimum - amortized < 0.01 * (optimum - fitted_fa["start"])


@pytest.mark.slow
def test_importance_log_likelihood_with_the_amortized_proposal(fitted_fa):
    fa, guide = fitted_fa["fa"], fitted_fa["amortized"]
    # new observations of the same population need no new parameters, only a pass of the encoder
    for x in (fitted_fa["x"], fitted_fa["held_out"]):
        exact = freqvi.log_likelihood(fa, x).total
        est = freqvi.log_likelihood(fa.model, x, guide, method="importance", num_samples=2000, seed=1)
        assert est.method == "importance" and est.per_observation.shape == (len(x),)
        assert 0 < est.standard_error < 0.5
        assert abs(est.total - exact) < 4 * est.standard_error


class LinearGaussian(nn.Module):
    """A user encoder: loc linear in x, one free scale per latent coordinate."""

    def __init__(self, dim, latent_dim):
        super().__init__()
        self.linear = nn.Linear(dim, latent_dim, dtype=torch.float64)
        self.log_scale = nn.Parameter(torch.zeros(latent_dim, dtype=torch.float64))

    def forward(self, x):
        return self.linear(x), self.log_scale.exp().expand(len(x), -1)


def test_user_encoder_reaches_the_closed_form_optimum():
    """The posterior mean of FA is linear in x and its best diagonal scale constant: the
    family of LinearGaussian holds the mean-field optimum."""
    x = factor_data(n=200)
    fa = FactorAnalysis(5, 2)
    freqvi.em(fa, x, tol=1e-8, max_iter=2000, progress=False)
    frozen = poutine.block(fa.model, hide_types=["param"])
    encoder = LinearGaussian(5, 2)
    guide = AmortizedNormal(fa.model, encoder)
    result = freqvi.fit(frozen, x, guide, loss="mean_field", optim=ClippedAdam({"lr": 0.05, "lrd": 0.99}),
                        num_steps=300, progress=False)
    assert in_param_store(encoder.parameters())
    optimum = mean_field_optimum(fa, x)
    elbo, se = elbo_estimate(frozen, guide, (x,))
    assert elbo < optimum + 4 * se
    assert optimum - elbo < 0.005 * (optimum - result.elbo[0])


def random_effects(x):
    """z_i ~ N(0, tau^2), x_i ~ N(mu + z_i, 1); marginally x_i ~ N(mu, tau^2 + 1)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    tau = pyro.param("tau", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(0.0, tau))
        pyro.sample("x", dist.Normal(mu + z, 1.0), obs=x[i])


def random_effects_log_likelihood(x, mu, tau):
    return norm(mu, math.sqrt(tau**2 + 1)).logpdf(x.numpy()).sum()


def test_user_model_through_minibatched_fit_and_log_likelihood():
    g = torch.Generator().manual_seed(3)
    x = 1.0 + 1.5 * torch.randn(400, generator=g, dtype=torch.float64)
    x = x + torch.randn(400, generator=g, dtype=torch.float64)
    guide = AmortizedNormal(random_effects, hidden=(32,))
    freqvi.fit(random_effects, x, guide, batch_size=50, lr=0.05, num_steps=400, progress=False)
    mu, tau = pyro.param("mu").item(), pyro.param("tau").item()
    fitted = random_effects_log_likelihood(x, mu, tau)
    mle = random_effects_log_likelihood(x, float(x.mean()), math.sqrt(float(x.var(correction=0)) - 1))
    # within half a nat of the closed-form MLE: far inside a likelihood-ratio confidence region
    assert mle - 0.5 < fitted <= mle
    est = freqvi.log_likelihood(random_effects, x, guide, num_samples=500, seed=1)
    assert est.method == "importance"
    assert abs(est.total - fitted) < 4 * est.standard_error


def log_normal_effects(x):
    """z_i ~ LogNormal(m, s), x_i ~ N(log z_i, 1); marginally x_i ~ N(m, s^2 + 1)."""
    m = pyro.param("m", torch.tensor(0.5, dtype=x.dtype))
    s = pyro.param("s", torch.tensor(0.8, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.LogNormal(m, s))
        pyro.sample("x", dist.Normal(z.log(), 1.0), obs=x[i])


def test_positive_latent_through_biject_to():
    """q(z_i | x_i) is exp(Normal): its Jacobian must cancel the model's LogNormal one for the
    importance-sampled log-likelihood to hit the closed form (the exact posterior of log z_i is
    Gaussian with a mean linear in x_i, so a linear encoder holds it)."""
    x = 0.5 + (0.8**2 + 1) ** 0.5 * torch.randn(200, dtype=torch.float64)
    frozen = poutine.block(log_normal_effects, hide_types=["param"])
    guide = AmortizedNormal(log_normal_effects, hidden=())
    freqvi.fit(frozen, x, guide, lr=0.05, num_steps=400, progress=False)
    assert guide.latent_shapes == {"z": torch.Size([])}
    exact = norm(0.5, (0.8**2 + 1) ** 0.5).logpdf(x.numpy()).sum()
    est = freqvi.log_likelihood(log_normal_effects, x, guide, num_samples=200, seed=1)
    assert abs(est.total - exact) < 4 * est.standard_error


ALPHA = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)


def dirichlet_counts(x):
    """p_i ~ Dirichlet(alpha), x_i ~ Multinomial(20, p_i); marginally Dirichlet-multinomial."""
    with pyro.plate("data", len(x)) as i:
        p = pyro.sample("p", dist.Dirichlet(ALPHA))
        pyro.sample("x", dist.Multinomial(20, p), obs=x[i])


@pytest.mark.slow
@pytest.mark.parametrize("make_guide", [AmortizedNormal, LocalMeanField])
def test_simplex_latent_through_stick_breaking(make_guide):
    """A simplex of 3 has 2 unconstrained coordinates; the ELBO bounds the closed-form
    Dirichlet-multinomial log-likelihood and the fit closes most of the gap."""
    x = dist.Multinomial(20, dist.Dirichlet(ALPHA).sample((60,))).sample()
    guide = make_guide(dirichlet_counts)
    result = freqvi.fit(dirichlet_counts, x, guide, lr=0.05, num_steps=300, progress=False)
    p = poutine.trace(guide).get_trace(x).nodes["p"]["value"]
    assert p.shape == (60, 3) and torch.allclose(p.sum(-1), torch.ones(60, dtype=p.dtype))
    exact = dirichlet_multinomial(ALPHA.numpy(), 20).logpmf(x.numpy()).sum()
    elbo, se = elbo_estimate(dirichlet_counts, guide, (x,), batches=4, particles=200)
    assert elbo < exact + 4 * se
    assert exact - elbo < 0.05 * (exact - result.elbo[0])


def grid_model(data_dim, inner_dim):
    """z_ij ~ N(0, 1), x_ij ~ N(z_ij, 1) over observations i and coordinates j, with the data
    plate at ``data_dim``; marginally x_ij ~ N(0, 2)."""

    def model(x):
        with pyro.plate("data", len(x), dim=data_dim) as i, pyro.plate("coords", x.shape[1], dim=inner_dim):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[i] if data_dim == -2 else x[i].T)

    return model


@pytest.mark.parametrize(("data_dim", "inner_dim"), [(-2, -1), (-1, -2)])
def test_data_plate_at_any_dim(data_dim, inner_dim):
    x = 2 ** 0.5 * torch.randn(150, 3, dtype=torch.float64)
    model = grid_model(data_dim, inner_dim)
    guide = AmortizedNormal(model, hidden=())
    freqvi.fit(model, x, guide, lr=0.05, num_steps=300, progress=False)
    assert guide.latent_shapes == {"z": torch.Size([3])}
    exact = norm(0.0, 2 ** 0.5).logpdf(x.numpy()).sum()
    est = freqvi.log_likelihood(model, x, guide, num_samples=500, seed=1)
    assert abs(est.total - exact) < 4 * est.standard_error


class WrongWidth(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(5, width, dtype=torch.float64)

    def forward(self, x):
        h = self.linear(x)
        return h, h.exp()


def global_latent(x):
    shift = pyro.sample("shift", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(shift, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])


@pytest.mark.parametrize(("model", "encoder", "message"), [
    (lambda: FactorAnalysis(5, 2).model, lambda: WrongWidth(3),
     r"shape \(batch, D\) = \(60, 2\).*\{'factors': \(2,\)\}.*returned a tuple of 2: \['shape \(60, 3\)'"),
    (lambda: FactorAnalysis(5, 2).model, lambda: nn.Linear(5, 4, dtype=torch.float64),
     r"\(batch, D\) = \(60, 2\).*returned one tensor of shape \(60, 4\)"),
    (lambda: GaussianMixture(3, 5).model, lambda: None, r"site 'assignment' is discrete"),
    (lambda: global_latent, lambda: None, r"latent site 'shift' is outside the data plate 'data'"),
], ids=["encoder-width", "encoder-output", "discrete-latent", "global-latent"])
def test_bad_input_is_refused_before_fitting(model, encoder, message):
    x = factor_data(n=60)
    model = model()
    with pytest.raises(FreqviInputError, match=message):
        freqvi.fit(model, x, AmortizedNormal(model, encoder()), num_steps=5, progress=False)


def test_minibatched_fit_trains_the_encoder():
    x = factor_data(n=200)
    fa = FactorAnalysis(5, 2)
    guide = AmortizedNormal(fa.model)
    guide(x)  # the default encoder is built on the first call
    before = {n: p.detach().clone() for n, p in guide.encoder.named_parameters()}
    rows = []
    guide.encoder.register_forward_pre_hook(lambda module, data: rows.append(len(data[0])))
    result = freqvi.fit(fa.model, x, guide, batch_size=25, lr=0.01, num_steps=100, progress=False)
    assert all(math.isfinite(v) for v in result.elbo)
    assert set(rows[1:]) == {25}  # the first call is the full-data check of the pair
    assert in_param_store(guide.encoder.parameters())  # what SVI's optimiser updates
    assert all(not torch.equal(value, before[name]) for name, value in guide.encoder.named_parameters())
    elbo, se = elbo_estimate(fa.model, guide, (x,), batches=4, particles=100)
    assert elbo < freqvi.log_likelihood(fa, x).total + 4 * se  # a lower bound


@pytest.mark.slow
def test_amortized_guide_fits_the_random_intercept_glmm():
    """Groups of 1 to 19 observations, padded: the encoder reads a group's (X, y, mask) rows,
    flattened, and its ELBO matches that of free per-group Gaussians; both bound the
    log-likelihood by quadrature."""
    data = RandomInterceptLogistic.pad(*grouped_logistic_data(m=150, n=10, ragged=True))
    glmm = RandomInterceptLogistic(2, init={"beta": (-0.5, 1.0), "sigma": 1.0})
    frozen = poutine.block(glmm.model, hide_types=["param"])
    free, amortized = glmm.mean_field_guide(), AmortizedNormal(glmm.model)
    freqvi.fit(frozen, data, free, loss="mean_field", optim=ClippedAdam({"lr": 0.05, "lrd": 0.99}),
               num_steps=400, progress=False)
    result = freqvi.fit(frozen, data, amortized, loss="mean_field",
                        optim=ClippedAdam({"lr": 0.01, "lrd": 0.99}), num_steps=400, progress=False)
    exact = freqvi.log_likelihood(glmm, data).total
    free_elbo, free_se = elbo_estimate(frozen, free, data, batches=4, particles=200)
    elbo, se = elbo_estimate(frozen, amortized, data, batches=4, particles=200)
    assert free_elbo < exact + 4 * free_se and elbo < exact + 4 * se
    assert abs(elbo - free_elbo) < 0.01 * abs(free_elbo)
    assert exact - elbo < 0.01 * (exact - result.elbo[0])
