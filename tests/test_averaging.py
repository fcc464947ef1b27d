"""Parameter averaging in fit: its arithmetic, checkpoints, evaluation, and what it buys statistically.

The model throughout is z_i ~ N(mu, 1), x_i | z_i ~ N(z_i, s^2) with its exact posterior as guide,
z_i | x_i ~ N((mu + x_i / s^2) / (1 + 1/s^2), 1 / (1 + 1/s^2)): the ELBO is then the exact
log-likelihood sum_i log N(x_i; mu, 1 + s^2) for any draw of z, a closed form to check evaluations
against, and the MLE of mu is mean(x).
"""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from scipy.stats import chi2
from simulate import factor_data

import freqvi
from freqvi.cli import main
from freqvi.errors import FreqviInputError
from freqvi.infer import recipes
from freqvi.infer.averaging import EMA, Polyak, as_average
from freqvi.infer.checkpoint import load_checkpoint, stable_name
from freqvi.infer.fit import _VALIDATION_SEED, fit
from freqvi.models import FactorAnalysis

# Named as a module's and a guide's parameters are: sorted with and without instance numbers, the two
# come in opposite orders, so a mix-up of the orders swaps them.
MU, S = "Net_0.mu", "NetGuide_0.s"


def params(x):
    """(mu, s), created by whichever of model and guide runs first."""
    mu = pyro.param(MU, torch.tensor(0.0, dtype=x.dtype))
    return mu, pyro.param(S, torch.tensor(2.0, dtype=x.dtype), constraint=constraints.positive)


def model(x):
    mu, s = params(x)
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, s), obs=x[i])


def guide(x):
    mu, s = params(x)
    precision = 1.0 + s**-2
    with pyro.plate("data", len(x)) as i:
        pyro.sample("z", dist.Normal((mu + x[i] * s**-2) / precision, precision**-0.5))


def log_likelihood(x, mu, s):
    """sum_i log N(x_i; mu, 1 + s^2), in float64."""
    variance = 1.0 + s**2
    return float(np.sum(-0.5 * np.log(2 * math.pi * variance) - 0.5 * (x - mu) ** 2 / variance))


def data(n=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(1.5, math.sqrt(1.0 + 0.8**2), n))


def unconstrained():
    """(mu, log s): the coordinates the optimiser steps in, as floats."""
    store = pyro.get_param_store()
    return tuple(float(store.get_param(n).unconstrained().detach()) for n in (MU, S))


def fit_recording(x, num_steps=12, **options):
    """Fits with batches of 8 (noisy steps); returns the result and the raw iterates after each step."""
    start = []
    pyro.clear_param_store()
    model(x)  # the parameters exist before the fit, so their starting values can be read
    start.append(unconstrained())
    raw = []
    result = freqvi.fit(model, x, guide, num_steps=num_steps, batch_size=8, lr=0.05, seed=1, progress=False,
                        on_step=lambda r: raw.append(unconstrained()), **options)
    return result, np.array(start[0]), np.array(raw)


def test_ema_is_the_warmed_up_recursion_on_the_unconstrained_iterates():
    result, average, raw = fit_recording(data(), average=EMA(decay=0.8))
    for k, theta in enumerate(raw, start=1):
        decay = min(0.8, k / (9 + k))  # TensorFlow's warm-up at the k-th update
        average = decay * average + (1 - decay) * theta
    assert not np.allclose(raw[-1], average, rtol=1e-3)  # the average is not the last iterate
    np.testing.assert_allclose(unconstrained(), average, rtol=1e-12)
    assert float(pyro.param(S).detach()) == pytest.approx(math.exp(average[1]), rel=1e-12)  # as log s
    assert result.average == EMA(decay=0.8)
    assert "averaged by EMA(decay=0.8, warmup=True, leave_raw=False); the average left" in repr(result)


def test_ema_without_warmup_and_polyak_from_a_step():
    _, average, raw = fit_recording(data(), average=EMA(decay=0.7, warmup=False))
    for theta in raw:
        average = 0.7 * average + 0.3 * theta
    np.testing.assert_allclose(unconstrained(), average, rtol=1e-12)
    _, _, raw = fit_recording(data(), average=Polyak(start=5))
    np.testing.assert_allclose(unconstrained(), raw[4:].mean(axis=0), rtol=1e-12)  # steps 5..12


@pytest.mark.parametrize("average", [EMA(decay=0.8, leave_raw=True), Polyak(start=100)])
def test_the_raw_iterate_is_left_on_request_or_before_averaging_starts(average):
    _, _, raw = fit_recording(data(), average=average)
    assert unconstrained() == tuple(raw[-1])


def test_the_names_and_bad_options():
    assert as_average("ema") == EMA(decay=0.999, warmup=True)
    assert as_average("polyak") == Polyak(start=1)
    with pytest.raises(FreqviInputError, match=r"average must be None, one of \['ema', 'polyak'\].*'swa'"):
        freqvi.fit(model, data(), guide, num_steps=2, average="swa", progress=False)
    with pytest.raises(FreqviInputError, match=r"strictly between 0 and 1; got 1\.0"):
        EMA(decay=1.0)
    with pytest.raises(FreqviInputError, match="integer step >= 1; got 0"):
        Polyak(start=0)
    with pytest.raises(FreqviInputError, match="leave_raw must be True or False; got 'yes'"):
        EMA(leave_raw="yes")


def test_held_out_evaluation_and_the_parameters_kept_are_the_averaged_ones():
    x, held_out = data(), data(n=30, seed=5)
    result = freqvi.fit(model, x, guide, num_steps=30, batch_size=8, lr=0.05, seed=1, progress=False,
                        validation_data=held_out, eval_every=5, average=EMA(decay=0.9))
    mu, s = float(pyro.param(MU).detach()), float(pyro.param(S).detach())
    best = result.validation_elbo[result.validation_steps.index(result.best_step)]
    # the exact guide makes the held-out ELBO the closed-form log-likelihood at the parameters evaluated
    assert best == pytest.approx(log_likelihood(held_out.numpy(), mu, s), rel=1e-10)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(_VALIDATION_SEED)
        assert -pyro.infer.Trace_ELBO().loss(model, guide, held_out) == pytest.approx(best, rel=1e-12)


def test_leave_raw_keeps_the_iterate_of_the_best_averaged_evaluation():
    held_out = data(n=30, seed=5)
    result, _, raw = fit_recording(data(), num_steps=30, validation_data=held_out, eval_every=5,
                                   average=EMA(decay=0.9, leave_raw=True))
    assert unconstrained() == tuple(raw[result.best_step - 1])
    mu, s = (float(pyro.param(n).detach()) for n in (MU, S))
    best = result.validation_elbo[result.validation_steps.index(result.best_step)]
    assert best != pytest.approx(log_likelihood(held_out.numpy(), mu, s), rel=1e-6)  # evaluated: the average


def run(num_steps, **options):
    """A minibatched fit of a fresh factor model with its free guide, from seed 0 (as in test_checkpoints)."""
    fa = FactorAnalysis(5, 2)
    result = freqvi.fit(fa.model, factor_data(n=60), fa.mean_field_guide(), num_steps=num_steps,
                        batch_size=16, lr=0.02, seed=0, progress=False, **options)
    return {k: v.clone() for k, v in fa.estimates().items()}, result


@pytest.mark.parametrize("average", [EMA(decay=0.9), Polyak(start=15)])
def test_resume_with_averaging_is_bit_exact_and_saves_the_average_left(tmp_path, average):
    whole, whole_result = run(40, average=average)
    halfway = tmp_path / "half.ckpt"
    pyro.clear_param_store()
    run(21, checkpoint=halfway, average=average)
    state = load_checkpoint(halfway)[0]
    store = pyro.get_param_store()
    left = {stable_name(n): store.get_param(n).unconstrained().detach() for n in store.keys()}
    assert set(left) == set(state["average"]["values"])
    for name, value in state["average"]["values"].items():  # the average saved is the one left in the model
        assert torch.equal(value, left[name]), name
    assert not all(torch.equal(state["average"]["values"][n], state["params"][n]) for n in state["params"])
    resumed, result = run(40, resume=halfway, average=average)
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name
    assert result.elbo == whole_result.elbo


def test_resuming_with_other_averaging_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(5, checkpoint=path)
    with pytest.raises(FreqviInputError, match="resume with the same estimator"):
        run(10, resume=path, average="ema")
    run(5, checkpoint=path, average="ema")
    with pytest.raises(FreqviInputError, match="resume with the same estimator"):
        run(10, resume=path, average=EMA(decay=0.99))


def test_a_checkpoint_whose_average_was_edited_is_refused(tmp_path):
    path = tmp_path / "fit.ckpt"
    run(5, checkpoint=path, average="ema")
    state, metadata = load_checkpoint(path)
    name = next(iter(state["average"]["values"]))
    state["average"]["values"][name] = state["average"]["values"][name][..., :1]
    del metadata["sha256"], metadata["format"]
    freqvi.infer.checkpoint.save_checkpoint(path, state, metadata)
    with pytest.raises(FreqviInputError, match="holds no usable parameter average"):
        run(10, resume=path, average="ema")


def unit_model(x):
    """The model above with s = 1: the question's model, its MLE mean(x)."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
    with pyro.plate("data", len(x)) as i:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[i])


def unit_guide(x):
    with pyro.plate("data", len(x)) as i:
        mu = pyro.param("mu", torch.tensor(0.0, dtype=x.dtype))
        pyro.sample("z", dist.Normal((mu + x[i]) / 2, 0.5**0.5))


def error_weights(a, num_steps, start):
    """Weights c_j of the minibatch errors e_1..e_T in the error of the last iterate and of the average of
    iterates start..T, for mu_t - m = (1 - a)(mu_{t-1} - m) + a e_t (the start's weight being negligible)."""
    lag = np.arange(num_steps)[:, None] - np.arange(num_steps)[None, :]
    decay = np.where(lag >= 0, (1 - a) ** np.clip(lag, 0, None), 0.0)  # [t, j]: e_j in mu_t - m, over a
    return a * decay[-1], a * decay[start - 1:].mean(axis=0)


@pytest.mark.slow
def test_polyak_average_is_closer_to_the_mle_than_the_last_iterate():
    """Constant-step SGD, each step on b rows drawn with replacement: the step on mu is
    mu_t = mu_{t-1} + lr (n / 2)(xbar_t - mu_{t-1}), so with a = lr n / 2 and m = mean(x) the MLE,
    mu_t - m = (1 - a)(mu_{t-1} - m) + a e_t, e_t = xbar_t - m iid with variance v = mean((x - m)^2) / b.
    Both errors are then sums sum_j c_j e_j (weights in ``error_weights``), with variances v sum_j c_j^2:
    0.111 v for the last iterate at a = 0.2, 0.0049 v for the average of the last 200 iterates. Over
    20 seeds, each error squared over its variance sums to a chi-square with 20 degrees of freedom:
    both sums are checked within its band of tail probability 3.2e-5 a side (a normal's 4 s.e.),
    [3.8, 55.7], which also puts the average's mean square error at most 55.7 / 20 * 0.0049 = 0.014 v,
    below the last iterate's least, 3.8 / 20 * 0.111 = 0.021 v.
    """
    n, b, a, num_steps, start = 100, 10, 0.2, 250, 51
    last_weights, average_weights = error_weights(a, num_steps, start)
    last, averaged = [], []
    for seed in range(20):
        x = data(n=n, seed=100 + seed)
        v = float(x.var(unbiased=False)) / b
        m = float(x.mean())
        runs = ((None, last, last_weights), (Polyak(start), averaged, average_weights))
        for average, errors, weights in runs:
            pyro.clear_param_store()
            rows = np.random.default_rng(seed)
            batches = (x[rows.integers(0, n, b)] for _ in range(num_steps))
            freqvi.fit(unit_model, batches, unit_guide, num_steps=num_steps, num_observations=n, optim="sgd",
                       lr=2 * a / n, seed=seed, progress=False, average=average)
            errors.append((float(pyro.param("mu").detach()) - m) ** 2 / (v * np.sum(weights**2)))
    low, high = chi2.ppf([3.2e-5, 1 - 3.2e-5], df=20)
    assert low < sum(last) < high
    assert low < sum(averaged) < high
    assert np.mean(averaged) * np.sum(average_weights**2) < np.mean(last) * np.sum(last_weights**2)


DIFFUSION_QUICK = ["diffusion", "--quiet", "--steps", "20", "--diffusion-steps", "20", "--hidden", "16",
                   "--samples", "200"]


def test_freqvi_diffusion_samples_and_evaluates_the_ema(tmp_path, monkeypatch):
    """The subcommand's model holds the average of the EMA its --ema-decay names, recorded in metrics.json."""
    fits = []
    monkeypatch.setattr(recipes, "fit", lambda *args, **given: fits.append(given) or fit(*args, **given))
    assert main([*DIFFUSION_QUICK, "--ema-decay", "0.99", "--out", str(tmp_path / "ema")]) == 0
    assert main([*DIFFUSION_QUICK, "--ema-decay", "0", "--out", str(tmp_path / "raw")]) == 0
    assert [options["average"] for options in fits] == [EMA(decay=0.99), None]
    for name, decay in (("ema", 0.99), ("raw", 0.0)):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["fit"]["ema_decay"] == decay


def test_freqvi_diffusion_refuses_a_decay_outside_0_1(tmp_path, capsys):
    assert main([*DIFFUSION_QUICK, "--ema-decay", "1.5", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()  # a usage error, as argparse reports one
    assert out == "" and "argument --ema-decay: expected a finite number >= 0 and < 1; got '1.5'" in err
    assert not (tmp_path / "out").exists()  # refused before any work
