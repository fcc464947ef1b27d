"""The Gaussian diffusion model: its forward chain against simulation and Bayes' rule, its ELBO
estimators against Pyro's full-chain Trace_ELBO and against a closed-form ELBO of a linear-Gaussian
chain, its bound against the exact log-likelihood, its samplers, its data and its errors."""

import math
import re

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

import freqvi
import freqvi.estimators.diffusion
from freqvi import gradient_variance, plots
from freqvi.datasets import load_moons, load_swiss_roll
from freqvi.errors import FreqviInputError
from freqvi.estimators import ESTIMATORS, NoisePredictionLoss, TimeSubsampledELBO
from freqvi.estimators.diffusion import quadratic_terms, step_constants
from freqvi.infer.diffusion import diffusion_bound, energy_distance
from freqvi.models import VAE, GaussianDiffusion, NoiseSchedule, TimeMLP

SHORT = NoiseSchedule.linear(10, 0.05, 0.5)  # T = 10, abar_T ~ 0.03: a chain that reaches noise


class LinearDenoiser(torch.nn.Module):
    r""":math:`\epsilon(x_t, t) = a_t x_t + b_t`, by default the posterior mean of the noise when
    :math:`x_0 \sim N(m, s^2)`: :math:`a_t = \sqrt{1-\bar\alpha_t} / (\bar\alpha_t s^2 + 1 - \bar\alpha_t)`,
    :math:`b_t = -a_t \sqrt{\bar\alpha_t} m`. ``scale`` multiplies it (1: optimal, else not)."""

    def __init__(self, schedule, mean, var, scale=1.0):
        super().__init__()
        abar = schedule.table().alphas_cumprod
        a = (1 - abar).sqrt() / (abar * var + 1 - abar) * scale
        a[0] = 0
        self.register_buffer("a", a)
        self.register_buffer("b", -a * abar.sqrt() * mean)
        self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x, t):
        return self.gain * (self.a[t].unsqueeze(-1) * x + self.b[t].unsqueeze(-1))


def linear_model(data_dim=1, mean=1.0, var=4.0, scale=1.0, reverse_variance="beta"):
    denoiser = LinearDenoiser(SHORT, mean, var, scale).double()
    return GaussianDiffusion(data_dim, schedule=SHORT, denoiser=denoiser, reverse_variance=reverse_variance)


def affine_steps(model):
    r"""``(A_t, B_t, sigma_t^2)``, t = 1..T: :math:`\mu_\theta(x_t, t) = A_t x_t + B_t` (LinearDenoiser)."""
    tab = model.schedule.table()
    den = model.denoiser
    t = torch.arange(1, model.num_steps + 1)
    c = tab.betas[t] / (tab.alphas[t].sqrt() * (1 - tab.alphas_cumprod[t]).sqrt())
    a = 1 / tab.alphas[t].sqrt() - c * den.a[t].detach()
    return a, -c * den.b[t].detach(), model.reverse_variance(t, torch.float64)


def exact_marginal(model):
    """Mean and variance of x_0 under the linear-Gaussian reverse chain: x_T ~ N(0, 1) pushed down."""
    mean, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for a, b, s2 in reversed(list(zip(*affine_steps(model), strict=True))):
        mean, var = a * mean + b, a * a * var + s2
    return mean, var


def closed_form_elbo(model, x0):
    r"""E_q[log p(x_{0:T}) - log q(x_{1:T} | x_0)] per observation of 1-D ``x0``, from the moments of the
    forward chain (x_t has mean sqrt(abar_t) x_0, variance 1 - abar_t, Cov(x_t, x_{t-1}) = sqrt(alpha_t)
    Var(x_{t-1})): no time decomposition, no Monte Carlo."""
    tab = model.schedule.table()
    x0 = x0.double().squeeze(-1)
    a_, b_, s2 = affine_steps(model)
    elbo = torch.zeros_like(x0)
    for t in range(1, model.num_steps + 1):
        m_now, m_prev = tab.alphas_cumprod[t].sqrt() * x0, tab.alphas_cumprod[t - 1].sqrt() * x0
        v_now, v_prev = 1 - tab.alphas_cumprod[t], 1 - tab.alphas_cumprod[t - 1]
        a, b, s = a_[t - 1], b_[t - 1], s2[t - 1]
        resid_mean = m_prev - a * m_now - b  # E[x_{t-1} - A x_t - B]
        resid_var = v_prev + a * a * v_now - 2 * a * tab.alphas[t].sqrt() * v_prev
        log_p = -0.5 * torch.log(2 * math.pi * s) - (resid_mean**2 + resid_var) / (2 * s)
        log_q = -0.5 * torch.log(2 * math.pi * tab.betas[t]) - 0.5
        elbo = elbo + log_p - log_q
    m_last, v_last = tab.alphas_cumprod[-1].sqrt() * x0, 1 - tab.alphas_cumprod[-1]
    return elbo - 0.5 * math.log(2 * math.pi) - 0.5 * (m_last**2 + v_last)


def batch_means(loss, model, x, batches):
    """Mean and standard error of -loss over ``batches`` independent estimates."""
    with pyro.validation_enabled(False):
        values = torch.tensor([-loss.loss(model.model, model.guide, x) for _ in range(batches)],
                              dtype=torch.float64)
    return float(values.mean()), float(values.std() / math.sqrt(batches)), float(values.var())


# ----- the schedule and the forward chain ------------------------------------------------------
def test_schedules_give_the_products_and_posterior_coefficients():
    for schedule in (NoiseSchedule.linear(50), NoiseSchedule.cosine(50), SHORT):
        tab = schedule.table()
        assert tab.betas.dtype == torch.float64 and len(tab.betas) == schedule.num_steps + 1
        torch.testing.assert_close(tab.alphas_cumprod[1:], torch.cumprod(1 - tab.betas[1:], 0))
        assert ((tab.betas[1:] > 0) & (tab.betas[1:] < 1)).all()
        assert tab.posterior_x0[1] == 1 and tab.posterior_xt[1] == 0 and tab.posterior_variance[1] == 0
        assert schedule.table(torch.float32).betas.dtype == torch.float32
    cosine = NoiseSchedule.cosine(1000).table()
    assert float(cosine.alphas_cumprod[-1]) < 1e-4 and float(cosine.alphas_cumprod[500]) == pytest.approx(
        math.cos((0.5 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2)


def test_closed_form_marginal_matches_iterating_the_forward_chain():
    model = GaussianDiffusion(2, schedule=SHORT)
    n = 20_000
    x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64).expand(n, 2)
    tr = poutine.trace(model.guide).get_trace(x0)
    for t in (1, 4, 10):
        draws = tr.nodes[f"x_{t}"]["value"]
        sqrt_abar, var = model.guide.marginal(t, torch.float64)
        mean_se = math.sqrt(float(var) / n)
        assert (draws.mean(0) - sqrt_abar * x0[0]).abs().max() < 4 * mean_se
        assert (draws.var(0) - var).abs().max() < 4 * float(var) * math.sqrt(2 / (n - 1))


def test_posterior_matches_bayes_rule_on_a_grid():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_{t-1} | x_0) q(x_t | x_{t-1}), by quadrature."""
    forward = GaussianDiffusion(1, schedule=SHORT).guide
    tab = SHORT.table()
    x0, x_t = torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.4]], dtype=torch.float64)
    grid = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    for t in (2, 5, 10):
        prior = torch.distributions.Normal(tab.alphas_cumprod[t - 1].sqrt() * x0[0, 0],
                                           (1 - tab.alphas_cumprod[t - 1]).sqrt())
        step = torch.distributions.Normal(tab.alphas[t].sqrt() * grid, tab.betas[t].sqrt())
        density = (prior.log_prob(grid) + step.log_prob(x_t[0, 0])).exp()
        weights = density / torch.trapezoid(density, grid)
        mean = torch.trapezoid(weights * grid, grid)
        var = torch.trapezoid(weights * (grid - mean) ** 2, grid)
        steps = torch.tensor([t])
        assert float(forward.posterior_mean(x0, x_t, steps)) == pytest.approx(float(mean), rel=1e-7)
        assert float(forward.posterior_variance(t, torch.float64)) == pytest.approx(float(var), rel=1e-6)


# ----- the estimators --------------------------------------------------------------------------
def test_kl_term_is_the_weighted_noise_error_of_the_paper():
    """Q_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2 (paper section 6)."""
    torch.manual_seed(0)
    for reverse_variance in ("beta", "posterior"):
        model = GaussianDiffusion(3, schedule=SHORT, hidden=(8,), reverse_variance=reverse_variance).double()
        x0, eps = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
        t = torch.randint(1, 11, (40,))
        tab = SHORT.table()
        x_t = model.q_sample(x0, t, eps)
        weight = tab.betas[t] ** 2 / (2 * model.reverse_variance(t, torch.float64) * tab.alphas[t]
                                      * (1 - tab.alphas_cumprod[t]))
        expected = weight * (eps - model.predict_noise(x_t, t)).square().sum(-1)
        torch.testing.assert_close(quadratic_terms(model, model.guide, x0, t, eps), expected)
    constants = step_constants(model, model.guide, 3)
    assert constants[0] == pytest.approx(1.5 * math.log(2 * math.pi * 0.05))  # c_1: the decoder's


def test_time_subsampled_estimator_is_unbiased_for_the_full_chain_elbo():
    """T = 10, fixed denoisers (optimal linear and a 50% too small one): the estimators agree with
    Pyro's Trace_ELBO on the same pair within 4 standard errors; importance sampling over t lowers
    the variance of the uniform draw of t.

    The variance of one draw of the *value* is not compared with Trace_ELBO's, because it is
    higher: along one path Trace_ELBO's log-ratios nearly cancel, while T Q_t keeps the spread of
    Q_t over x_t times T. Measured on these 30 points (Trace_ELBO, uniform, importance): 4.2, 406,
    293 at the optimal denoiser, 20, 469, 387 at the poor one; drawing t stratified over the batch
    (Kingma et al. 2021's low-discrepancy sampler) leaves them at 418 and 501, so the spread is
    within each t, not between the t. What the subsampled estimator gains is in the gradient at
    equal cost: the next test."""
    x = 1 + 2 * torch.randn(30, 1, dtype=torch.float64)
    for scale in (1.0, 0.5):
        model = linear_model(scale=scale)
        full_chain = Trace_ELBO(num_particles=100, vectorize_particles=True)
        trace, trace_se, _ = batch_means(full_chain, model, x, 20)
        uniform, uniform_se, _ = batch_means(TimeSubsampledELBO(num_particles=200), model, x, 20)
        assert abs(uniform - trace) < 4 * math.hypot(uniform_se, trace_se)
        importance = TimeSubsampledELBO(time_sampling="importance")
        for _ in range(300):  # training steps (with gradients) teach it the law of t
            importance.loss_and_grads(model.model, model.guide, x)
        _, _, var_importance = batch_means(importance, model, x, 400)
        mean_i, se_i, _ = batch_means(importance, model, x, 400)
        _, _, var_uniform = batch_means(TimeSubsampledELBO(), model, x, 400)
        assert abs(mean_i - trace) < 4 * math.hypot(se_i, trace_se)
        assert var_importance < var_uniform


@pytest.mark.slow
def test_time_subsampled_gradient_is_less_noisy_than_the_full_chain_at_equal_cost():
    """At an equal number of denoiser calls (T draws of t against one path of T steps) the gradient
    of the time-subsampled estimator varies less than Trace_ELBO's: log q has no theta, so nothing
    cancels the noise of the drawn x_{t-1} in Trace_ELBO's gradient, whereas the closed-form KL
    integrates x_{t-1} out. Measured total variances (Trace_ELBO, T uniform draws): 43.3 and 17.7 at
    the optimal linear denoiser, 983 and 595 for the untrained MLP on 30 moons points (ratios 2.4
    and 1.7); 17.7 and 15.0 at the 50% too small denoiser (not asserted: too close for 400 draws).
    Evaluating every t once per draw (time_sampling="all") gives 16 at the optimal denoiser.
    Margin: a sample variance of n draws has relative s.e. sqrt(2 / (n - 1)) (normal draws), so
    the log of the ratio of two has s.e. 0.1 at n = 400; asserted with 3 of them."""
    torch.manual_seed(0)
    x = 1 + 2 * torch.randn(30, 1, dtype=torch.float64)
    mlp = GaussianDiffusion(2, schedule=SHORT, hidden=(32, 32)).double()
    draws = 400
    margin = math.exp(3 * 2 / math.sqrt(draws - 1))
    for model, data in ((linear_model(scale=1.0), x), (mlp, load_moons("train")[:30].double())):
        pyro.set_rng_seed(0)
        variances = [sum(float(m.variance.sum()) for m in gradient_variance(
            model.model, data, model.guide, loss, num_draws=draws).values())
            for loss in (Trace_ELBO(), TimeSubsampledELBO(num_particles=SHORT.num_steps))]
        assert variances[1] * margin < variances[0]


def test_measuring_gradient_variance_leaves_the_learned_law_of_t_alone():
    x = 1 + 2 * torch.randn(30, 1, dtype=torch.float64)
    model = linear_model(scale=0.5)
    importance = TimeSubsampledELBO(time_sampling="importance")
    for _ in range(50):
        importance.loss_and_grads(model.model, model.guide, x)
    law = importance.proposal(model.num_steps)
    gradient_variance(model.model, x, model.guide, importance, num_draws=20)
    assert torch.equal(importance.proposal(model.num_steps), law)
    importance.loss_and_grads(model.model, model.guide, x)  # training draws still teach it
    assert not torch.equal(importance.proposal(model.num_steps), law)


def test_bound_is_below_the_exact_log_likelihood_of_a_linear_gaussian_chain():
    """1-D data, linear denoisers: the model's marginal is Gaussian (exact log-likelihood), and its
    ELBO has a closed form from the forward chain's moments; the full-sum estimate matches it and
    lies below the log-likelihood, for both reverse variances and a good and a poor denoiser."""
    x = 1 + 2 * torch.randn(200, 1, dtype=torch.float64)
    for reverse_variance in ("beta", "posterior"):
        for scale in (1.0, 0.5):
            model = linear_model(scale=scale, reverse_variance=reverse_variance)
            mean, var = exact_marginal(model)
            loglik = float(torch.distributions.Normal(mean, var.sqrt()).log_prob(x).sum())
            exact_elbo = float(closed_form_elbo(model, x).sum())
            bound = diffusion_bound(model, x, num_particles=20, seed=0)
            estimate = -bound.nats_per_dim * len(x)
            se = bound.standard_error * len(x)
            assert abs(estimate - exact_elbo) < 4 * se + 1e-6
            assert exact_elbo <= loglik
            assert bound.bits_per_dim == pytest.approx(bound.nats_per_dim / math.log(2))


def test_noise_prediction_loss_is_the_mean_squared_noise_error():
    model = linear_model()
    x = torch.randn(500, 1, dtype=torch.float64)
    pyro.set_rng_seed(3)
    loss = NoisePredictionLoss().loss(model.model, model.guide, x)
    pyro.set_rng_seed(3)
    t = torch.randint(1, 11, (500,))
    eps = torch.randn_like(x)
    expected = (eps - model.predict_noise(model.q_sample(x, t, eps), t)).square().sum()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-12)


@pytest.mark.parametrize("loss, options", [("time_subsampled", {}), ("simple", {}),
                                           ("time_subsampled", {"time_sampling": "importance"}),
                                           ("trace", {})])
def test_every_estimator_fits_the_pair(loss, options):
    x = load_moons()[:256]
    torch.manual_seed(0)
    model = GaussianDiffusion(2, 10, schedule=SHORT, hidden=(32, 32))
    before = [p.detach().clone() for p in model.denoiser.parameters()]
    result = freqvi.fit(model, x, loss=loss, lr=1e-2, num_steps=40, batch_size=64, progress=False,
                        seed=0, **options)
    assert len(result.elbo) == 40 and all(math.isfinite(v) for v in result.elbo)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.denoiser.parameters(), strict=True))
    if loss != "simple":
        assert sum(result.elbo[-10:]) > sum(result.elbo[:10])


@pytest.mark.parametrize("particles", [1, 3])
def test_fit_runs_the_whole_chain_once_before_its_first_step(monkeypatch, particles):
    model = GaussianDiffusion(2, 10, schedule=SHORT, hidden=(8,))
    calls = []
    forward = model.denoiser.forward
    monkeypatch.setattr(model.denoiser, "forward", lambda x_t, t: calls.append(len(x_t)) or forward(x_t, t))
    freqvi.fit(model, torch.randn(16, 2), loss="time_subsampled", num_particles=particles, num_steps=1,
               progress=False)
    assert calls == [16] * 10 + [16 * particles]  # the check of the pair (T = 10 steps), then one step


def test_the_pair_is_checked_once_however_often_its_model_method_is_read(monkeypatch):
    checked = []
    check = freqvi.estimators.diffusion.diffusion_pair
    monkeypatch.setattr(freqvi.estimators.diffusion, "diffusion_pair",
                        lambda model, guide: checked.append(model) or check(model, guide))
    model, elbo = GaussianDiffusion(2, 10, schedule=SHORT, hidden=(8,)), TimeSubsampledELBO()
    for _ in range(3):
        elbo.loss(model.model, model.guide, torch.randn(8, 2))  # a new bound method at each read
    assert len(checked) == 1


def test_plain_svi_finds_the_denoisers_parameters():
    model = GaussianDiffusion(2, 10, schedule=SHORT, hidden=(8,))
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), TimeSubsampledELBO())
    before = model.denoiser.net[0].weight.detach().clone()
    assert math.isfinite(svi.step(torch.randn(16, 2)))
    assert not torch.equal(before, model.denoiser.net[0].weight)
    assert {"time_subsampled", "simple"} <= set(ESTIMATORS)


# ----- sampling --------------------------------------------------------------------------------
def test_ancestral_samples_have_the_exact_marginal():
    model = linear_model()
    mean, var = exact_marginal(model)
    n = 20_000
    draws = model.sample(n, seed=0)
    assert draws.shape == (n, 1)
    assert abs(float(draws.mean()) - float(mean)) < 4 * math.sqrt(float(var) / n)
    assert abs(float(draws.var()) - float(var)) < 4 * float(var) * math.sqrt(2 / (n - 1))


def test_sampling_shapes_and_seeds():
    model = GaussianDiffusion(3, 20, hidden=(8,))
    first = model.sample(5, seed=1)
    assert first.shape == (5, 3) and torch.equal(first, model.sample(5, seed=1))
    assert not torch.equal(first, model.sample(5, seed=2))
    ddim = model.sample(4, method="ddim", num_steps=5, seed=1)
    assert ddim.shape == (4, 3) and torch.equal(ddim, model.sample(4, method="ddim", num_steps=5, seed=1))
    state = torch.random.get_rng_state()
    model.sample(2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # a seed leaves the global generator alone
    with pytest.raises(FreqviInputError, match="at most T = 20"):
        model.sample(2, method="ddim", num_steps=21)
    with pytest.raises(FreqviInputError, match="ancestral sampling runs all T = 20"):
        model.sample(2, num_steps=5)
    noisy = model.q_sample(torch.zeros(6, 3), 20)
    assert noisy.shape == (6, 3) and torch.equal(model.q_sample(torch.ones(2, 3), 0), torch.ones(2, 3))


# ----- data, metrics, pictures ----------------------------------------------------------------
def test_toy_data_are_fixed_standardised_and_split():
    for load in (load_moons, load_swiss_roll):
        train, test = load("train"), load("test", dtype=torch.float64)
        assert train.shape == test.shape == (2000, 2) and test.dtype == torch.float64
        torch.testing.assert_close(train.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(train.std(0, correction=0), torch.ones(2), atol=1e-5, rtol=0)
        assert torch.equal(load("train"), train) and len(load("all")) == 4000


def test_energy_distance_separates_laws_beyond_its_noise_floor():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 2, generator=gen), torch.randn(500, 2, generator=gen)
    assert energy_distance(a, a) == pytest.approx(0, abs=1e-12)
    floor = energy_distance(a, b)
    assert 0 < floor < 0.05 and energy_distance(a, b + 0.5) > 4 * floor


def test_pictures_are_written(tmp_path):
    model = GaussianDiffusion(2, 20, hidden=(8,))
    x = load_moons("test")[:200]
    images = GaussianDiffusion(64, 20, hidden=(8,))
    paths = [plots.forward_noising(model, x, tmp_path / "noise.png"),
             plots.samples_vs_data(model.sample(200, seed=0), x, tmp_path / "scatter.png"),
             plots.forward_noising(images, torch.rand(6, 64) * 2 - 1, tmp_path / "noise_images.png")]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- bad input -------------------------------------------------------------------------------
class WrongShape(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 3)

    def forward(self, x, t):
        return self.linear(x)


@pytest.mark.parametrize("build, message", [
    (lambda: GaussianDiffusion(2, num_steps=0), "num_steps must be an integer >= 1"),
    (lambda: NoiseSchedule([0.1, 1.0]), "beta_2 = 1"),
    (lambda: NoiseSchedule([0.0, 0.2]), "beta_1 = 0"),
    (lambda: NoiseSchedule([0.1, float("nan")]), "non-finite"),
    (lambda: NoiseSchedule([]), "T >= 1"),
    (lambda: GaussianDiffusion(2, denoiser=WrongShape()), "eps of its input's shape (2, 2); got (2, 3)"),
    (lambda: GaussianDiffusion(2, denoiser=TimeMLP(3)), "the denoiser fails"),
    (lambda: GaussianDiffusion(2, 5, schedule=SHORT), "disagrees with the schedule's T = 10"),
    (lambda: GaussianDiffusion(2, reverse_variance="learned"), "reverse_variance must be one of"),
], ids=["T0", "beta1", "beta0", "beta-nan", "empty", "denoiser-shape", "denoiser-fails", "T-mismatch",
        "variance"])
def test_bad_settings_are_refused(build, message):
    with pytest.raises(FreqviInputError, match=re.escape(message)):
        build()


@pytest.mark.parametrize("loss", ["time_subsampled", "simple", "trace"])
def test_bad_data_is_refused_before_training(loss):
    model = GaussianDiffusion(2, 10, schedule=SHORT, hidden=(8,))
    before = model.denoiser.net[0].weight.detach().clone()
    for x, message in ((torch.full((5, 2), float("nan")), "non-finite"), (torch.ones(5, 3), "shape")):
        with pytest.raises(FreqviInputError, match=message):
            freqvi.fit(model, x, loss=loss, num_steps=2, progress=False)
    assert torch.equal(before, model.denoiser.net[0].weight)
    with pytest.raises(FreqviInputError, match="non-finite"):  # also the estimators themselves
        TimeSubsampledELBO().loss(model.model, model.guide, torch.full((4, 2), float("nan")))


def test_diffusion_estimators_refuse_other_pairs():
    vae = VAE(4, 2, hidden=(8,))
    with pytest.raises(FreqviInputError, match="need a diffusion model"):
        freqvi.fit(vae, torch.rand(10, 4), loss="time_subsampled", num_steps=1, progress=False)
    model = GaussianDiffusion(2, 10, schedule=SHORT, hidden=(8,))
    with pytest.raises(FreqviInputError, match="forward noising chain as the guide"):
        TimeSubsampledELBO().loss(model.model, vae.guide, torch.randn(4, 2))
