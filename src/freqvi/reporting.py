"""One convention for the numbers that ``freqvi``'s reports print and write (the console command, the tour).

Every number says its unit, and every standard error is on the scale of the number it
accompanies and says which spread it measures:

* the **Monte-Carlo** standard error: how much the estimate would move with other random
  draws (importance samples, ELBO draws, noise draws) for the same observations; more draws
  shrink it;
* the **sampling** standard error, over the test observations: the standard deviation of the
  per-observation values over :math:`\\sqrt n`, how much the mean would move with another
  test set of the same size (it holds the Monte-Carlo noise of each value too); more test
  observations shrink it;
* the **observed-information** standard error of a parameter estimate (Wald), on the
  parameter's own scale.

In JSON a number's key ends with its unit (:data:`UNITS`): ``total``, ``per_observation``,
``nats_per_dim``, ``bits_per_dim``, ``estimate``; a standard error's key is ``<kind>_standard_error_<unit>``
with ``<kind>`` one of :data:`STANDARD_ERRORS`, beside the number of that unit it belongs to.
Each report's JSON carries this legend under ``"conventions"`` (:func:`conventions`).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

#: The unit each key suffix stands for.
UNITS = {
    "total": "nats, summed over the observations evaluated",
    "per_observation": "nats per observation (the total over the number of observations)",
    "nats_per_dim": "nats per observation and data dimension",
    "bits_per_dim": "bits per observation and data dimension (nats over log 2)",
    "estimate": "the scale of the parameter estimated",
}

#: What each kind of standard error measures.
STANDARD_ERRORS = {
    "monte_carlo": "the spread of the estimate over its random draws, the observations held fixed",
    "sampling": "the standard deviation of the per-observation values over sqrt(n): the spread of the "
                "mean over test sets of the same size (it includes each value's Monte-Carlo noise)",
    "observed_information": "a parameter estimate's, from the observed information of the exact "
                            "log-likelihood at the estimate: its spread over repeated samples (Wald), "
                            "valid at a maximum of the likelihood",
}


def conventions() -> dict:
    """The legend of units and standard-error kinds that a report's JSON carries."""
    return {"units": dict(UNITS), "standard_errors": dict(STANDARD_ERRORS)}


def sampling_standard_error(values: torch.Tensor) -> float:
    """:math:`\\mathrm{sd}(v) / \\sqrt n` of the per-observation ``values`` ``(n,)``, in float64 (NaN if
    ``n < 2``)."""
    values = torch.as_tensor(values).detach().double().reshape(-1)
    if len(values) < 2:
        return math.nan
    return float(values.std(correction=1) / math.sqrt(len(values)))


def held_out(total: float, monte_carlo_se_total: float, per_observation: torch.Tensor | None,
             n: int) -> dict:
    """An estimate summed over ``n`` observations, as JSON: the total and the mean per observation,
    each with its Monte-Carlo standard error, and the mean's sampling standard error (from the
    ``per_observation`` values ``(n,)``; absent when they do not exist).

    Keys: ``total``, ``monte_carlo_standard_error_total``, ``mean_per_observation``,
    ``monte_carlo_standard_error_per_observation`` (the total's over ``n``) and
    ``sampling_standard_error_per_observation``.
    """
    entry = {"total": total, "monte_carlo_standard_error_total": monte_carlo_se_total,
             "mean_per_observation": total / n,
             "monte_carlo_standard_error_per_observation": monte_carlo_se_total / n}
    if per_observation is not None:
        entry["sampling_standard_error_per_observation"] = sampling_standard_error(per_observation)
    return entry


def with_errors(value: float, unit: str, errors: list[tuple[str, float]], digits: int = 3) -> str:
    """``value`` with its ``unit`` and its standard errors, each named by its kind, as text.

    ``errors``: ``(kind, standard error)`` pairs, the kind as it should read, before the value
    (``"Monte-Carlo"``) or, starting with ``"over "``, after it (``"over the 297 test images"``);
    NaN entries are left out. E.g.
    ``-16.547 nats per image (Monte-Carlo s.e. 0.009; s.e. 0.312 over the 297 test images)``.
    """
    shown = [f"{kind} s.e. {error:.{digits}f}" if not kind.startswith("over ")
             else f"s.e. {error:.{digits}f} {kind}" for kind, error in errors if not math.isnan(error)]
    return f"{value:.{digits}f} {unit}" + (f" ({'; '.join(shown)})" if shown else "")


def importance_estimate(loglik, n: int) -> dict:
    """A :class:`~freqvi.LogLikelihood` of ``n`` observations as JSON: :func:`held_out`'s keys, the
    method, the proposal used (by name), ``K`` and PSIS :math:`\\hat k`: the largest, and the shares
    of observations above 0.7 and not estimable."""
    return {**held_out(loglik.total, loglik.standard_error, loglik.per_observation, n),
            "method": loglik.method, "proposal": loglik.proposal, "num_samples": loglik.num_samples,
            "pareto_k_max": loglik.max_pareto_k,
            "pareto_k_fraction_above_0.7": loglik.num_heavy_tailed / n,
            "pareto_k_fraction_unestimable": loglik.num_unestimable / n}


def pareto_k_text(entry: dict, item: str = "observation") -> str:
    """What PSIS :math:`\\hat k` of an :func:`importance_estimate` entry says about its number, as text.

    Above 0.7 an observation's weights are so heavy-tailed that the draws have likely missed
    their largest values: as :math:`\\mathbb E \\log \\hat p(x) \\le \\log p(x)` (Jensen, the mean
    of the weights being unbiased), its estimate is then likely too low by more than its
    standard error says, and so is the mean over observations.
    """
    share, largest = entry["pareto_k_fraction_above_0.7"], entry["pareto_k_max"]
    unestimable = entry["pareto_k_fraction_unestimable"]
    if share:
        text = (f"PSIS k-hat above 0.7 for {share:.1%} of {item}s (max {largest:.2f}): their estimates "
                "cannot be trusted and are likely too low (importance sampling underestimates log p(x) on "
                "average), so the mean is likely too low by more than its standard error says; annealed "
                "importance sampling, freqvi.log_likelihood(..., method='ais'), checks them")
    elif unestimable == 1:
        return (f"PSIS k-hat could not be estimated for any {item} (tied or too few weights): nothing says "
                "whether the estimates can be trusted")
    elif largest == -math.inf:
        text = "constant importance weights: the proposal is the exact posterior and the estimate exact"
    else:
        where = f"every {item}" + (" where it could be estimated" if unestimable else "")
        text = (f"PSIS k-hat at most 0.7 for {where} (max {largest:.2f}): those estimates and their standard "
                "errors can be trusted")
    if unestimable:
        text += f"; k-hat not estimable for {unestimable:.1%} of {item}s (tied or too few weights)"
    return text


def to_json(report: dict) -> str:
    """``report`` as strict JSON (RFC 8259), indented: tensors and arrays as lists, NumPy scalars as
    numbers, and a number that is not finite (an unestimable k-hat's NaN) as ``null``, since ``NaN``
    and ``Infinity`` are not JSON and strict parsers (JavaScript's, ``jq``) refuse the whole file."""
    return json.dumps(_finite_or_null(report), indent=2, allow_nan=False) + "\n"


def _finite_or_null(value):
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
