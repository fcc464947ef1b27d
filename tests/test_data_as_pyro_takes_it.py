"""Data as Pyro takes them (issue 14 item 6): dtypes kept, array-likes are arrays, NaN cells for a model
that masks them (freqvi.with_missing), each checked against a NumPy/SciPy computation."""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from scipy.stats import multivariate_normal, norm
from torch.utils.data import DataLoader

import freqvi
from freqvi.errors import ConvergenceWarning, FreqviInputError
from freqvi.guides import AmortizedNormal, LocalMeanField
from freqvi.models import GaussianMixture
from freqvi.validation import as_data


@pytest.mark.parametrize("array, dtype", [
    (np.array([[True, False], [False, True]]), torch.bool),
    (np.array([[0, 2], [1, 3]]), torch.int64),
    (np.array([[0, 2], [1, 3]], dtype=np.int32), torch.int32),
    (np.array([[0.5, 2.0], [1.0, 3.0]], dtype=np.float32), torch.float32),
    (np.array([[0.5, 2.0], [1.0, 3.0]]), torch.float64),
    ([[0.5, 2.0], [1.0, 3.0]], torch.float64),
    (torch.tensor([[0.5, 2.0], [1.0, 3.0]], dtype=torch.float16), torch.get_default_dtype()),
])
def test_each_array_keeps_its_dtype_and_a_list_of_rows_is_one_array(array, dtype):
    (t,) = as_data(array)
    assert t.dtype == dtype and t.shape == (2, 2)
    assert np.array_equal(t.double().numpy(), np.asarray(array, dtype=np.float64))


def test_a_tuple_is_the_models_arguments_each_with_its_dtype():
    x, groups, seen = as_data((np.ones((3, 2)), np.array([0, 1, 1]), np.array([True, True, False])))
    assert (x.dtype, groups.dtype, seen.dtype) == (torch.float64, torch.int64, torch.bool)


def _group_params(x):
    return pyro.param("locs", torch.zeros(3, dtype=x.dtype))


def group_model(x, group, seen):
    """z_i ~ N(0, 1), x_i ~ N(loc[group_i] + z_i, 1) for the rows ``seen`` selects, so that
    x_i ~ N(loc[group_i], 2)."""
    assert group.dtype == torch.int64 and seen.dtype == torch.bool  # as the user passed them
    locs = _group_params(x)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        with poutine.mask(mask=seen[i]):
            pyro.sample("x", dist.Normal(locs[group[i]] + z, 1.0), obs=x[i])


def group_guide(x, group, seen):
    """The exact posterior, z_i | x_i ~ N((x_i - loc)/2, 1/2) where seen, the prior elsewhere."""
    locs = _group_params(x)
    with pyro.plate("data", len(x)) as i:
        shift = (x[i] - locs[group[i]]) / 2
        scale = torch.where(seen[i], x.new_tensor(0.5**0.5), x.new_tensor(1.0))
        pyro.sample("z", dist.Normal(torch.where(seen[i], shift, 0.0), scale))


def group_data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n)
    x = rng.normal(np.array([-2.0, 0.5, 3.0])[group], 2**0.5)
    seen = rng.random(n) > 0.2
    return x, group, seen


def test_integer_ids_and_a_boolean_mask_reach_the_model_unchanged():
    """em's objective (tight: the guide is the exact posterior) and log_likelihood are the sums of
    N(loc[group_i], 2) log-densities over the seen rows at the fitted locations (scipy)."""
    pyro.clear_param_store()
    x, group, seen = group_data()
    with pytest.warns(ConvergenceWarning):
        result = freqvi.em(group_model, guide=group_guide, data=(x, group, seen), max_iter=3, progress=False)
    fitted = pyro.param("locs").detach().numpy()
    expected = norm(fitted[group[seen]], 2**0.5).logpdf(x[seen]).sum()
    assert result.log_likelihood[-1] == pytest.approx(expected, abs=1e-8)
    assert result.log_likelihood[-1] > result.log_likelihood[0] + 50  # it moved toward the group means
    ll = freqvi.log_likelihood(group_model, guide=group_guide, data=(x, group, seen), num_samples=2,
                               proposal="guide")
    assert ll.total == pytest.approx(expected, abs=1e-8)
    np.testing.assert_array_equal(ll.per_observation.numpy()[~seen], 0.0)  # a masked row adds nothing


def test_nan_is_refused_unless_marked_missing_and_infinity_always():
    x, group, seen = group_data()
    x[4] = np.nan
    with pytest.raises(FreqviInputError, match=r"NaN at index \(4,\).*freqvi.with_missing"):
        freqvi.fit(group_model, guide=group_guide, data=(x, group, seen), num_steps=1, progress=False)
    x[4] = np.inf
    with pytest.raises(FreqviInputError, match=r"infinite at index \(4,\)\); infinite values are not"):
        as_data((freqvi.with_missing(x), group, seen))
    with pytest.raises(FreqviInputError, match="infinite values are not missing"):
        as_data(freqvi.with_missing((x, group, seen)))


def test_built_in_models_refuse_integer_data_and_marked_missing_cells():
    x = np.random.default_rng(0).normal(size=(30, 2))
    with pytest.raises(FreqviInputError, match=r"floating dtype; got dtype torch\.int64"):
        freqvi.em(GaussianMixture(2, 2), x.round().astype(int), progress=False)
    x[3, 1] = np.nan
    model = GaussianMixture(2, 2)
    with pytest.raises(FreqviInputError, match="this model has no model of missing values"):
        freqvi.em(model, freqvi.with_missing(x), progress=False)
    assert not model.initialized


# ---- PPCA with 15% of entries missing ---------------------------------------------------------------
def ppca_data(n=200, d=5, q=2, frac=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    loading = torch.randn(d, q, generator=g, dtype=torch.float64)
    x = torch.randn(n, q, generator=g, dtype=torch.float64) @ loading.T + 1.0
    x = x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    x[torch.rand(n, d, generator=g, dtype=torch.float64) < frac] = float("nan")
    return x


def ppca_params(x, q=2):
    d = x.shape[1]
    loading = pyro.param("loading", lambda: torch.linspace(-0.3, 0.3, d * q, dtype=x.dtype).reshape(d, q))
    mean = pyro.param("mean", lambda: torch.zeros(d, dtype=x.dtype))
    sd = pyro.param("sd", lambda: torch.ones((), dtype=x.dtype), constraint=constraints.positive)
    return loading, mean, sd


def ppca_model(x):
    """z_i ~ N(0, I_q), x_ij ~ N(mean_j + loading_j z_i, sd^2) for the observed cells only."""
    loading, mean, sd = ppca_params(x)
    seen = ~torch.isnan(x)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([loading.shape[1]]).to_event(1))
        # nan_to_num: a NaN times a zero mask would still poison the gradient
        law = dist.Normal(mean + z @ loading.T, sd).mask(seen[i]).to_event(1)
        pyro.sample("x", law, obs=x[i].nan_to_num())


def ppca_guide(x):
    """The exact posterior of z_i given row i's observed cells O: N(M^-1 W_O' (x_O - mean_O) / sd^2, M^-1),
    M = I + W_O' W_O / sd^2."""
    loading, mean, sd = ppca_params(x)
    seen = ~torch.isnan(x)
    with pyro.plate("data", len(x)) as i:
        m = seen[i].to(x.dtype)
        covariance = torch.linalg.inv(torch.eye(loading.shape[1], dtype=x.dtype)
                                      + (loading.T * m[:, None, :]) @ loading / sd**2)
        residual = (x[i].nan_to_num() - mean) * m
        loc = (covariance @ (loading.T @ residual.unsqueeze(-1))).squeeze(-1) / sd**2
        pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=covariance))


def observed_cells_log_likelihood(x: np.ndarray) -> float:
    """sum_i log N(x_iO; mean_O, W_O W_O' + sd^2 I), from the fitted parameters, row by row in NumPy."""
    loading, mean = pyro.param("loading").detach().numpy(), pyro.param("mean").detach().numpy()
    sd = pyro.param("sd").item()
    total = 0.0
    for row in x:
        o = ~np.isnan(row)
        cov = loading[o] @ loading[o].T + sd**2 * np.eye(o.sum())
        total += multivariate_normal(mean[o], cov).logpdf(row[o])
    return total


@pytest.mark.parametrize("driver", ["em", "fit"])
def test_ppca_with_missing_cells_fits_and_its_likelihood_is_the_observed_cells_marginal(driver):
    pyro.clear_param_store()
    x = ppca_data()
    assert 0.13 < float(torch.isnan(x).double().mean()) < 0.17
    data = freqvi.with_missing(x)
    ppca_params(x)
    start = observed_cells_log_likelihood(x.numpy())
    if driver == "em":
        with pytest.warns(ConvergenceWarning):  # three short M-steps are enough to move far
            result = freqvi.em(ppca_model, guide=ppca_guide, data=data, max_iter=3, m_step_iters=30,
                               m_step_lr=0.1, progress=False)
        reached = result.log_likelihood[-1]  # the exact posterior makes the bound tight
    else:
        result = freqvi.fit(ppca_model, guide=ppca_guide, data=data, lr=0.05, num_steps=300, progress=False)
        reached = result.elbo[-1]
    expected = observed_cells_log_likelihood(x.numpy())
    assert expected > start + 500  # it fitted (-2405 at the start, about -1186 at the MLE)
    assert reached == pytest.approx(expected, abs=1e-6)
    ll = freqvi.log_likelihood(ppca_model, guide=ppca_guide, data=data, num_samples=4, proposal="guide")
    assert ll.total == pytest.approx(expected, abs=1e-6)


def test_streamed_batches_marked_missing_let_nan_through():
    """A DataLoader of a tuple dataset yields lists: each is the batch's arrays."""
    pyro.clear_param_store()
    x = ppca_data(n=40)
    loader = DataLoader(torch.utils.data.TensorDataset(x), batch_size=10)
    with pytest.raises(FreqviInputError, match="non-finite"):
        freqvi.fit(ppca_model, guide=ppca_guide, data=loader, num_steps=2, progress=False)
    result = freqvi.fit(ppca_model, guide=ppca_guide, data=freqvi.with_missing(loader), num_steps=8,
                        progress=False)
    assert np.isfinite(result.elbo).all()


def test_integer_labels_observed_by_a_bernoulli_are_named_in_the_error():
    """Pyro's Bernoulli refuses integer values (as in plain SVI); the error says which array came as given."""
    def logistic_model(y):
        logit = pyro.param("logit", torch.tensor(0.0))
        with pyro.plate("data", len(y)) as i:
            pyro.sample("y", dist.Bernoulli(logits=logit), obs=y[i])

    y = np.array([0, 1, 1, 0, 1])
    with pytest.raises(FreqviInputError, match=r"data\[0\] \(torch.int64\) reached the model as given"):
        freqvi.fit(logistic_model, guide=lambda y: None, data=y, num_steps=1, progress=False)
    result = freqvi.fit(logistic_model, guide=lambda y: None, data=y.astype(np.float32), num_steps=1,
                        progress=False)
    assert result.elbo[0] == pytest.approx(5 * np.log(0.5), rel=1e-6)  # at logit 0 each label has p = 1/2


@pytest.mark.parametrize("make_guide", [AmortizedNormal, LocalMeanField], ids=["amortized", "local"])
def test_freqvis_guides_take_missing_cells_and_stay_below_the_observed_cells_likelihood(make_guide):
    """The default encoder reads a missing cell as its column's mean; a guide's ELBO is a lower bound on
    the observed cells' log-likelihood (NumPy), up to its Monte-Carlo error (4 standard errors)."""
    pyro.clear_param_store()
    x = ppca_data(n=100)
    guide = make_guide(ppca_model)
    freqvi.fit(ppca_model, guide=guide, data=freqvi.with_missing(x), lr=0.05, num_steps=30, progress=False,
               seed=0)
    with torch.no_grad():
        draws = torch.tensor([-Trace_ELBO().loss(ppca_model, guide, x) for _ in range(50)])
    assert torch.isfinite(draws).all()
    bound, se = draws.mean().item(), draws.std().item() / 50**0.5
    assert bound <= observed_cells_log_likelihood(x.numpy()) + 4 * se


def test_a_driver_that_hands_its_data_on_keeps_the_missing_mark():
    """information_criteria checks the data, then calls log_likelihood with them: AIC from the observed
    cells' log-likelihood (NumPy) and the 5 x 2 + 5 + 1 = 16 parameters."""
    pyro.clear_param_store()
    x = ppca_data(n=60)
    ppca_params(x)
    criteria = freqvi.information_criteria(ppca_model, freqvi.with_missing(x), guide=ppca_guide,
                                           num_samples=4, proposal="guide")
    assert criteria.aic == pytest.approx(-2 * observed_cells_log_likelihood(x.numpy()) + 2 * 16, abs=1e-6)
