"""Model choice: AIC and BIC with the right parameter count, and a comparison of candidates."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

from freqvi.errors import FreqviInputError
from freqvi.infer.em import em
from freqvi.infer.information import Parameters
from freqvi.infer.log_likelihood import log_likelihood
from freqvi.infer.pair import resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.traces import check_model, param_names
from freqvi.validation import as_data, check_positive_int, check_seed, kept_on_refusal


@dataclass
class InformationCriteria:
    r"""Akaike's and Schwarz's criteria of a fitted model; smaller is better.

    :ivar log_likelihood: :math:`\ell(\hat\theta)` (exact, or importance-sampled).
    :ivar num_parameters: ``k``, the free parameters (see :func:`information_criteria`).
    :ivar num_observations: ``n``, the size of the data plate.
    """

    log_likelihood: float
    num_parameters: int
    num_observations: int

    @property
    def aic(self) -> float:
        """:math:`-2 \\ell + 2k` (Akaike 1974)."""
        return -2 * self.log_likelihood + 2 * self.num_parameters

    @property
    def bic(self) -> float:
        """:math:`-2 \\ell + k \\log n` (Schwarz 1978)."""
        return -2 * self.log_likelihood + self.num_parameters * math.log(self.num_observations)


@thread_policy
def information_criteria(model, data, guide=None, *, num_samples: int = 1000,
                         seed: int | None = None, proposal="auto") -> InformationCriteria:
    """AIC and BIC of a fitted model at its current parameters.

    The log-likelihood is :func:`~freqvi.log_likelihood`'s (exact where the model
    allows, else importance sampling with ``num_samples`` draws from ``proposal``, built
    from the guide, any Pyro guide but a point mass; the joint total for latents outside
    the data plate).
    The parameter count is the model's own ``num_parameters`` where it states one
    (a freqvi model does, leaving out non-identified directions such as a factor
    model's rotations), else the number of free directions of the model's
    ``pyro.param`` sites (a softmax's shift and a Cholesky factor's upper triangle
    do not count). It is structural: a count read off the curvature at the
    estimate would drop nearly redundant components and favour overfitting.
    """
    data = as_data(data)
    num_samples, seed = check_positive_int(num_samples, "num_samples"), check_seed(seed)
    loglik = log_likelihood(model, data, guide, num_samples=num_samples, seed=seed, proposal=proposal)
    return InformationCriteria(loglik.total, _num_parameters(model, guide, data), data[0].shape[0])


def _num_parameters(model, guide, data) -> int:
    pair = resolve_pair(model, guide, require_guide=False)
    if pair.owner is not None and hasattr(pair.owner, "num_parameters"):
        return pair.owner.num_parameters
    return Parameters.of(param_names(check_model(pair.model, data))).basis().shape[1]


@thread_policy
def compare(candidates: Mapping[str, object], data, *, fit: Callable = em, num_samples: int = 1000,
            seed: int | None = None, **fit_options):
    """Fits each candidate model to ``data`` and tabulates their criteria, best BIC first.

    :param candidates: name -> a freqvi model or a ``(model, guide)`` pair (any Pyro guide,
        autoguides included), e.g. ``{f"K={k}": GaussianMixture(k, d) for k in range(1, 6)}``.
    :param fit: the driver, :func:`~freqvi.em` by default; ``fit_options`` go to it.
    :returns: a ``pandas.DataFrame`` indexed by name, with the log-likelihood,
        parameter count, AIC, BIC and each BIC's difference to the smallest.
    :raises FreqviInputError: before any fit, for ``candidates`` that are not a non-empty mapping of
        names to models, a ``fit`` that is not callable, a bad ``num_samples`` or ``seed``; a refused
        fit refused (a :class:`~freqvi.errors.FreqviInputError`) puts every candidate's parameters back
        as they were; a
        fit failing otherwise leaves the candidates fitted before it fitted.
    """
    import pandas as pd  # ArviZ's dependency; imported when a table is asked for

    _check_candidates(candidates, fit)
    num_samples, seed = check_positive_int(num_samples, "num_samples"), check_seed(seed)
    data = as_data(data)
    rows = {}
    with ExitStack() as kept:  # a candidate refused leaves every candidate as it was, not only itself
        for model in candidates.values():
            kept.enter_context(kept_on_refusal(model))
        for name, model in candidates.items():
            fit(model, data, **{"seed": seed, "progress": False, **fit_options})  # a user's options win
            criteria = information_criteria(model, data, num_samples=num_samples, seed=seed)
            rows[name] = {"log_likelihood": criteria.log_likelihood,
                          "num_parameters": criteria.num_parameters, "aic": criteria.aic, "bic": criteria.bic}
    table = pd.DataFrame.from_dict(rows, orient="index").sort_values("bic")
    table["delta_bic"] = table["bic"] - table["bic"].min()
    return table


def _check_candidates(candidates, fit) -> None:
    """Raises unless ``candidates`` maps names (the table's index) to models, at least one, and ``fit`` is
    callable."""
    if not isinstance(candidates, Mapping) or not candidates:
        found = "an empty mapping" if isinstance(candidates, Mapping) else type(candidates).__name__
        raise FreqviInputError("compare: candidates must be a non-empty dict of name -> model (or "
                               f"(model, guide) pair), e.g. {{'K=2': GaussianMixture(2, d)}}; got {found}.")
    if not callable(fit):
        raise FreqviInputError(f"compare: fit must be a driver such as freqvi.em; got {fit!r}.")
