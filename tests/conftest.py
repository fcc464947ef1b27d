import signal

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


_CTRL_C_LEAKS: list[str] = []


@pytest.fixture(autouse=True)
def ctrl_c_as_a_shell_gives_it(request):
    """Each test ends with Ctrl-C as a shell gives a command: Python's handler, SIGINT not blocked. A test
    that leaves it otherwise is named at the end of the run and the state put back, so that the Ctrl-C
    tests after it (in-process, and in child processes, which inherit both) test freqvi, not that leak:
    one full run had SIGINT ignored or blocked by the time tests/test_cli_interrupts.py started, and its
    three Ctrl-C tests failed, which pass alone and in the other full runs."""
    yield
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if handler is not signal.default_int_handler or blocked:
        _CTRL_C_LEAKS.append(f"{request.node.nodeid}: SIGINT {'blocked' if blocked else 'handled by'} "
                             f"{'' if blocked else repr(handler)}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def pytest_terminal_summary(terminalreporter):
    for leak in _CTRL_C_LEAKS:
        terminalreporter.write_line(f"left Ctrl-C changed (put back): {leak}")


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
