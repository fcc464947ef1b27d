"""Property-based test of the public API under malformed input and options (issue 17).

Hypothesis draws data (wrong shapes, dtypes, NaN, infinities, float32's largest value, constant
columns, ragged lists, strings, callables) and options (zero, negative, NaN, infinite, huge,
strings, booleans, unknown names) for every public entry point. Each call must either return
finite results or raise a :class:`~freqvi.errors.FreqviError`, never another exception, and a
refused call must leave the model's parameters (values and dtypes) as they were.

The default run is derandomised (the same cases every time) and takes well under a minute; the
slow-marked variants (``--runslow``, CI) draw ten times as many cases.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import re
import warnings
from unittest import mock

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import freqvi
from freqvi import datasets, tour
from freqvi.cli import main
from freqvi.errors import FreqviError
from freqvi.models import VAE, FactorAnalysis, GaussianDiffusion, GaussianMixture, RandomInterceptLogistic

bootstrap_module = importlib.import_module("freqvi.infer.bootstrap")  # the package exports the function
DIM = 2
GOOD = torch.tensor([[0.1, 1.2], [2.0, -0.3], [-1.1, 0.4], [0.7, 2.2], [1.5, -1.0], [-0.4, 0.9]],
                    dtype=torch.float64)
MIXTURE_COVARIANCES = {"full": [np.eye(DIM)] * 2, "diag": [[1.0, 1.0], [1.0, 1.0]], "spherical": [1.0, 1.0]}


def _profile(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FAST, LONG = _profile(50), _profile(500)

# ----- strategies -------------------------------------------------------------------------------------
ODD = [0, -1, 1, 2, 0.5, 1e-300, -0.0, math.nan, math.inf, -math.inf, 2**40, True, False, None, "", "1",
       "auto", [], [1], (), {}, 1j, np.int64(3), np.float32(0.25), torch.tensor(1.0)]
#: Any option's value: the odd ones above, small integers, any float, short text.
values = st.one_of(st.sampled_from(ODD), st.integers(-3, 4),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3))
#: Values for counts that set a run's length: never a huge valid count, so each call stays short.
counts = st.one_of(st.sampled_from([0, -1, 1, 2, 2.5, "3", None, True, math.nan, np.int64(2), -(2**64)]),
                   st.integers(-2, 3))

CELLS = st.one_of(st.floats(-3, 3, width=32), st.sampled_from(
    [0.0, 1.0, -1.0, 65504.0, 1e300, -1e-310, math.nan, math.inf, -math.inf]))


SHAPES = st.one_of(st.tuples(st.integers(0, 7), st.sampled_from([DIM, DIM, DIM, 1, 3])),
                   st.sampled_from([(), (4,), (3, 2, 2), (0, DIM)]))


@st.composite
def arrays(draw):
    """An array of observations, mostly (n, DIM) in float64 or float32, sometimes anything else."""
    shape = draw(SHAPES)
    dtype = draw(st.sampled_from([np.float64, np.float64, np.float32, np.float32, np.float16, np.int64,
                                  np.bool_, np.complex64]))
    if dtype in (np.int64, np.bool_):
        x = draw(hnp.arrays(dtype, shape))
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # 1e300 in float32 is infinite: a case too
            x = draw(hnp.arrays(np.float64, shape, elements=CELLS)).astype(dtype)
    return _degenerate(draw, x)


def _degenerate(draw, x: np.ndarray) -> np.ndarray:
    """``x``, sometimes with a constant column, identical rows or all zeros."""
    if not (draw(st.booleans()) and x.ndim == 2 and x.shape[0] > 1):
        return x
    pattern = draw(st.sampled_from(["constant column", "identical rows", "zeros"]))
    x = x.copy()
    if pattern == "constant column":
        x[:, 0] = x[0, 0]
    else:
        x[:] = 0 if pattern == "zeros" else x[0]
    return x


@st.composite
def plausible(draw):
    """Data a model can take, (n, DIM) floats, with extreme or degenerate values: these reach the fits."""
    cells = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 65504.0, 1e30, -1e-30]))
    x = draw(hnp.arrays(np.float64, (draw(st.integers(2, 8)), DIM), elements=cells))
    x = _degenerate(draw, x).astype(draw(st.sampled_from([np.float64, np.float32])))
    return torch.as_tensor(x) if draw(st.booleans()) else x


@st.composite
def data(draw):
    """What a user might pass as ``data``: an array in some container, or something that is not one."""
    if draw(st.booleans()):
        return draw(plausible())
    x = draw(arrays())
    form = draw(st.sampled_from(["numpy", "tensor", "tensor", "list", "tuple", "missing", "junk"]))
    if form == "tensor":
        return torch.as_tensor(x)
    if form == "list":
        return x.tolist()
    if form == "tuple":
        return (torch.as_tensor(x), torch.as_tensor(draw(arrays())))
    if form == "missing":
        return freqvi.with_missing(torch.as_tensor(x))
    if form == "junk":
        return draw(st.sampled_from([None, "abc", 5, [[1.0, 2.0], [3.0]], [["a", "b"]], lambda x: x, {},
                                     (), iter([]), [GOOD.numpy(), GOOD.numpy()[:2]]]))
    return x


def options(names: dict) -> st.SearchStrategy[dict]:
    """Up to two of a driver's options (``names``: option -> its strategy), sometimes an unknown one."""
    keyed = st.one_of(*(st.tuples(st.just(k), v) for k, v in names.items()),
                      st.tuples(st.just("bogus"), values))
    return st.lists(keyed, max_size=2).map(dict)


EM_OPTIONS = {"m_step": values, "max_iter": counts, "tol": values, "batch_size": counts, "step_size": values,
              "score_tol": values, "m_step_iters": counts, "e_step_iters": counts, "num_particles": counts,
              "data_plate_name": values, "seed": values, "m_step_lr": values, "m_step_tol": values,
              "num_observations": counts, "device": values, "checkpoint_every": counts}
FIT_OPTIONS = {"loss": st.one_of(values, st.sampled_from(["iwae", "trace", "renyi", "stl", "dreg"])),
               "optim": values, "lr": values, "num_steps": counts, "tol": values, "window": counts,
               "batch_size": counts, "data_plate_name": values, "seed": values, "num_particles": counts,
               "clip_norm": values, "max_retries": counts, "patience": counts, "eval_every": counts,
               "max_time": values, "max_cpu_time": values, "on_step": values, "jit": values,
               "num_observations": counts, "validation_data": data(), "checkpoint_seconds": values}
LL_OPTIONS = {"method": st.one_of(values, st.just("ais")), "num_samples": counts, "chunk_size": counts,
              "seed": values, "data_plate_name": values, "num_temperatures": counts, "num_chains": counts,
              "leapfrog_steps": counts, "step_size": values}
MLE_OPTIONS = {"max_iter": counts, "tol": values, "data_plate_name": values}
INFO_OPTIONS = {"method": values, "num_samples": counts, "seed": values, "data_plate_name": values}
BOOTSTRAP_OPTIONS = {"num_replicates": counts, "kind": values, "num_workers": counts, "seed": values,
                     "fit": st.sampled_from([freqvi.em, freqvi.fit, freqvi.maximize_likelihood, "em", None]),
                     "max_iter": counts, "tol": values}


# ----- the contract ---------------------------------------------------------------------------------
def _state(module: torch.nn.Module | None) -> dict:
    """A model's parameters (its own and Pyro's store), cloned."""
    own = {} if module is None else {k: v.detach().clone() for k, v in module.state_dict().items()}
    store = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return {**own, **{f"store:{k}": v for k, v in store.items()}}


def _unchanged(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(), b.nan_to_num())
        for a, b in ((before[k], after[k]) for k in before))


def _finite(result) -> bool:
    """The headline numbers of a result are finite."""
    if hasattr(result, "select_dtypes"):  # compare's table
        return bool(np.isfinite(result.select_dtypes("number").to_numpy()).all())
    numbers = []
    for name in ("log_likelihood", "elbo", "total"):
        value = getattr(result, name, None)
        numbers += value if isinstance(value, list) else [] if value is None else [value]
    if isinstance(result, freqvi.Information):
        numbers += result.matrix.flatten().tolist()
    if isinstance(result, torch.Tensor):
        numbers += result.flatten().tolist() if result.is_floating_point() else []
    return all(math.isfinite(float(v)) for v in numbers)


def _contract(call, module=None):
    """Runs ``call()``: it must return finite results or raise a FreqviError with the parameters intact."""
    before = _state(module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warnings are verdicts on numbers, not faults here
            result = call()
    except FreqviError:
        assert _unchanged(before, _state(module)), "a refused call changed the model's parameters"
        return None
    if module is not None:
        assert all(torch.isfinite(p).all() for p in module.parameters()), "parameters not finite"
    assert _finite(result), f"a non-finite result: {result!r}"
    return result


def _mixture(covariance: str = "diag") -> GaussianMixture:
    """A mixture with parameters already made (so that a refused call has something to leave intact)."""
    pyro.clear_param_store()
    init = {"weights": [0.5, 0.5], "locs": [[0.0, 0.0], [1.0, 1.0]],
            "covariances": MIXTURE_COVARIANCES[covariance]}
    model = GaussianMixture(2, DIM, covariance, init=init)
    model.model(GOOD)
    return model


def _user_pair():
    """A user's pair: a global location, a Normal latent per row, observed through a plate."""
    pyro.clear_param_store()

    def model(x):
        loc = pyro.param("loc", torch.zeros(x.shape[-1], dtype=x.dtype))
        with pyro.plate("data", x.shape[0]) as i:
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
            pyro.sample("obs", dist.Normal(loc + z[:, None], 1.0).to_event(1), obs=x[i])

    def guide(x):
        m = pyro.param("m", torch.zeros(x.shape[0], dtype=x.dtype))
        with pyro.plate("data", x.shape[0]) as i:
            pyro.sample("z", dist.Normal(m[i], 1.0))

    model(GOOD), guide(GOOD)
    return model, guide


# ----- the properties ---------------------------------------------------------------------------------
def check_em(x, opts, covariance):
    model = _mixture(covariance)
    _contract(lambda: freqvi.em(model, x, **{"progress": False, "max_iter": 5, **opts}), model)


def check_fit(x, opts, which):
    if which == "user":
        model, guide = _user_pair()
        module = None
    else:
        model, guide = _mixture(), None
        module = model
    _contract(lambda: freqvi.fit(model, x, guide, **{"progress": False, "num_steps": 3, **opts}), module)


def check_log_likelihood(x, opts, which):
    if which == "user":
        model, guide = _user_pair()
        module = None
        opts = {"num_samples": 8, **opts}
    else:
        model, guide = _mixture(), None
        module = model
    _contract(lambda: freqvi.log_likelihood(model, x, guide, **opts), module)


def check_maximize_likelihood(x, opts, covariance):
    model = _mixture(covariance)
    _contract(lambda: freqvi.maximize_likelihood(model, x, **{"max_iter": 20, **opts}), model)


def check_observed_information(x, opts):
    model = _mixture()
    _contract(lambda: freqvi.observed_information(model, x, **opts), model)


class _WorkersWouldStart(Exception):
    """Raised in place of starting bootstrap's worker processes: every check has passed."""


def check_bootstrap(x, opts):
    model = _mixture()
    with mock.patch.object(bootstrap_module, "ProcessPoolExecutor", side_effect=_WorkersWouldStart):
        try:
            _contract(lambda: freqvi.bootstrap(model, x, **opts), model)
        except _WorkersWouldStart:
            pass


def _candidates(which):
    """Two mixtures with parameters made (a refused comparison must leave both as they were), or junk."""
    if which != "mixtures":
        return which
    one, two = GaussianMixture(1, DIM, "diag"), GaussianMixture(2, DIM, "diag")
    one.model(GOOD), two.model(GOOD)
    return {"K=1": one, "K=2": two}


def check_compare(candidates, x, opts):
    modules = tuple(candidates.values()) if isinstance(candidates, dict) else ()
    _contract(lambda: freqvi.compare(candidates, x, **{"max_iter": 5, **opts}),
              torch.nn.ModuleList([m for m in modules if isinstance(m, torch.nn.Module)]))


@given(data(), options(EM_OPTIONS), st.sampled_from(["diag", "full", "spherical"]))
@FAST
def test_em(x, opts, covariance):
    check_em(x, opts, covariance)


@given(data(), options(FIT_OPTIONS), st.sampled_from(["mixture", "user"]))
@FAST
def test_fit(x, opts, which):
    check_fit(x, opts, which)


@given(data(), options(LL_OPTIONS), st.sampled_from(["mixture", "user"]))
@FAST
def test_log_likelihood(x, opts, which):
    check_log_likelihood(x, opts, which)


@given(data(), options(MLE_OPTIONS), st.sampled_from(["diag", "full", "spherical"]))
@FAST
def test_maximize_likelihood(x, opts, covariance):
    check_maximize_likelihood(x, opts, covariance)


@given(data(), options(INFO_OPTIONS))
@FAST
def test_observed_information(x, opts):
    check_observed_information(x, opts)


@given(data(), options(BOOTSTRAP_OPTIONS))
@FAST
def test_bootstrap_checks(x, opts):
    check_bootstrap(x, opts)


candidates = st.one_of(st.sampled_from([{}, [], None, "K=2", {1: None}, {"K=2": None}]),
                       st.just("mixtures"))


@given(candidates, data(), options({"seed": values, "num_samples": counts, "tol": values}))
@FAST
def test_compare(which, x, opts):
    check_compare(_candidates(which), x, opts)


# ----- constructors, init= and the data loaders ---------------------------------------------------------
def ragged_or_junk():
    return st.one_of(values, st.lists(st.one_of(values, st.lists(values, max_size=3)), max_size=3),
                     arrays().map(lambda a: a.tolist()))


@st.composite
def inits(draw, keys):
    chosen = draw(st.lists(st.sampled_from([*keys, "bogus"]), unique=True, max_size=len(keys) + 1))
    return draw(st.one_of(st.fixed_dictionaries({k: ragged_or_junk() for k in chosen}),
                          st.sampled_from([None, [], "init", 3, {}])))


CONSTRUCTORS = {
    "GaussianMixture": (lambda a, b, init, **kw: GaussianMixture(a, b, init=init, **kw),
                        ["weights", "locs", "covariances"], {"covariance": values, "reg_covar": values}),
    "FactorAnalysis": (lambda a, b, init, **kw: FactorAnalysis(a, b, init=init, **kw),
                       ["mean", "loading", "noise_variance"], {"noise": values}),
    "RandomInterceptLogistic": (lambda a, b, init, **kw: RandomInterceptLogistic(a, init=init, **kw),
                                ["beta", "sigma"], {"quadrature_nodes": counts}),
    "VAE": (lambda a, b, init, **kw: VAE(a, b, **kw), [],
            {"hidden": st.one_of(values, st.lists(counts, max_size=2)), "likelihood": values, "noise": values,
             "init_noise_scale": values}),
    "GaussianDiffusion": (lambda a, b, init, **kw: GaussianDiffusion(a, b, **kw), [],
                          {"hidden": st.one_of(values, st.lists(counts, max_size=2)), "schedule": values,
                           "reverse_variance": values}),
}


@st.composite
def constructions(draw):
    name = draw(st.sampled_from(sorted(CONSTRUCTORS)))
    build, keys, extra = CONSTRUCTORS[name]
    init = draw(inits(keys)) if keys and draw(st.booleans()) else None
    keyed = st.one_of(*(st.tuples(st.just(k), v) for k, v in extra.items()))
    kw = draw(st.lists(keyed, max_size=2).map(dict))
    return build, draw(counts), draw(counts), init, kw


def check_constructor(case):
    build, a, b, init, kw = case
    _contract(lambda: build(a, b, init, **kw) and None)


@given(constructions())
@FAST
def test_constructors(case):
    check_constructor(case)


LOADERS = [datasets.load_iris, datasets.load_moons, datasets.load_swiss_roll, datasets.load_digits]


def check_loader(loader, split, dtype):
    kwargs = {} if loader is datasets.load_iris else {"split": split}
    _contract(lambda: loader(dtype=dtype, **kwargs))


@given(st.sampled_from(LOADERS), st.one_of(values, st.sampled_from(["train", "test", "all"])),
       st.one_of(values, st.sampled_from([torch.float32, torch.float64, torch.int64, torch.float16,
                                          np.float32])))
@FAST
def test_builtin_loaders(loader, split, dtype):
    check_loader(loader, split, dtype)


@st.composite
def files(draw):
    """A file's name and bytes: CSV text (numbers, junk, NaN, headers, not UTF-8) or .npy bytes."""
    suffix = draw(st.sampled_from([".csv", ".csv", ".npy", ".txt", ""]))
    if suffix == ".npy" and draw(st.booleans()):
        return suffix, None, draw(arrays())
    rows = draw(st.lists(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                                            st.sampled_from(["", "a", "nan", "1e999", "#"])),
                                  min_size=0, max_size=3), max_size=4))
    text = "\n".join(",".join(r) for r in rows).encode()
    if draw(st.booleans()):
        text = draw(st.sampled_from([b"\xff\xfe1,2\n", b"x,y\n1,2\n3,4\n", b"", b"\x00\x01",
                                     text + b"\n,\n"]))
    return suffix, text, None


def check_load_array(tmp, case, dtype, allow_nan):
    suffix, text, array = case
    path = tmp / f"data{suffix}"
    if array is not None:
        np.save(path, array)
    else:
        path.write_bytes(text)
    # allow_nan keeps NaN as missing values: only infinities are faults then
    _contract(lambda: datasets.load_array(path, dtype=dtype, allow_nan=allow_nan).nan_to_num(
        nan=0.0, posinf=math.inf, neginf=-math.inf))
    _contract(lambda: datasets.NpyBatches(path, batch_size=2) and None)


@given(files(), st.one_of(st.none(), st.sampled_from([torch.float32, torch.float64, torch.int32, "float"])),
       st.booleans())
@FAST
def test_load_array_files(tmp_path_factory, case, dtype, allow_nan):
    check_load_array(tmp_path_factory.mktemp("load"), case, dtype, allow_nan)


@given(data(), st.one_of(st.none(), st.sampled_from([torch.float32, torch.float64, torch.int32, "float"])))
@FAST
def test_load_array_values(x, dtype):
    _contract(lambda: datasets.load_array(x, dtype=dtype))


# ----- the long profile -------------------------------------------------------------------------------
@pytest.mark.slow
@given(data(), options(EM_OPTIONS), st.sampled_from(["diag", "full", "spherical"]))
@LONG
def test_em_long(x, opts, covariance):
    check_em(x, opts, covariance)


@pytest.mark.slow
@given(data(), options(FIT_OPTIONS), st.sampled_from(["mixture", "user"]))
@LONG
def test_fit_long(x, opts, which):
    check_fit(x, opts, which)


@pytest.mark.slow
@given(data(), options(LL_OPTIONS), st.sampled_from(["mixture", "user"]))
@LONG
def test_log_likelihood_long(x, opts, which):
    check_log_likelihood(x, opts, which)


@pytest.mark.slow
@given(data(), options(MLE_OPTIONS), st.sampled_from(["diag", "full", "spherical"]))
@LONG
def test_maximize_likelihood_long(x, opts, covariance):
    check_maximize_likelihood(x, opts, covariance)


@pytest.mark.slow
@given(data(), options(INFO_OPTIONS))
@LONG
def test_observed_information_long(x, opts):
    check_observed_information(x, opts)


@pytest.mark.slow
@given(data(), options(BOOTSTRAP_OPTIONS))
@LONG
def test_bootstrap_checks_long(x, opts):
    check_bootstrap(x, opts)


@pytest.mark.slow
@given(constructions())
@LONG
def test_constructors_long(case):
    check_constructor(case)


@pytest.mark.slow
@given(candidates, data(), options({"seed": values, "num_samples": counts, "tol": values}))
@LONG
def test_compare_long(which, x, opts):
    check_compare(_candidates(which), x, opts)


@pytest.mark.slow
@given(files(), st.one_of(st.none(), st.sampled_from([torch.float32, torch.float64, torch.int32, "float"])),
       st.booleans())
@LONG
def test_load_array_files_long(tmp_path_factory, case, dtype, allow_nan):
    check_load_array(tmp_path_factory.mktemp("load"), case, dtype, allow_nan)


# ----- each fault the issue names, with its reference -----------------------------------------------------
def _refused(call, module=None, match: str | None = None) -> None:
    """``call()`` raises a FreqviInputError (matching ``match``) and leaves ``module``'s parameters and
    Pyro's store exactly as they were (the reference: a copy taken before the call)."""
    before = _state(module)
    with pytest.raises(freqvi.errors.FreqviInputError, match=match):
        call()
    assert _unchanged(before, _state(module))


NAN = math.nan
REFUSED_OPTIONS = [
    ("em", {"tol": NAN}, "tol"), ("em", {"tol": -1.0}, "tol"), ("fit", {"tol": NAN}, "tol"),
    ("fit", {"tol": -1.0}, "tol"), ("em", {"seed": -1}, "seed"), ("fit", {"seed": 2**40}, "seed"),
    ("fit", {"seed": 1.5}, "seed"), ("log_likelihood", {"seed": -1}, "seed"),
    ("observed_information", {"seed": -1}, "seed"), ("fit", {"bogus": 3}, "no option"),
    ("em", {"bogus": 3}, "bogus"), ("fit", {"num_particles": 0}, "num_particles"),
    ("fit", {"loss": pyro.infer.Trace_ELBO(num_particles=0)}, "num_particles"),
    ("fit", {"loss": "renyi", "alpha": "x"}, "real number"),
    ("fit", {"loss": "iwae", "num_particles": "8"}, "8"),
    ("em", {"m_step_iters": 0}, "m_step_iters"),
    ("em", {"num_particles": 0}, "num_particles"), ("em", {"e_step_iters": -1}, "e_step_iters"),
    ("em", {"batch_size": 2, "step_size": -1}, "step_size"),
    ("em", {"batch_size": 2, "step_size": 0.5}, "kappa"),
    ("em", {"batch_size": 2, "step_size": 1.5}, "kappa"),
    ("log_likelihood", {"chunk_size": 0}, "chunk_size"),
    ("fit", {"data_plate_name": "rows"}, "rows"), ("em", {"data_plate_name": "rows"}, "rows"),
    ("fit", {"optim": []}, "optimiser"), ("fit", {"optim": {}}, "optimiser"),
]


@pytest.mark.parametrize(("driver", "opts", "match"), REFUSED_OPTIONS)
def test_a_bad_option_is_refused_before_any_work(driver, opts, match):
    model = _mixture()
    call = getattr(freqvi, driver)
    _refused(lambda: call(model, GOOD, **{"progress": False} if driver in ("em", "fit") else {}, **opts),
             model, match)


def test_bootstrap_and_compare_options_are_refused():
    model = _mixture()
    _refused(lambda: freqvi.bootstrap(model, GOOD, num_workers=0), model, "num_workers")
    _refused(lambda: freqvi.bootstrap(model, GOOD, seed=-1), model, "seed")
    _refused(lambda: freqvi.compare({}, GOOD), None, "non-empty")
    _refused(lambda: freqvi.compare([model], GOOD), None, "non-empty dict")
    replicates = bootstrap_module.Bootstrap({"a": np.zeros(1)}, {"a": np.arange(6.0).reshape(3, 2)},
                                            np.ones(3, bool), "nonparametric")
    for level in (2, 0, 1, NAN, "0.9"):
        with pytest.raises(freqvi.errors.FreqviInputError, match="level"):
            replicates.percentile_interval(level)
    # the reference: NumPy's quantiles of the replicates, the interval's definition
    np.testing.assert_array_equal(replicates.percentile_interval(0.5)["a"][0],
                                  np.quantile(np.arange(6.0).reshape(3, 2), 0.25, axis=0))


@pytest.mark.parametrize("init", [
    {"weights": [0.5, 0.5], "locs": [[0.0, 0.0], [1.0]], "covariances": [[1.0, 1.0], [1.0, 1.0]]},
    {"weights": "ab", "locs": [[0.0, 0.0], [1.0, 1.0]], "covariances": [[1.0, 1.0], [1.0, 1.0]]},
    [("weights", [0.5, 0.5])], "init", {"weights": [True, False], "locs": [[0, 0], [1, 1]],
                                        "covariances": [[1, 1], [1, 1]]},
])
def test_a_malformed_init_is_refused(init):
    for build in (lambda: GaussianMixture(2, DIM, "diag", init=init),
                  lambda: FactorAnalysis(DIM, 1, init=init), lambda: RandomInterceptLogistic(DIM, init=init)):
        with pytest.raises(freqvi.errors.FreqviInputError, match="init"):
            build()


def test_a_ragged_init_of_each_model_names_its_key():
    with pytest.raises(freqvi.errors.FreqviInputError, match=r"init\['mean'\]"):
        FactorAnalysis(DIM, 1, init={"mean": [0, [0]], "loading": [[1], [1]], "noise_variance": [1, 1]})
    with pytest.raises(freqvi.errors.FreqviInputError, match=r"init\['beta'\]"):
        RandomInterceptLogistic(DIM, init={"beta": "x", "sigma": 1})


@pytest.mark.parametrize("build", [lambda: VAE(DIM, 1, likelihood="gaussian", init_noise_scale=-1),
                                   lambda: VAE(DIM, 1, likelihood="gaussian", init_noise_scale="a"),
                                   lambda: VAE(DIM, 1, hidden=5), lambda: VAE(2**64, 1),
                                   lambda: GaussianDiffusion(DIM, 2**64),
                                   lambda: GaussianDiffusion(DIM, 3, hidden="8")])
def test_bad_constructor_arguments_are_refused(build):
    with pytest.raises(freqvi.errors.FreqviInputError):
        build()


def _user_model_with(observe):
    def model(x):
        loc = pyro.param("loc", torch.zeros(3, dtype=x.dtype))
        with pyro.plate("data", x.shape[0]) as i:
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
            observe(loc, z, x, i)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))

    return model, guide


@pytest.mark.parametrize(("observe", "options"), [
    # the event shape (3,) does not match the data's 2 columns
    (lambda loc, z, x, i: pyro.sample("obs", dist.Normal(loc + z[:, None], 1.0).to_event(1), obs=x), {}),
    # obs=x (all rows) under a minibatch of 2 rows: the plate selects rows that x is not indexed by
    (lambda loc, z, x, i: pyro.sample("obs", dist.Normal(loc[:2] + z[:, None], 1.0).to_event(1), obs=x),
     {"batch_size": 2}),
])
def test_a_user_model_that_cannot_take_its_data_fails_in_the_check(observe, options):
    model, guide = _user_model_with(observe)
    steps = []
    with pytest.raises(freqvi.errors.FreqviInputError, match="broadcast"):
        freqvi.fit(model, GOOD, guide, num_steps=2, progress=False, on_step=steps.append, **options)
    assert steps == []  # refused before step 0


@pytest.mark.parametrize("pattern", ["constant column", "identical rows", "zeros"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maximize_likelihood_refuses_degenerate_data_and_keeps_the_start(pattern, covariance, dtype):
    """The likelihood is unbounded (a variance can fall to 0): an error, the float64 start intact."""
    x = GOOD.clone()
    if pattern == "constant column":
        x[:, 1] = 3.0
    else:
        x[:] = 0.0 if pattern == "zeros" else x[0]
    model = _mixture(covariance)
    _refused(lambda: freqvi.maximize_likelihood(model, x.to(dtype)), model, "no maximum")


@pytest.mark.parametrize(("pattern", "covariance", "columns"), [
    ("constant column", "diag", r"\[1\]"), ("constant column", "full", r"\[1\]"),
    ("identical rows", "spherical", r"\[0, 1\]"), ("identical rows", "full", r"\[0, 1\]")])
def test_em_fits_degenerate_data_on_the_floor_and_says_where(pattern, covariance, columns):
    """The data maximize_likelihood refuses (no maximum without a floor): em fits them with reg_covar's
    floor, as scikit-learn does, and warns, naming each floored component and its columns; the floored
    variances are reg_covar (the reference: the floor itself, where the likelihood is bounded only by it)."""
    x = GOOD.clone()
    if pattern == "constant column":
        x[:, 1] = 3.0
    else:
        x[:] = x[0]
    refused = _mixture(covariance)
    _refused(lambda: freqvi.maximize_likelihood(refused, x), refused, "no maximum")
    model = _mixture(covariance)
    floored = (rf"covariances\[0\] \(an eigenvalue on the reg_covar floor 1e-06, along columns {columns}\)'"
               rf", 'covariances\[1\] \(.*along columns {columns}\)'\]")
    with pytest.warns(freqvi.infer.information.BoundaryWarning, match=floored):
        freqvi.em(model, x, progress=False)
    cov = model.estimates()["covariances"]
    smallest = torch.linalg.eigvalsh(cov)[:, 0] if covariance == "full" else cov.reshape(2, -1).min(-1).values
    torch.testing.assert_close(smallest, torch.full((2,), 1e-6, dtype=torch.float64), rtol=1e-6, atol=0)


def test_maximize_likelihood_refuses_data_its_model_cannot_take():
    model = _mixture()
    _refused(lambda: freqvi.maximize_likelihood(model, (GOOD, GOOD)), model, "running the model")


class _FailingMixture(GaussianMixture):
    """A mixture whose closed-form M-step raises ``error`` on its third call."""

    def __init__(self, error: type[Exception], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.error, self.calls = error, 0

    def maximize(self, statistics):
        self.calls += 1
        if self.calls == 3:
            raise self.error("a fault in the third M-step")
        super().maximize(statistics)


@pytest.mark.parametrize("error", [RuntimeError, freqvi.errors.FreqviInputError])
def test_em_failing_mid_run_keeps_the_last_good_iteration(error):
    """The reference: the same run stopped after two iterations (tol=0, so it cannot stop earlier)."""
    init = {"weights": [0.5, 0.5], "locs": [[0.0, 0.0], [1.0, 1.0]], "covariances": [[1.0, 1.0], [1.0, 1.0]]}
    reference = GaussianMixture(2, DIM, "diag", init=init)
    with pytest.warns(freqvi.errors.ConvergenceWarning):
        freqvi.em(reference, GOOD, max_iter=2, tol=0.0, progress=False)
    failing = _FailingMixture(error, 2, DIM, "diag", init=init)
    with pytest.raises(freqvi.errors.FreqviError, match="iteration 3 failed") as caught:
        freqvi.em(failing, GOOD, max_iter=5, tol=0.0, progress=False)
    assert not isinstance(caught.value, freqvi.errors.FreqviInputError)  # mid-run, not a refusal
    for name, value in reference.estimates().items():
        assert torch.equal(failing.estimates()[name], value), name


def test_online_em_refuses_a_step_size_outside_0_1_and_keeps_the_start():
    """gamma_1 = 1 is fixed; step_size(2) = 2 would blend with a negative weight on the old statistics."""
    model = _mixture()
    before = _state(model)
    with pytest.raises(freqvi.errors.FreqviError, match=r"step_size\(2\)"):
        freqvi.em(model, GOOD, batch_size=3, step_size=lambda t: 2.0, progress=False)
    assert _unchanged(before, _state(model))


def test_em_on_float32_data_holding_65504_matches_float64():
    """float32's largest finite half-precision value, 65504, in one cell: the float32 fit is the float64 fit
    to float32 accuracy (40 log-density terms of at most ~15 nats: rounding below 1e-4 nats)."""
    x = torch.randn(40, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 65504.0
    init = {"weights": [0.5, 0.5], "locs": [[0.0, 0.0], [1.0, 1.0]], "covariances": [[1.0, 1.0], [1.0, 1.0]]}
    fits = {}
    for dtype in (torch.float64, torch.float32):
        model = GaussianMixture(2, DIM, "diag", init=init)
        # a component takes that row alone, both its variances on the floor: em says so
        with pytest.warns(freqvi.infer.information.BoundaryWarning, match=r"along columns \[0, 1\]"):
            fits[dtype] = freqvi.em(model, x.to(dtype), progress=False).log_likelihood[-1], model.estimates()
    assert fits[torch.float32][0] == pytest.approx(fits[torch.float64][0], abs=1e-3)
    for name, value in fits[torch.float64][1].items():
        torch.testing.assert_close(fits[torch.float32][1][name].double(), value, rtol=1e-5, atol=1e-6)


def test_loaders_refuse_a_bad_dtype_and_a_file_that_is_not_utf8(tmp_path):
    with pytest.raises(freqvi.errors.FreqviInputError, match="dtype"):
        datasets.load_iris(dtype=0)
    path = tmp_path / "latin1.csv"
    path.write_bytes("x\xe9,y\n1,2\n".encode("latin-1"))
    with pytest.raises(freqvi.errors.FreqviInputError, match="UTF-8"):
        datasets.load_array(path)


# ----- the console command -------------------------------------------------------------------------------
#: Text for each kind of option value: well-formed small values and malformed ones. Never a large valid
#: count (a run that long), never an empty path (the current folder).
COUNT_TEXT = st.sampled_from(["1", "2", "0", "-1", "2.5", "", "x", "nan", "-0", "1e3", " 2", "٣",
                              str(-(2**64)), "0x10"])
REAL_TEXT = st.sampled_from(["0.5", "1e-3", "0", "-1", "nan", "inf", "-inf", "1e400", "1e-400", "abc", "",
                             "0.999", "1"])
SEED_TEXT = st.sampled_from(["0", "7", "-1", str(2**32 - 1), str(2**32), str(2**40), "1.5", "", "seed"])
WIDTH_TEXT = st.sampled_from(["4", "4,3", "0", "4,0", "-4", "", ",", "4,,3", "a,b", "4.5"])
CLI_OPTIONS = {
    "em": {"--components": COUNT_TEXT, "--max-iter": COUNT_TEXT, "--tol": REAL_TEXT, "--seed": SEED_TEXT,
           "--covariance": st.sampled_from(["full", "diag", "tied", ""]), "--threads": COUNT_TEXT,
           "--m-step": st.sampled_from(["auto", "gradient", "none"]), "--checkpoint-every": COUNT_TEXT},
    "vae": {"--latent-dim": COUNT_TEXT, "--hidden": WIDTH_TEXT, "--steps": COUNT_TEXT,
            "--batch-size": COUNT_TEXT, "--lr": REAL_TEXT, "--particles": COUNT_TEXT,
            "--patience": COUNT_TEXT, "--num-samples": COUNT_TEXT, "--gap-steps": COUNT_TEXT,
            "--seed": SEED_TEXT,
            "--estimator": st.sampled_from(["iwae", "dreg", "trace", "bogus"]),
            "--likelihood": st.sampled_from(["gaussian", "continuous_bernoulli", "poisson"])},
    "diffusion": {"--diffusion-steps": COUNT_TEXT, "--hidden": WIDTH_TEXT, "--steps": COUNT_TEXT,
                  "--batch-size": COUNT_TEXT, "--lr": REAL_TEXT, "--ema-decay": REAL_TEXT,
                  "--samples": COUNT_TEXT, "--ddim-steps": COUNT_TEXT, "--seed": SEED_TEXT,
                  "--sampler": st.sampled_from(["ddim", "ancestral", "euler"]),
                  "--schedule": st.sampled_from(["cosine", "linear", "quadratic"])},
    "tour": {"--seed": SEED_TEXT, "--threads": COUNT_TEXT},
}
#: Each command's small budget, given first (a generated option given again overrides it): every run ends
#: in about a second, and writes into the test's own folder.
CLI_BUDGETS = {
    "em": ["--max-iter", "3"],
    "vae": ["--steps", "2", "--hidden", "4", "--latent-dim", "2", "--num-samples", "3", "--gap-steps", "1"],
    "diffusion": ["--steps", "2", "--diffusion-steps", "3", "--hidden", "4", "--samples", "5"],
    "tour": ["--quick"],
}
#: What ``--data`` may name (made by :func:`_cli_files`), and the ``--out``/``--json``/``--checkpoint``
#: places: a new folder, an existing file, a path under a file.
DATA_FILES = ("rows.csv", "latin1.csv", "nan.csv", "three.csv", "empty.csv", "ints.npy", "missing.csv", ".")
OUT_PLACES = ("new", "rows.csv", "rows.csv/sub", "folder")
PLACES = {"--data": DATA_FILES, "--out": OUT_PLACES, "--json": OUT_PLACES, "--checkpoint": OUT_PLACES}
PLACE_OPTIONS = {"em": ("--data", "--json", "--checkpoint"), "vae": ("--data", "--out", "--checkpoint"),
                 "diffusion": ("--data", "--out", "--checkpoint"), "tour": ("--out",)}
ERROR_LINE = re.compile(r"^freqvi( (em|vae|diffusion|tour))?: error: ")  # freqvi's, or argparse's


@st.composite
def command_lines(draw):
    """A command line: a command, its budget, generated options (some malformed), perhaps junk."""
    command = draw(st.sampled_from(sorted(CLI_OPTIONS)))
    chosen = draw(st.lists(st.sampled_from(sorted(CLI_OPTIONS[command])), max_size=3))
    argv = [command, "--quiet", *CLI_BUDGETS[command]]
    for option in chosen:
        argv += [option, draw(CLI_OPTIONS[command][option])]
    for option in draw(st.lists(st.sampled_from(PLACE_OPTIONS[command]), max_size=2, unique=True)):
        argv += [option, "@" + draw(st.sampled_from(PLACES[option]))]
    if command != "tour" and "--checkpoint" in argv and draw(st.booleans()):
        argv.append("--resume")
    argv += draw(st.sampled_from([[], [], ["--bogus"], ["extra"], ["--seed"], ["-x", "1"]]))
    return argv


def _cli_files(folder) -> None:
    """The files ``--data`` and the output options may name, in ``folder``."""
    grid = np.random.default_rng(0).uniform(size=(20, 3))
    np.savetxt(folder / "rows.csv", grid, delimiter=",", header="a,b,c", comments="")
    (folder / "latin1.csv").write_bytes("x\xe9,y\n1,2\n3,4\n5,6\n".encode("latin-1"))
    (folder / "nan.csv").write_text("a,b\n" + "\n".join(["0.5,nan", *["0.1,0.2"] * 10]) + "\n")
    (folder / "three.csv").write_text("a,b\n0.1,0.2\n0.3,0.4\n0.5,0.6\n")
    (folder / "empty.csv").write_text("")
    np.save(folder / "ints.npy", np.arange(40).reshape(20, 2))
    (folder / "folder").mkdir()


def check_command_line(folder, argv) -> None:
    """``main(argv)`` returns 0, or 1/2 with a freqvi or argparse error as its last line; never raises."""
    argv = [str(folder / a[1:]) if a.startswith("@") else a for a in argv]
    out_first = [] if argv[0] == "em" else ["--out", str(folder / "out")]  # overridden by a later --out
    out, err = io.StringIO(), io.StringIO()
    stages = []  # the tour's stages take a minute: recorded, not run, once its checks have passed
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(tour, "run_tour", lambda out, **kw: stages.append(kw) or out / "report.html"):
        status = main([argv[0], *out_first, *argv[1:]])
    lines = err.getvalue().splitlines()
    assert "Traceback" not in err.getvalue(), err.getvalue()
    if status == 0:
        assert out.getvalue(), argv
        return
    assert status in (1, 2), (status, argv, err.getvalue())
    assert lines and ERROR_LINE.match(lines[-1]), (argv, lines)


@given(command_lines())
@_profile(15)
def test_command_lines(tmp_path_factory, argv):
    folder = tmp_path_factory.mktemp("cli")
    _cli_files(folder)
    check_command_line(folder, argv)


@pytest.mark.slow
@given(command_lines())
@_profile(250)
def test_command_lines_long(tmp_path_factory, argv):
    folder = tmp_path_factory.mktemp("cli")
    _cli_files(folder)
    check_command_line(folder, argv)


# ----- a refused call on a user's plain functions: Pyro's parameter store as it was ------------------------
def _plain_pair():
    """``_user_pair``'s functions, no parameters made yet: the first call makes them from its data."""
    pyro.clear_param_store()
    model, guide = _user_pair()
    pyro.clear_param_store()
    return model, guide


@pytest.mark.parametrize("refused", [
    lambda m, g: freqvi.fit(m, GOOD.float(), g, num_steps=2, progress=False, data_plate_name="rows"),
    lambda m, g: freqvi.fit(m, GOOD[:4], g, num_steps=2, progress=False, loss="iwae", num_particles=0),
    lambda m, g: freqvi.em(m, GOOD.float(), g, max_iter=2, progress=False, data_plate_name="rows"),
], ids=["fit-float32-bad-plate", "fit-four-rows-bad-particles", "em-float32-bad-plate"])
def test_a_refused_call_leaves_pyros_parameter_store_as_it_was(refused):
    """The refused call ran the functions on its own data (float32, or 4 rows), which made their parameters
    in that dtype and size; left in the store, they would be what the next, correct call fits. The
    reference: the same correct fit without the refused call before it, bit for bit."""
    model, guide = _plain_pair()
    with pytest.raises(freqvi.errors.FreqviInputError):
        refused(model, guide)
    assert dict(pyro.get_param_store().items()) == {}
    after = freqvi.fit(model, GOOD, guide, num_steps=5, progress=False, seed=0).elbo
    fitted = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    model, guide = _plain_pair()
    reference = freqvi.fit(model, GOOD, guide, num_steps=5, progress=False, seed=0).elbo
    assert after == reference
    for name, value in pyro.get_param_store().items():
        assert fitted[name].dtype == torch.float64 and torch.equal(fitted[name], value.detach()), name


def test_a_refused_call_restores_existing_store_parameters_in_place():
    model, guide = _user_pair()
    store = pyro.get_param_store()
    live = {name: p for name, p in store.named_parameters()}
    before = _state(None)
    _refused(lambda: freqvi.fit(model, GOOD.float(), guide, num_steps=2, progress=False,
                                data_plate_name="rows"))
    assert _unchanged(before, _state(None))
    assert all(p is live[name] for name, p in store.named_parameters())  # the same tensors, optimisers' too
