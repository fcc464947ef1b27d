"""The bootstrap: determinism across workers, intervals around the estimate, ArviZ export, user pairs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from torch.distributions import constraints

import freqvi
from freqvi.datasets import load_iris
from freqvi.errors import FreqviError, FreqviInputError
from freqvi.infer.threads import ENV_VAR
from freqvi.models import GaussianMixture


@pytest.fixture
def fitted_iris():
    x = load_iris(dtype=torch.float64)
    gm = GaussianMixture(3, 4)
    freqvi.em(gm, x, tol=1e-8, max_iter=5000, progress=False, seed=0)
    return gm, x


@pytest.mark.parametrize("kind", ["nonparametric", "parametric"])
def test_replicates_do_not_depend_on_the_number_of_workers(fitted_iris, kind):
    gm, x = fitted_iris
    one = freqvi.bootstrap(gm, x, num_replicates=4, kind=kind, num_workers=1, seed=3)
    two = freqvi.bootstrap(gm, x, num_replicates=4, kind=kind, num_workers=2, seed=3)
    for name in one.draws:
        np.testing.assert_array_equal(one.draws[name], two.draws[name])
        assert one.draws[name].shape == (4, *gm.estimates()[name].shape)
    assert not np.array_equal(one.draws["locs"][0], one.draws["locs"][1])  # replicates differ


def test_replicates_export_to_arviz(fitted_iris):
    gm, x = fitted_iris
    boot = freqvi.bootstrap(gm, x, num_replicates=8, num_workers=2, seed=1)
    idata = boot.to_inference_data()
    assert idata.posterior["weights"].shape == (1, 8, 3)
    summary = az.summary(idata, kind="stats")
    assert summary.loc["weights[0]", "sd"] == pytest.approx(boot.standard_errors()["weights"][0], rel=1e-2)
    table = boot.summary(level=0.9)
    assert table.loc["locs[1, 2]", "estimate"] == pytest.approx(float(gm.estimates()["locs"][1, 2]))


def test_per_observation_log_likelihood_exports_to_arviz(fitted_iris):
    gm, x = fitted_iris
    loglik = freqvi.log_likelihood(gm, x)
    group = loglik.to_inference_data().log_likelihood["obs"]
    assert group.shape == (1, 1, 150)
    assert float(group.sum()) == pytest.approx(loglik.total)


def test_the_summary_lists_a_symmetric_matrix_once():
    a = np.array([[2.0, 0.5], [0.5, 1.0]])
    draws = np.stack([a + d * np.array([[1.0, 0.3], [0.3, 2.0]]) for d in (-0.1, 0.0, 0.2)])
    square = np.array([[1.0, 2.0], [3.0, 4.0]])
    boot = freqvi.Bootstrap({"cov": a, "square": square},
                            {"cov": draws, "square": np.stack([square, square + 1, square - 1])},
                            np.ones(3, dtype=bool), "nonparametric")
    table = boot.summary()
    assert list(table.index) == ["cov[0, 0]", "cov[1, 0]", "cov[1, 1]",
                                 "square[0, 0]", "square[0, 1]", "square[1, 0]", "square[1, 1]"]
    assert table.loc["cov[1, 0]", "std_err"] == pytest.approx(np.std(draws[:, 1, 0], ddof=1))


@pytest.mark.slow
def test_two_hundred_replicates_on_iris_bracket_the_estimate(fitted_iris, capsys):
    gm, x = fitted_iris
    start = time.perf_counter()
    boot = freqvi.bootstrap(gm, x, num_replicates=200, num_workers=2, seed=0)
    with capsys.disabled():
        print(f"\n200 bootstrap replicates on 2 workers: {time.perf_counter() - start:.1f} s, "
              f"{boot.converged.mean():.0%} converged")
    centre = freqvi.observed_information(gm, x).summary()["estimate"]
    table = boot.summary()
    inside = (table["[0.025"] <= centre) & (centre <= table["0.975]"])
    assert inside.all(), table[~inside]


# ----- user-written models: plain functions, validated before any worker starts ----------------------
def normal_model(x):
    """x_i ~ N(mu, sigma): the MLE of mu is mean(x), and the ideal bootstrap's variance of it is
    (1/n) * mean((x - mean(x))^2) exactly."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    sigma = pyro.param("sigma", torch.tensor(1.0, dtype=x.dtype), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=x)


def mixture_model(x):
    """x_i ~ w_1 N(loc_1, 1) + w_2 N(loc_2, 1), the component z_i summed out by enumeration (marked on
    the site: a function decorated by config_enumerate does not pickle under its own name)."""
    weights = pyro.param("weights", torch.tensor([0.5, 0.5], dtype=x.dtype), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)


def empty_guide(x):
    """Nothing to draw: em's E-step enumerates z."""


def no_parameters(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)


def thread_count_fit(model, data, guide=None, progress=False):
    """Records the worker's torch thread count as the estimate of mu."""
    with torch.no_grad():
        pyro.param("mu").unconstrained().fill_(torch.get_num_threads())


def dying_fit(model, data, guide=None, progress=False):
    os._exit(3)  # a worker that dies without a word


NORMAL_X = torch.randn(100, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 + 1


@pytest.mark.slow
def test_bootstrap_standard_error_of_a_user_models_mean_is_the_closed_form():
    """Nonparametric bootstrap of the MLE mean(x): its replicates' variance tends to
    mean((x - mean(x))^2) / n; with R replicates the sample s.d. has relative s.e. 1/sqrt(2(R-1))."""
    x = NORMAL_X
    freqvi.maximize_likelihood(normal_model, data=x)
    assert pyro.param("mu").item() == pytest.approx(float(x.mean()), abs=1e-6)
    num_replicates = 400
    boot = freqvi.bootstrap(normal_model, data=x, fit=freqvi.maximize_likelihood,
                            num_replicates=num_replicates, num_workers=2, seed=0)
    closed_form = float(x.std(correction=0)) / len(x) ** 0.5
    assert boot.estimate["mu"] == pytest.approx(float(x.mean()), abs=1e-6)
    assert boot.converged.all()
    relative_se = 1 / (2 * (num_replicates - 1)) ** 0.5
    assert boot.standard_errors()["mu"] == pytest.approx(closed_form, rel=4 * relative_se)
    monte_carlo_se = closed_form / num_replicates ** 0.5
    assert boot.draws["mu"].mean() == pytest.approx(float(x.mean()), abs=4 * monte_carlo_se)


@pytest.mark.slow
def test_bootstrap_refits_a_user_pair_of_plain_functions_with_em():
    x = torch.cat([NORMAL_X[:30] - 3, NORMAL_X[30:60] + 3])
    freqvi.em(mixture_model, data=x, guide=empty_guide, progress=False, seed=0)
    store = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    boot = freqvi.bootstrap(mixture_model, data=x, guide=empty_guide, num_replicates=4, num_workers=2, seed=1)
    assert boot.estimate.keys() == {"locs", "weights"}
    np.testing.assert_allclose(boot.estimate["locs"], store["locs"].numpy())
    assert boot.draws["locs"].shape == (4, 2) and len({tuple(d) for d in boot.draws["locs"]}) == 4
    # each loc is a mean of about 30 observations of s.d. 2 (NORMAL_X's): 4 s.e. is 4 * 2 / sqrt(30)
    assert np.all(np.abs(boot.draws["locs"] - boot.estimate["locs"]) < 4 * 2 / 30 ** 0.5)
    for name, value in pyro.get_param_store().items():  # the caller's parameters are untouched
        assert torch.equal(value.detach(), store[name]), name


def test_a_model_without_latent_sites_has_its_exact_log_likelihood():
    """What bootstrap refits with maximize_likelihood: the MLE of N(mu, sigma) and the log-likelihood."""
    x = NORMAL_X
    freqvi.maximize_likelihood(normal_model, data=x)
    mu, sigma = float(x.mean()), float(x.std(correction=0))
    assert pyro.param("mu").item() == pytest.approx(mu, abs=1e-6)
    assert pyro.param("sigma").item() == pytest.approx(sigma, rel=1e-6)
    loglik = freqvi.log_likelihood(normal_model, x)
    assert loglik.method == "exact"
    assert loglik.total == pytest.approx(scipy.stats.norm.logpdf(x.numpy(), mu, sigma).sum(), rel=1e-10)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: freqvi.bootstrap(lambda x: normal_model(x), data=NORMAL_X),
     "cannot be sent to the worker processes"),
    (lambda: freqvi.bootstrap(normal_model, data=NORMAL_X, fit=freqvi.maximize_likelihood, max_iters=3),
     r"must take the keywords data= and those given .* not \['max_iters'\]"),
    (lambda: freqvi.bootstrap(mixture_model, data=NORMAL_X, guide=empty_guide,
                              fit=freqvi.maximize_likelihood), "takes no guide"),
    (lambda: freqvi.bootstrap(no_parameters, data=NORMAL_X), "reads no pyro.param"),
    (lambda: freqvi.bootstrap(normal_model, data=NORMAL_X, fit="em"), "fit must be a callable"),
])
def test_bad_bootstrap_calls_are_refused_before_any_worker_starts(call, message, monkeypatch):
    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(sys.modules["freqvi.infer.bootstrap"], "ProcessPoolExecutor", no_pool)
    with pytest.raises(FreqviInputError, match=message):
        call()


@pytest.mark.slow
def test_workers_keep_one_thread_whatever_the_caller_asks(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "2")  # inherited by the workers
    boot = freqvi.bootstrap(normal_model, data=NORMAL_X, fit=thread_count_fit, num_replicates=2,
                            num_workers=1, num_threads=2)
    np.testing.assert_array_equal(boot.draws["mu"], [1.0, 1.0])


@pytest.mark.slow
def test_workers_that_die_give_a_freqvi_error_saying_what_to_do():
    with pytest.raises(FreqviError, match=r"BrokenProcessPool.*if __name__ == \"__main__\""):
        freqvi.bootstrap(normal_model, data=NORMAL_X, fit=dying_fit, num_replicates=2, num_workers=1)


SCRIPT = """import freqvi
from test_bootstrap import NORMAL_X, normal_model

{guard}
    freqvi.maximize_likelihood(normal_model, data=NORMAL_X)
    boot = freqvi.bootstrap(normal_model, data=NORMAL_X, fit=freqvi.maximize_likelihood, num_replicates=2,
                            num_workers=1)
    print("draws", boot.draws["mu"].shape)
"""


@pytest.mark.parametrize("guard", ["if True:",
                                   pytest.param('if __name__ == "__main__":', marks=pytest.mark.slow)])
def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path, guard):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT.format(guard=guard))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=300)
    if "__main__" in guard:
        assert done.returncode == 0, done.stderr
        assert "draws (2,)" in done.stdout
    else:
        assert done.returncode != 0
        assert "bootstrap is called at line 6 of the script" in done.stderr
        assert "outside an 'if __name__ == \"__main__\":' block" in done.stderr
        assert "BrokenProcessPool" not in done.stderr  # refused before any worker started
