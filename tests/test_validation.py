"""Bad input raises a clear FreqviInputError before any fitting starts."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from simulate import mixture_data

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.models import FactorAnalysis, GaussianMixture


def with_value(x, value):
    x = x.clone()
    x[3, 1] = value
    return x


DRIVERS = {
    "em": lambda m, x: freqvi.em(m, x, progress=False),
    "fit": lambda m, x: freqvi.fit(m.model, x, m.guide, num_steps=2, progress=False),
    "log_likelihood": lambda m, x: freqvi.log_likelihood(m, x),
}

BAD_DATA = {
    "nan": (with_value(mixture_data(n=50), float("nan")), r"non-finite.*NaN at index \(3, 1\)"),
    "inf": (with_value(mixture_data(n=50), float("inf")), r"non-finite.*infinite"),
    "wrong dimension": (torch.randn(50, 3), r"shape \(n_observations, 2\); got \(50, 3\)"),
    "one-dimensional": (torch.randn(50), r"shape \(n_observations, 2\); got \(50,\)"),
    "too few rows": (torch.randn(2, 2), "at least that many observations; got 2"),
    "no rows": (torch.randn(0, 2), "no observations"),
    "strings": (["a", "b"], "real numbers|array of numbers"),
}


@pytest.mark.parametrize("driver", sorted(DRIVERS))
@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_refused_before_fitting(driver, case):
    x, message = BAD_DATA[case]
    model = GaussianMixture(3, 2)
    with pytest.raises(FreqviInputError, match=message):
        DRIVERS[driver](model, x)
    assert not model.initialized  # nothing ran: no parameters were created


@pytest.mark.parametrize(("make", "message"), [
    (lambda: GaussianMixture(0, 2), "n_components must be an integer >= 1; got 0"),
    (lambda: GaussianMixture(2, -1), "dim must be an integer >= 1; got -1"),
    (lambda: GaussianMixture(2.5, 2), "n_components must be an integer"),
    (lambda: GaussianMixture(2, 2, covariance="tied"), "covariance must be one of"),
    (lambda: GaussianMixture(2, 2, reg_covar=-1.0), "reg_covar must be a finite number >= 0"),
    (lambda: GaussianMixture(2, 2, init={"weights": [1.0, 0.0]}), "exactly the keys"),
    (lambda: GaussianMixture(2, 1, init={"weights": [0.5, 0.5], "locs": [[0.0], [1.0]],
                                         "covariances": [[[1.0]], [[-1.0]]]}), "positive definite"),
    (lambda: FactorAnalysis(3, 4), "latent_dim must be <= dim = 3; got 4"),
    (lambda: FactorAnalysis(3, 0), "latent_dim must be an integer >= 1; got 0"),
    (lambda: FactorAnalysis(3, 1, noise="full"), "noise must be one of"),
])
def test_bad_model_options(make, message):
    with pytest.raises(FreqviInputError, match=message):
        make()


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x: freqvi.em(m, x, max_iter=0), "max_iter must be an integer >= 1; got 0"),
    (lambda m, x: freqvi.em(m, x, m_step="newton"), "m_step must be one of"),
    (lambda m, x: freqvi.em(m, x, batch_size=0), "batch_size must be an integer >= 1"),
    (lambda m, x: freqvi.em(m, x, batch_size=51), "batch_size must be between 1 and n = 50"),
    (lambda m, x: freqvi.fit(m.model, x, m.guide, batch_size=100), "between 1 and n = 50"),
    (lambda m, x: freqvi.fit(m.model, x, m.guide, num_steps=-5), "num_steps must be"),
    (lambda m, x: freqvi.fit(m.model, x, m.guide, lr=0.0), "lr must be a finite number > 0"),
    (lambda m, x: freqvi.fit(m.model, x, m.guide, optim="lbfgs"), "unknown optimiser"),
    (lambda m, x: freqvi.log_likelihood(m, x, num_samples=0), "num_samples must be"),
    (lambda m, x: freqvi.log_likelihood(m.model, x, m.guide, method="laplace"), "method must be"),
])
def test_bad_driver_options(call, message):
    model = GaussianMixture(3, 2)
    with pytest.raises(FreqviInputError, match=message):
        call(model, mixture_data(n=50))


def test_guide_whose_sites_do_not_match_the_model():
    model = GaussianMixture(3, 2)

    def wrong_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("cluster", dist.Categorical(logits=torch.zeros(len(x), 3)))

    with pytest.raises(FreqviInputError, match=r"guide samples \['cluster'\].*not have"):
        freqvi.em(model, mixture_data(n=50), guide=wrong_guide, progress=False)


def test_guide_missing_a_latent_site():
    fa = FactorAnalysis(2, 1)
    with pytest.raises(FreqviInputError, match=r"latent sites \['factors'\] have no site in the guide"):
        freqvi.fit(fa.model, mixture_data(n=50), lambda x: None, num_steps=2, progress=False)


def test_model_without_a_data_plate_cannot_be_minibatched():
    def model(x):
        loc = pyro.param("loc", torch.zeros(2, dtype=x.dtype))
        pyro.sample("x", dist.Normal(loc.expand(x.shape), 1.0).to_event(2), obs=x)

    with pytest.raises(FreqviInputError, match="no vectorised plate called 'data'"):
        freqvi.fit(model, mixture_data(n=50), lambda x: None, batch_size=10, progress=False)


def test_closed_form_m_step_needs_a_model_that_offers_it():
    def model(x):
        loc = pyro.param("loc", torch.zeros(2, dtype=x.dtype))
        with pyro.plate("data", len(x)) as i:
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x[i])

    with pytest.raises(FreqviInputError, match="m_step='closed_form' needs a model"):
        freqvi.em(model, mixture_data(n=50), guide=lambda x: None, m_step="closed_form")


def test_unconstrained_params_keep_the_order_of_the_names_they_are_given():
    """fit and em sort names without instance numbers (checkpoints survive a rebuilt model) and
    zip them with these tensors: re-sorting by the raw names here paired names with other tensors."""
    import pyro

    from freqvi.traces import unconstrained_params

    pyro.param("Net_0.scale", torch.ones(3))
    pyro.param("NetGuide_0.loc", torch.zeros(10, 3))
    names = ["Net_0.scale", "NetGuide_0.loc"]  # the order of stable names; raw sorting swaps them
    assert [t.shape for t in unconstrained_params(names)] == [(3,), (10, 3)]
    assert [t.shape for t in unconstrained_params(set(names))] == [(10, 3), (3,)]


def test_every_driver_refuses_the_old_model_guide_data_order_with_a_message_that_says_so():
    import pyro
    import pyro.distributions as dist

    import freqvi
    from freqvi.errors import FreqviInputError

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)) as i:
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x[i])

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x, 0.5**0.5))

    x = torch.randn(20)
    calls = [lambda: freqvi.fit(model, guide, x, num_steps=2, progress=False),
             lambda: freqvi.log_likelihood(model, guide, x),
             lambda: freqvi.em(model, guide, x, progress=False),
             lambda: freqvi.observed_information(model, guide, x),
             lambda: freqvi.elbo_terms(model, guide, x),
             lambda: freqvi.gradient_variance(model, guide, x)]
    for call in calls:
        with pytest.raises(FreqviInputError, match=r"\(model, data, guide=None\)"):
            call()
    assert "loc" not in pyro.get_param_store()  # refused before any work
