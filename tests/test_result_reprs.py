"""Results print short, like scikit-learn's estimators: what ran, the final objective with its unit
and spread, why it stopped; the full arrays stay attributes."""

import pyro
import pyro.distributions as dist
import torch

import freqvi
from freqvi.models import GaussianMixture


def random_effects(x):
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x[i])


def exact_guide(x):
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("data", len(x)) as i:
        pyro.sample("z", dist.Normal((x[i] + mu) / 2, 0.5**0.5))


def test_fit_result_prints_a_few_lines_with_the_mean_of_the_last_steps():
    x = torch.randn(500, dtype=torch.float64)
    result = freqvi.fit(random_effects, x, exact_guide, num_steps=300, lr=0.05, progress=False, seed=0)
    text = repr(result)
    assert len(text.splitlines()) <= 4 and len(text) < 400
    tail = torch.tensor(result.elbo[-100:])
    assert f"{float(tail.mean()):.6g}" in text and "nats" in text and "Trace_ELBO" in text
    assert len(result.elbo) == 300  # the history is still there


def test_em_result_and_log_likelihood_print_one_or_two_lines():
    x = freqvi.datasets.load_iris().double()
    gm = GaussianMixture(2, 4)
    result = freqvi.em(gm, x, seed=0, progress=False)
    text = repr(result)
    assert len(text.splitlines()) == 2 and f"{result.log_likelihood[-1]:.6g}" in text
    assert "converged" in text and str(result.num_iter) in text
    ll = freqvi.log_likelihood(gm, x)
    assert len(repr(ll).splitlines()) == 1 and f"{ll.total:.4f}" in repr(ll)
    mle = freqvi.maximize_likelihood(gm, x)
    assert len(repr(mle).splitlines()) == 1 and f"{mle.log_likelihood:.6g}" in repr(mle)
