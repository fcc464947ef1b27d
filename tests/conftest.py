import numpy as np
import pyro
import pytest
from scipy import stats
from simulate import factor_data

import freqvi
from freqvi.models import FactorAnalysis


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow statistical check; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Each test starts from an empty parameter store and a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="module")
def factor_analysis_at_mle():
    """Factor analysis (5 columns, 2 factors, 200 rows) at its MLE by EM; each row's exact log p(x_i) from
    scipy's multivariate normal (independent of freqvi's closed form); the exact posterior N(m_i, S):
    ``(model, x, exact, m, S)``."""
    x = factor_data(n=200)
    fa = FactorAnalysis(5, 2)
    freqvi.em(fa, x, progress=False)
    w, mean, psi = (fa.loading.detach().numpy(), fa.mean.detach().numpy(), fa.noise_variance.detach().numpy())
    exact = stats.multivariate_normal(mean, w @ w.T + np.diag(psi)).logpdf(x.numpy())
    posterior = fa.posterior(x)
    return fa, x, exact, posterior.loc.detach(), posterior.covariance_matrix[0].detach()
