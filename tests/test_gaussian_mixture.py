"""Gaussian mixture: the exact E-step, EM's ascent, Fisher's identity, scikit-learn as reference."""

import importlib

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from simulate import mixture_data
from sklearn.mixture import GaussianMixture as SkGaussianMixture

import freqvi
from freqvi.estimators import QFunctionELBO
from freqvi.models import GaussianMixture

INIT = {
    "weights": [0.4, 0.3, 0.3],
    "locs": [[0.5, 0.5], [3.0, 0.0], [0.0, 4.0]],
    "covariances": [np.eye(2), np.eye(2), np.eye(2)],
}


def poor_start(covariance):
    """INIT in the shapes of ``covariance``: unit covariances, far from the optimum."""
    cov = {"full": INIT["covariances"], "diag": np.ones((3, 2)), "spherical": np.ones(3)}[covariance]
    return {**INIT, "covariances": cov}


def scipy_log_likelihood(x, weights, locs, covariances):
    """Independent float64 reference: sum_i log sum_k w_k N(x_i; mu_k, Sigma_k)."""
    x = np.asarray(x, dtype=np.float64)
    comps = [np.log(w) + multivariate_normal(m, c).logpdf(x) for w, m, c in
             zip(np.asarray(weights), np.asarray(locs), np.asarray(covariances), strict=True)]
    return logsumexp(np.stack(comps, -1), axis=-1)


def test_exact_guide_elbo_equals_log_likelihood():
    x = mixture_data()
    gm = GaussianMixture(3, 2, init=INIT)
    elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(gm.model, gm.guide, x)
    with pytest.warns(UserWarning, match="enumerate"):  # Trace_ELBO draws instead of enumerating
        single_draw = -pyro.infer.Trace_ELBO().loss(gm.model, gm.guide, x)
    reference = scipy_log_likelihood(x, **INIT).sum()
    assert elbo == pytest.approx(reference, rel=1e-5)
    assert single_draw == pytest.approx(reference, rel=1e-5)  # log p(x,z) - log p(z|x) = log p(x) for any z


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_log_marginal_and_exact_guide_normaliser_match_scipy(covariance):
    x = mixture_data().double() + 100.0  # far from the origin: the whitening must stay accurate
    cov = {"full": [[[2.0, 0.6], [0.6, 0.5]], [[1.0, -0.3], [-0.3, 1.5]], np.eye(2)],
           "diag": [[2.0, 0.5], [1.0, 1.5], [0.3, 0.7]], "spherical": [2.0, 0.5, 1.0]}[covariance]
    init = {**INIT, "locs": np.asarray(INIT["locs"]) + 100.0, "covariances": cov}
    gm = GaussianMixture(3, 2, covariance, init=init)
    full = np.asarray(cov) if covariance == "full" else [np.diag(np.broadcast_to(c, 2)) for c in cov]
    reference = scipy_log_likelihood(x, init["weights"], init["locs"], full)
    np.testing.assert_allclose(gm.log_marginal(x).detach(), reference, rtol=1e-12)
    with torch.no_grad():
        evidence = poutine.trace(gm.guide).get_trace(x).nodes["_RETURN"]["value"]
    np.testing.assert_allclose(evidence, reference, rtol=1e-12)


IGNORE_MAX_ITER = pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")


@IGNORE_MAX_ITER
@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
@pytest.mark.parametrize("m_step", ["closed_form", "gradient"])
def test_em_ascent_property(covariance, m_step):
    x = mixture_data(n=300)
    gm = GaussianMixture(3, 2, covariance, init=poor_start(covariance))
    iters = 40 if m_step == "closed_form" else 6
    result = freqvi.em(gm, x, m_step=m_step, max_iter=iters, tol=0.0, progress=False, seed=0)
    path = np.array(result.log_likelihood)
    assert len(path) == iters + 1 or result.converged
    assert np.all(np.diff(path) >= -1e-9 * np.abs(path[1:])), np.diff(path).min()
    assert path[-1] > path[0] + 1.0  # it actually moved
    final = freqvi.log_likelihood(gm, x).total
    assert path[-1] == pytest.approx(final, rel=1e-8)


def test_fisher_identity():
    """grad_theta Q(theta | theta') at theta = theta' equals grad_theta log-likelihood."""
    x = mixture_data(n=200)
    gm = GaussianMixture(3, 2, init=INIT)
    gm.model(x)
    names = ["weights", "locs", "scale_tril"]
    params = [getattr(gm, f"{n}_unconstrained") for n in names]
    q_loss = QFunctionELBO(max_plate_nesting=1).differentiable_loss(gm.model, gm.guide, x)
    grads_q = torch.autograd.grad(-q_loss, params)
    loglik = gm.log_marginal(x).sum()
    grads_l = torch.autograd.grad(loglik, params)
    for n, gq, gl in zip(names, grads_q, grads_l, strict=True):
        assert torch.allclose(gq, gl, rtol=1e-8, atol=1e-9), n
    assert max(g.abs().max() for g in grads_l) > 1.0  # not at a stationary point


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_em_matches_scikit_learn_from_same_start(covariance):
    x = mixture_data()
    start = GaussianMixture(3, 2, covariance)
    start.model(x)  # k-means++ initialisation
    init = {k: v.numpy() for k, v in start.estimates().items()}
    gm = GaussianMixture(3, 2, covariance, init=init)
    freqvi.em(gm, x, tol=1e-10, max_iter=3000, progress=False)
    precisions = np.linalg.inv(init["covariances"]) if covariance == "full" else 1 / init["covariances"]
    sk = SkGaussianMixture(3, covariance_type=covariance, weights_init=init["weights"],
                           means_init=init["locs"], precisions_init=precisions,
                           tol=1e-12, max_iter=3000).fit(x.numpy())
    est = gm.estimates()
    n = x.shape[0]
    ours = freqvi.log_likelihood(gm, x).total / n
    assert ours == pytest.approx(sk.score(x.numpy()), abs=1e-4)
    np.testing.assert_allclose(est["weights"], sk.weights_, atol=1e-3)
    np.testing.assert_allclose(est["locs"], sk.means_, atol=1e-3)
    np.testing.assert_allclose(est["covariances"], sk.covariances_, atol=1e-3)


def test_mean_field_guide_is_a_bound_that_tightens():
    x = mixture_data(n=200)
    gm = GaussianMixture(3, 2, init=INIT)
    exact = freqvi.log_likelihood(gm, x).total
    guide = gm.mean_field_guide()
    frozen_model = poutine.block(gm.model, hide_types=["param"])  # theta fixed: a pure E-step
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    before = -elbo.loss(frozen_model, guide, x)
    result = freqvi.fit(frozen_model, x, guide, loss=elbo, lr=0.5, num_steps=400, progress=False)
    after = -elbo.loss(frozen_model, guide, x)
    assert before <= exact and max(result.elbo) <= exact + 1e-9 * abs(exact)
    assert after > before
    assert exact - after < 0.01 * (exact - before)
    assert after == pytest.approx(exact, abs=0.5)


@IGNORE_MAX_ITER
def test_variational_em_with_mean_field_guide():
    x = mixture_data(n=300)
    gm = GaussianMixture(3, 2, init=INIT)
    result = freqvi.em(gm, x, guide=gm.mean_field_guide(), max_iter=10, tol=0.0, progress=False)
    assert result.m_step == "closed_form"
    exact = freqvi.log_likelihood(gm, x).total
    assert result.log_likelihood[-1] <= exact + 1e-6 * abs(exact)
    assert result.log_likelihood[-1] > result.log_likelihood[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precision_follows_the_data(dtype):
    x = mixture_data(n=300, dtype=dtype)
    gm = GaussianMixture(3, 2, init=INIT)
    result = freqvi.em(gm, x, max_iter=200, progress=False)
    assert all(v.dtype == dtype for v in gm.estimates().values())
    reference = scipy_log_likelihood(x.double(), **{k: v.double() for k, v in gm.estimates().items()})
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    assert result.log_likelihood[-1] == pytest.approx(reference.sum(), rel=rel)


@IGNORE_MAX_ITER
def test_online_em_reaches_the_batch_optimum():
    x = mixture_data(n=2000)
    batch = GaussianMixture(3, 2, init=INIT)
    freqvi.em(batch, x, tol=1e-10, max_iter=500, progress=False)
    online = GaussianMixture(3, 2, init=INIT)
    result = freqvi.em(online, x, batch_size=200, max_iter=30, tol=0.0, progress=False, seed=0)
    n = x.shape[0]
    best = freqvi.log_likelihood(batch, x).total / n
    reached = freqvi.log_likelihood(online, x).total / n
    assert result.num_iter == 30
    assert best - 2e-3 < reached <= best + 1e-9


@IGNORE_MAX_ITER
@pytest.mark.parametrize("k", [1, 3])
def test_the_default_start_leaves_the_data_untouched(k):
    x = mixture_data(n=50)
    before = x.clone()
    freqvi.em(GaussianMixture(k, 2), x, max_iter=2, progress=False)
    assert torch.equal(x, before)


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_closed_form_e_step_is_the_exact_guide_s(covariance, dtype):
    """posterior_statistics (em's E-step without a Pyro trace) gives what the guide's trace gives."""
    x = mixture_data(n=200, dtype=dtype)
    gm = GaussianMixture(3, 2, covariance)
    gm.model(x)
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(gm.guide).get_trace(x)
        statistics, log_evidence = gm.posterior_statistics(x)
    rtol = 10 * torch.finfo(dtype).eps
    torch.testing.assert_close(log_evidence, trace.nodes["_RETURN"]["value"], rtol=rtol, atol=0)
    # the normaliser is the log-likelihood, checked against SciPy in float64 elsewhere; here, log-sum-exp
    np.testing.assert_allclose(log_evidence.double().numpy(),
                               logsumexp(gm.log_joint(x).detach().double().numpy(), axis=-1), rtol=1e-6)
    for name, value in gm.expected_statistics(trace, x).items():
        torch.testing.assert_close(statistics[name], value, rtol=100 * torch.finfo(dtype).eps,
                                   atol=100 * torch.finfo(dtype).eps, msg=name)


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical"])
def test_responsibilities_where_most_joint_densities_underflow_float32(covariance):
    """Components 40 standard deviations apart: most log-joint gaps are below float32's exp range, where the
    E-step's softmax must still give the float64 responsibilities and normaliser to float32 accuracy."""
    noise = torch.randn(3, 300, 2, generator=torch.Generator().manual_seed(1))
    x = (noise + 40.0 * torch.arange(3.0).reshape(3, 1, 1)).reshape(-1, 2)
    identity = {"full": np.stack([np.eye(2)] * 3), "diag": np.ones((3, 2)), "spherical": np.ones(3)}
    init = {"weights": [0.2, 0.3, 0.5], "locs": [[0.0, 0.0], [40.0, 40.0], [80.0, 80.0]],
            "covariances": identity[covariance]}  # each component N(mu_k, I), however parametrised
    gm = GaussianMixture(3, 2, covariance, init=init)
    gm.model(x)
    with torch.no_grad():
        responsibilities, log_evidence = gm._responsibilities(x)
    log_joint = np.log(init["weights"]) + np.stack(
        [multivariate_normal(loc, np.eye(2)).logpdf(x.double().numpy()) for loc in init["locs"]], axis=-1)
    assert (log_joint - log_joint.max(-1, keepdims=True) < np.log(np.finfo(np.float32).tiny)).mean() > 0.5
    reference = logsumexp(log_joint, axis=-1)
    np.testing.assert_allclose(log_evidence.double().numpy(), reference, rtol=1e-6)
    np.testing.assert_allclose(responsibilities.double().numpy(), np.exp(log_joint - reference[:, None]),
                               atol=1e-6, rtol=0)


def test_an_observation_no_component_can_hold_is_refused_before_any_step():
    """log p = -inf for the row (not NaN); em refuses at the start, parameters as they were, and names
    the entry whose square overflows float32."""
    x = torch.tensor([[1e30, 0.0], [0.0, 0.0], [1.0, 0.5]])
    gm = GaussianMixture(2, 2, init={"weights": [0.5, 0.5], "locs": [[0.0, 0.0], [1.0, 1.0]],
                                     "covariances": np.stack([np.eye(2)] * 2)})
    gm.model(x[1:])
    before = {name: p.detach().clone() for name, p in gm.named_parameters()}
    with torch.no_grad():
        evidence = gm.posterior_statistics(x)[1]  # em's E-step
    assert evidence[0] == -np.inf and torch.isfinite(evidence[1:]).all()
    assert gm.log_marginal(x)[0] == -np.inf
    with pytest.raises(freqvi.errors.FreqviInputError, match=r"starting parameters is -inf.*1e\+30.*float64"):
        freqvi.em(gm, x, progress=False)
    assert all(torch.equal(before[name], p) for name, p in gm.named_parameters())


def test_em_takes_the_same_path_with_and_without_the_closed_form_e_step(monkeypatch):
    """The E-step without a trace changes the cost of an iteration, not the iterates."""
    x = mixture_data(n=300)

    def path():
        gm = GaussianMixture(3, 2, init=init)
        result = freqvi.em(gm, x, tol=1e-8, progress=False)
        return result.log_likelihood, gm.estimates()

    start = GaussianMixture(3, 2)
    start.model(x)
    init = {k: v.numpy() for k, v in start.estimates().items()}
    calls = []
    closed_form = GaussianMixture.posterior_statistics
    monkeypatch.setattr(GaussianMixture, "posterior_statistics",
                        lambda *args: calls.append(1) or closed_form(*args))
    fast, fast_estimates = path()
    assert len(calls) == len(fast)  # one closed-form E-step per recorded objective, no trace
    em_module = importlib.import_module("freqvi.infer.em")  # the package exports the function under this name
    monkeypatch.setattr(em_module, "ClosedFormEStep", type("NoModel", (), {}))  # em runs the guide's trace
    traced, traced_estimates = path()
    assert len(calls) == len(fast)  # not called again
    assert len(fast) == len(traced) > 5
    np.testing.assert_allclose(fast, traced, rtol=1e-12)
    for name, value in fast_estimates.items():
        torch.testing.assert_close(value, traced_estimates[name], rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore::freqvi.errors.ConvergenceWarning")
def test_a_resumed_run_with_the_closed_form_e_step_equals_the_uninterrupted_one(tmp_path):
    """The closed-form E-step's statistics are not in the checkpoint: a resumed run recomputes them."""
    x = mixture_data(n=300)

    def run(max_iter, **options):
        gm = GaussianMixture(3, 2)
        result = freqvi.em(gm, x, max_iter=max_iter, tol=0.0, seed=0, progress=False, **options)
        return result, gm.estimates()

    whole, whole_estimates = run(8)
    path = tmp_path / "em.ckpt"
    run(3, checkpoint=path)
    resumed, estimates = run(8, resume=path)
    assert resumed.log_likelihood == whole.log_likelihood
    for name, value in whole_estimates.items():
        assert torch.equal(estimates[name], value), name
