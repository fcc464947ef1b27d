"""The bootstrap: refits on resampled or simulated data, in parallel processes."""

from __future__ import annotations

import copy
import multiprocessing
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine

from freqvi.errors import ConvergenceWarning, FreqviInputError
from freqvi.infer.em import em
from freqvi.infer.pair import resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.validation import as_data, check_choice, check_positive_int

KINDS = ("nonparametric", "parametric")


@dataclass
class Bootstrap:
    """What :func:`bootstrap` returns.

    :ivar estimate: the fitted model's estimates under their statistical names.
    :ivar draws: each estimate refitted on every replicate, shape ``(R, *estimate.shape)``.
    :ivar converged: whether each replicate's fit met its tolerance, shape ``(R,)``.
    :ivar kind: ``"nonparametric"`` or ``"parametric"``.
    """

    estimate: dict[str, np.ndarray]
    draws: dict[str, np.ndarray]
    converged: np.ndarray
    kind: str

    def standard_errors(self) -> dict[str, np.ndarray]:
        """The replicates' standard deviations."""
        return {name: draws.std(0, ddof=1) for name, draws in self.draws.items()}

    def percentile_interval(self, level: float = 0.95) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Efron's percentile interval: the replicates' ``(1 -+ level) / 2`` quantiles."""
        tail = (1 - level) / 2
        return {name: (np.quantile(d, tail, axis=0), np.quantile(d, 1 - tail, axis=0))
                for name, d in self.draws.items()}

    def summary(self, level: float = 0.95):
        """A ``pandas.DataFrame``: estimate, bootstrap standard error and percentile interval per entry."""
        import pandas as pd  # ArviZ's dependency; imported when a table is asked for

        errors, (lower, upper) = self.standard_errors(), zip(*self.percentile_interval(level).values(),
                                                           strict=True)
        rows = []
        for (name, est), low, high in zip(self.estimate.items(), lower, upper, strict=True):
            for index in np.ndindex(est.shape):
                label = name + (str(list(index)) if index else "")
                rows.append({"parameter": label, "estimate": est[index], "std_err": errors[name][index],
                             f"[{(1 - level) / 2:g}": low[index], f"{(1 + level) / 2:g}]": high[index]})
        return pd.DataFrame(rows).set_index("parameter")

    def to_inference_data(self):
        """The replicates as an :class:`arviz.InferenceData`, one chain of ``R`` draws.

        They sit in the ``posterior`` group, the one ``arviz.summary`` and ArviZ's
        plots read; they are bootstrap replicates of the estimator, not a posterior.
        """
        import arviz as az  # deferred: importing ArviZ is slow

        return az.from_dict(posterior={name: d[None] for name, d in self.draws.items()})


@thread_policy
def bootstrap(model, data, *, num_replicates: int = 200, kind: str = "nonparametric", fit: Callable = em,
              num_workers: int | None = None, seed: int = 0, **fit_options) -> Bootstrap:
    r"""Refits a fitted freqvi model on ``num_replicates`` bootstrap data sets.

    * nonparametric: the observations (rows of the data plate) drawn with replacement;
    * parametric: data simulated from the fitted model, its observed sites sampled.

    Each replicate starts from the estimate :math:`\hat\theta` (warm start, so it
    converges fast and keeps the estimate's labelling of mixture components in
    all but rare cases) and is fitted by ``fit`` (:func:`~freqvi.em` by default,
    ``fit_options`` passed on). Replicates run in ``num_workers`` processes
    (default: one per CPU), each single-threaded; replicate ``r`` draws its data
    from its own seed, so the result does not depend on the number of workers.

    :param model: a fitted freqvi model (its estimates are the starting point).
    :param data: the data it was fitted to; arrays whose first dimension is the
        number of observations are resampled together.
    """
    check_choice(kind, "kind", KINDS)
    num_replicates = check_positive_int(num_replicates, "num_replicates", minimum=2)
    num_workers = check_positive_int(num_workers or os.cpu_count() or 1, "num_workers")
    data = as_data(data)
    pair = resolve_pair(model)
    owner = pair.owner
    seeds = np.random.SeedSequence(seed).generate_state(num_replicates)
    jobs = [(owner, data, kind, int(s), fit, fit_options) for s in seeds]
    # Always in worker processes, each single-threaded, so results do not depend on the number
    # of workers and the caller's parameter store is untouched. Spawned, not forked: forking a
    # process whose OpenMP threads have run can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_single_threaded) as pool:
        results = list(pool.map(_replicate, jobs))
    estimate = {name: value.numpy() for name, value in owner.estimates().items()}
    draws = {name: np.stack([r[0][name] for r in results]) for name in estimate}
    return Bootstrap(estimate, draws, np.array([r[1] for r in results]), kind)


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _replicate(job) -> tuple[dict[str, np.ndarray], bool]:
    """Fits a copy of the model, warm-started at the estimate, to one bootstrap data set."""
    owner, data, kind, seed, fit, fit_options = job
    pyro.clear_param_store()  # each replicate's copy keeps its own values, not a previous one's
    pyro.set_rng_seed(seed)
    model = copy.deepcopy(owner)
    resampled = _resample(data) if kind == "nonparametric" else _simulate(model, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per replicate instead
        result = fit(model, resampled, progress=False, **fit_options)
    converged = bool(getattr(result, "converged", True))
    return {name: value.numpy() for name, value in model.estimates().items()}, converged


def _resample(data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    n = data[0].shape[0]
    index = torch.randint(n, (n,))
    return tuple(x[index] if x.dim() and x.shape[0] == n else x for x in data)


def _simulate(model, data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The data with each observed array replaced by a draw from the fitted model.

    An observed site is matched to the data array it observes (``obs=x[i]`` over
    the full plate equals ``x``); that array is replaced by the site's draw.
    """
    with torch.no_grad(), poutine.block():
        observed = poutine.trace(model.model).get_trace(*data)
        simulated = poutine.trace(poutine.uncondition(model.model)).get_trace(*data)
    out = list(data)
    for name, site in observed.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value = site["value"]
        match = [j for j, x in enumerate(data) if x.shape == value.shape and torch.equal(x, value)]
        if not match:
            raise FreqviInputError(
                f"parametric bootstrap: the observed site {name!r} does not observe one of the data "
                "arrays whole; use kind='nonparametric' for this model."
            )
        out[match[0]] = simulated.nodes[name]["value"].to(data[match[0]].dtype)
    return tuple(out)
