"""The bootstrap: determinism across workers, intervals around the estimate, ArviZ export."""

import time

import arviz as az
import numpy as np
import pytest
import torch

import freqvi
from freqvi.datasets import load_iris
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
    loglik = freqvi.log_likelihood(gm, None, x)
    group = loglik.to_inference_data().log_likelihood["obs"]
    assert group.shape == (1, 1, 150)
    assert float(group.sum()) == pytest.approx(loglik.total)


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
