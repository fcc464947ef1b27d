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


_CTRL_C_CHANGES: list[str] = []


def _put_ctrl_c_back(where: str) -> None:
    """Puts Ctrl-C back as a shell gives it to a foreground command (Python's handler, SIGINT not
    blocked), noting a change."""
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if handler is not signal.default_int_handler or blocked:
        _CTRL_C_CHANGES.append(f"{where}: SIGINT {'blocked' if blocked else f'handled by {handler!r}'}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def pytest_sessionstart(session):
    # a background job of a non-interactive shell starts with SIGINT ignored, and Python keeps it so
    _put_ctrl_c_back("at the start of the run (inherited from the process that started pytest)")


@pytest.fixture(autouse=True)
def ctrl_c_as_a_shell_gives_it(request):
    """Each test ends with Ctrl-C as a shell gives a command; a test that leaves it otherwise is named at
    the end of the run and the state put back, so that the Ctrl-C tests after it (in-process, and in child
    processes, which inherit both the handler and the mask) test freqvi, not the change. A full run started
    in the background with SIGINT ignored failed its three Ctrl-C tests, which pass when started from a
    terminal."""
    yield
    _put_ctrl_c_back(f"after {request.node.nodeid}")


def pytest_terminal_summary(terminalreporter):
    for change in _CTRL_C_CHANGES:
        terminalreporter.write_line(f"Ctrl-C was not as a shell gives it, put back: {change}")


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
