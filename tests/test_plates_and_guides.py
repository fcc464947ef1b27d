"""Plates and per-observation guides as Pyro users bring them (issue 14 items 7 and 10, issue 15 item 2)."""

import logging

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from scipy.stats import norm

import freqvi
from freqvi.errors import FreqviInputError
from freqvi.estimators import IWAE_ELBO, get_estimator
from freqvi.guides import LocalMeanField


def normal_model(x, plate="data"):
    """z_i ~ N(mu, 1), x_i ~ N(z_i, 1): x_i ~ N(mu, 2), the MLE of mu is mean(x)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate(plate, len(x)) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])


# ---- issue 15 item 2: a guide built for other data --------------------------------------------------
def two_data_sets():
    x100 = torch.zeros(100, dtype=torch.float64)
    x150 = torch.cat([x100, torch.full((50,), 30.0, dtype=torch.float64)])  # MLE of mu: 10.0
    return x100, x150


DRIVERS = {
    "fit": lambda guide, x: freqvi.fit(normal_model, guide=guide, data=x, num_steps=5, progress=False),
    "em": lambda guide, x: freqvi.em(normal_model, guide=guide, data=x, max_iter=2, progress=False),
    "log_likelihood": lambda guide, x: freqvi.log_likelihood(normal_model, guide=guide, data=x,
                                                             num_samples=5),
    "observed_information": lambda guide, x: freqvi.observed_information(normal_model, guide=guide, data=x,
                                                                         num_samples=5),
}


@pytest.mark.parametrize("rows", [150, 50])
@pytest.mark.parametrize("driver", sorted(DRIVERS))
def test_a_local_guide_built_for_other_data_is_refused_before_any_step(driver, rows):
    """Fitted on 100 rows, the guide's 100 factors would silently fit 100 of 150 rows (mu -> 0.010 instead
    of 10.0) or fail with a raw IndexError on 50 rows."""
    pyro.clear_param_store()
    x100, x150 = two_data_sets()
    guide = LocalMeanField(normal_model)
    freqvi.fit(normal_model, guide=guide, data=x100, num_steps=3, progress=False)
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    other = x150 if rows == 150 else x100[:50]
    with pytest.raises(FreqviInputError, match=r"built for data of shapes \[\(100,\)\].*called with data of "
                                               rf"shapes \[\({rows},\)\].*build a new guide"):
        DRIVERS[driver](guide, other)
    for name, value in pyro.get_param_store().items():  # nothing ran
        assert torch.equal(value.detach(), before[name])


def test_a_hand_written_guide_sized_for_other_data_is_refused():
    pyro.clear_param_store()
    _, x150 = two_data_sets()

    def stale_guide(x):
        loc = pyro.param("z_loc", torch.zeros(100, dtype=x.dtype))  # one per row of another data set
        with pyro.plate("data", len(loc)):
            pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.raises(FreqviInputError, match=r"plates \(model, guide\) \{'data': \(150, 100\)\}"):
        freqvi.fit(normal_model, guide=stale_guide, data=x150, num_steps=2, progress=False)


@pytest.mark.slow
def test_a_new_local_guide_on_the_new_data_reaches_the_mle():
    """The way out the message names: a new guide; variational EM then reaches mean(x) = 10.0 (the
    mean-field family holds the exact Gaussian posterior, so the variational MLE is the MLE)."""
    pyro.clear_param_store()
    _, x150 = two_data_sets()
    result = freqvi.em(normal_model, guide=LocalMeanField(normal_model), data=x150, max_iter=25,
                       progress=False, seed=0)
    assert result.converged  # em stops by itself at the stationary point (a ConvergenceWarning would fail)
    assert pyro.param("mu").item() == pytest.approx(10.0, abs=0.5)


# ---- issue 14 item 7: one spelling of the plate -----------------------------------------------------
def obs_model(x):
    normal_model(x, plate="obs")


def obs_guide(x):
    """q(z_i) = N(x_i / 2, 1); the posterior at mu = 0 is N(x_i / 2, 1/2)."""
    with pyro.plate("obs", len(x)) as i:
        pyro.sample("z", dist.Normal(x[i] / 2, 1.0))


def test_an_estimator_built_by_name_sums_over_the_drivers_plate():
    """IWAE per observation, K = 100, n = 400, at mu = 0. With u = z - x/2 ~ N(0, 1) the weight is
    w = sqrt(2) exp(-u^2/2): E w = 1, Var w = 2/sqrt(3) - 1. The bound is log p(x) minus n Var w / (2K)
    (delta method) with standard deviation sqrt(n Var w / K); the joint bound that the plate "data" gave
    here lay 43 nats below log p(x)."""
    pyro.clear_param_store()
    n, k = 400, 100
    x = torch.as_tensor(np.random.default_rng(0).normal(0.0, 2**0.5, n))
    result = freqvi.fit(obs_model, guide=obs_guide, data=x, loss="iwae", num_particles=k,
                        data_plate_name="obs", num_steps=1, progress=False, seed=0)
    var_w = 2 / 3**0.5 - 1
    bias, sd = -n * var_w / (2 * k), (n * var_w / k) ** 0.5
    exact = norm(0.0, 2**0.5).logpdf(x.numpy()).sum()
    assert abs(result.elbo[0] - (exact + bias)) < 4 * sd


def test_an_estimator_instance_on_another_plate_is_refused():
    x = torch.zeros(10)
    with pytest.raises(FreqviInputError, match="treats the plate 'data' as the observations, but the "
                                               "driver's data_plate_name is 'obs'"):
        freqvi.fit(obs_model, guide=obs_guide, data=x, loss=IWAE_ELBO(5), data_plate_name="obs",
                   num_steps=1, progress=False)
    with pytest.raises(FreqviInputError, match="the loss option data_plate of IWAE_ELBO treats the plate"):
        freqvi.fit(obs_model, guide=obs_guide, data=x, loss="iwae", data_plate="data", data_plate_name="obs",
                   num_steps=1, progress=False)
    assert get_estimator("dreg", plate_name="obs", plate_nesting=1).data_plate == "obs"


def test_the_missing_plate_error_names_the_drivers_keyword():
    with pytest.raises(FreqviInputError, match=r"pass the plate's name to the driver as data_plate_name="):
        freqvi.fit(obs_model, guide=obs_guide, data=torch.zeros(10), batch_size=5, num_steps=1,
                   progress=False)


# ---- issue 14 item 10: a param read before it exists, and no guessing printed -----------------------
def test_a_guide_reading_the_models_params_before_they_exist_gets_a_message():
    pyro.clear_param_store()

    def exact_guide(x):
        mu = pyro.param("mu")  # tutorial 1's pattern: created by the model, which runs second
        with pyro.plate("data", len(x)) as i:
            pyro.sample("z", dist.Normal((x[i] + mu) / 2, 0.5**0.5))

    with pytest.raises(FreqviInputError, match=r"pyro.param\('mu'\) was read before it was created"):
        freqvi.fit(normal_model, guide=exact_guide, data=torch.zeros(10), num_steps=1, progress=False)


@config_enumerate
def mixture_model(x):
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(x)) as i:
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(2)))
        pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x[i])


class _Messages(logging.Handler):
    """Collects log messages (Pyro's logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("loss", ["enum", "q_function"])
def test_max_plate_nesting_is_passed_not_guessed_and_logged(loss):
    pyro.clear_param_store()
    collected, logger = _Messages(), logging.getLogger("pyro")
    logger.addHandler(collected)
    try:
        freqvi.fit(mixture_model, guide=lambda x: None, data=torch.randn(20), loss=loss, num_steps=2,
                   progress=False)
    finally:
        logger.removeHandler(collected)
    assert not [m for m in collected.messages if "max_plate_nesting" in m]


def test_the_pre_flight_check_gives_an_enumerated_guide_site_a_value_of_its_support_not_a_draw():
    """check_pair runs a guide site marked for parallel enumeration on the first value of its support,
    shaped as enumeration shapes its values (size 1 in each batch dimension): no sampler pass
    (torch's generator is left as it was), and the densities still have the site's batch shape."""
    from freqvi.models import GaussianMixture
    from freqvi.traces import check_model, check_pair

    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gm = GaussianMixture(3, 2)
    gm.model(x)
    before = torch.get_rng_state()
    model_trace, guide_trace = check_pair(gm.model, gm.guide, (x,))
    assert torch.equal(torch.get_rng_state(), before)
    for trace in (guide_trace, model_trace):
        value = trace.nodes["assignment"]["value"]
        assert value.shape == (1,) and not value.any()
    assert model_trace.nodes["obs"]["log_prob"].shape == (50,)
    assert guide_trace.nodes["assignment"]["log_prob"].shape == (50,)
    alone = check_model(gm.model, (x,))  # the model's pre-flight without a guide: no draw either
    assert torch.equal(torch.get_rng_state(), before) and alone.nodes["assignment"]["value"].shape == (1,)
