"""Observed information of a fitted model: exact, by Louis's identity, and the sandwich."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from torch.autograd.functional import hessian, jacobian
from torch.distributions import constraints, transform_to

from freqvi.errors import ConvergenceWarning, FreqviInputError, FreqviWarning, ImportanceSamplingWarning
from freqvi.infer.log_likelihood import (
    PARETO_K_THRESHOLD,
    ImportanceWeights,
    exact_route,
    pareto_k_hat,
)
from freqvi.infer.pair import Pair, resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.infer.vectorize import check_particles
from freqvi.traces import (
    check_model,
    check_pair,
    check_proposal,
    data_plate,
    latent_sites,
    max_plate_nesting,
    outside_data_plate,
    param_names,
    trace,
)
from freqvi.validation import as_data, check_choice, check_positive_int, check_seed

METHODS = ("auto", "exact", "louis")
KINDS = ("observed", "sandwich")


class IdentifiabilityWarning(FreqviWarning):
    """The log-likelihood is flat along some directions: those parameters have no standard error."""


class BoundaryWarning(FreqviWarning):
    """A parameter sits on the boundary of its space, where Wald intervals are not valid."""


class NotAMaximumWarning(FreqviWarning):
    """The score is not zero at the estimate: it is not a maximum, and Wald intervals do not apply."""


@dataclass
class Parameters:
    """The model's parameters as one flat vector of unconstrained coordinates.

    Pyro stores each parameter unconstrained, and not every coordinate is free: a
    simplex's softmax ignores a common shift, a ``lower_cholesky`` constraint its
    upper triangle. :meth:`basis` spans the directions that change the
    constrained values; information, covariances and parameter counts live there.
    """

    names: list[str]
    unconstrained: list[torch.Tensor]
    constraints: list

    @classmethod
    def of(cls, names) -> Parameters:
        store = pyro.get_param_store()
        names = sorted(names)
        return cls(names, [store.get_param(n).unconstrained().detach().clone() for n in names],
                   [store._constraints[n] for n in names])

    @property
    def vector(self) -> torch.Tensor:
        return torch.cat([u.reshape(-1) for u in self.unconstrained])

    def values(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Constrained parameter values at the unconstrained ``vector``."""
        out, start = {}, 0
        for name, u, c in zip(self.names, self.unconstrained, self.constraints, strict=True):
            out[name] = transform_to(c)(vector[start:start + u.numel()].reshape(u.shape))
            start += u.numel()
        return out

    def basis(self) -> torch.Tensor:
        """Orthonormal basis ``(P, r)`` of the coordinates' directions that move the constrained values."""
        def constrained(v: torch.Tensor) -> torch.Tensor:
            return torch.cat([value.reshape(-1) for value in self.values(v).values()])

        jac = jacobian(constrained, self.vector).double()  # (M, P)
        _, singular, vh = torch.linalg.svd(jac, full_matrices=False)
        return vh[singular > _RTOL * singular.max()].T


@dataclass
class Information:
    r"""The observed information :math:`I = -\nabla^2 \ell(\hat\theta)` and what follows from it.

    Computed in the unconstrained coordinates of :class:`~freqvi.infer.information.Parameters` (a
    variance's log, a simplex's logits, ...) and restricted to the directions
    that change the model (:meth:`~freqvi.infer.information.Parameters.basis`, ``B``). Standard errors are
    reported on the scale the user reads (the model's statistical names) by the
    delta method, :math:`\mathrm{Cov}(g(\hat u)) = J\, B (B^\top I B)^{-1} B^\top J^\top`,
    :math:`J = \partial g / \partial u`.

    Flat directions (the likelihood does not see them: a rotation of factor
    loadings, a variance held on a floor) get no standard error. The same rule
    serves every pair, whatever its model:

    * exact information: a curvature within ``1e-7`` of the largest;
    * Monte-Carlo information (Louis's identity, ``score_replicates`` given): along a
      flat direction each observation's score :math:`\nabla_v \ell_i` is 0, so its
      Fisher-identity estimate is Monte-Carlo noise alone. A direction is flat when
      :math:`\sum_i (\hat s_i^\top v)^2` is within 4 standard deviations of its
      noise :math:`\sum_i \mathrm{Var}(\hat s_i^\top v)` (the replicates' spread); the
      directions are the generalised eigenvectors of the two matrices. Along a
      curved direction the scores carry the Fisher information, about ``K_eff``
      times their noise. An entry is moved by a flat direction when its component
      there exceeds 4 jackknife standard errors (over 8 groups of observations).

    :ivar matrix: :math:`I` in all unconstrained coordinates, shape ``(P, P)``, float64.
    :ivar scores: per-observation scores :math:`\nabla \ell_i(\hat\theta)`, shape ``(n, P)``;
        ``None`` when a latent site outside the data plate couples the observations.
    :ivar method: ``"exact"`` (autograd Hessian of the exact log-likelihood) or
        ``"louis"`` (Louis's identity with importance-sampled posterior expectations).
    :ivar score_replicates: independent Monte-Carlo replicates of ``scores``,
        ``(R, n, P)`` with ``scores`` their mean, or ``None`` for exact scores.
    """

    matrix: torch.Tensor
    scores: torch.Tensor
    method: str
    parameters: Parameters
    pair: Pair
    score_replicates: torch.Tensor | None = None

    def __post_init__(self):
        self.boundary = _warn_on_boundary(self.parameters, self.pair)
        self.basis = self.parameters.basis()
        self._reduced = self.basis.T @ self.matrix @ self.basis
        self._jackknife = None
        if self.score_replicates is None:
            values, vectors = torch.linalg.eigh(self._reduced)
            self._flat = vectors[:, values.abs() <= _RTOL * values.abs().max()]
        else:
            replicates = self.score_replicates @ self.basis
            self._flat = _flat_by_scores(replicates)
            count = self._flat.shape[1]
            self._jackknife = [_flat_by_scores(replicates[:, keep], count) for keep in _jackknife_groups(
                replicates.shape[1])]
        self._curved = _complement(self._flat)
        curved = self._curved.T @ self._reduced @ self._curved
        self._inverse = self._curved @ torch.linalg.pinv(curved, hermitian=True) @ self._curved.T
        if (torch.linalg.eigvalsh(curved) < 0).any():
            warnings.warn(
                "the observed information is not positive definite: the parameters are not at a "
                "maximum of the likelihood; fit to convergence (e.g. a smaller tol) first.",
                ConvergenceWarning,
                stacklevel=3,
            )

    def _touched(self, jacobian: torch.Tensor) -> torch.Tensor:
        """Which entries (rows of ``jacobian`` ``(m, P)``) a flat direction moves, ``(m,)`` bool."""
        reduced = jacobian @ self.basis  # (m, r)
        along = (reduced @ self._flat).norm(dim=-1)
        if self._jackknife is None:
            return along > _RTOL ** 0.5 * reduced.norm(dim=-1)
        leave_outs = torch.stack([(reduced @ flat).norm(dim=-1) for flat in self._jackknife])
        groups = leave_outs.shape[0]
        error = ((groups - 1) / groups * (leave_outs - leave_outs.mean(0)).square().sum(0)).sqrt()
        return along > _MC_Z * error

    @property
    def num_parameters(self) -> int:
        """Identified free parameters: the basis' size less the flat directions of the likelihood."""
        return self.basis.shape[1] - self._flat.shape[1]

    def covariance(self, kind: str = "observed") -> torch.Tensor:
        r"""Covariance of the unconstrained coordinates: :math:`I^{-1}`, or the sandwich.

        Inverses are taken in the basis of free directions. :math:`B = \sum_i s_i
        s_i^\top` from the per-observation scores; the sandwich stays valid when
        the model is misspecified (Huber 1967; White 1982). Flat directions of the
        log-likelihood (non-identified parameters) get a pseudo-inverse, and
        :meth:`standard_errors` reports NaN for what they touch.
        """
        check_choice(kind, "kind", KINDS)
        if kind == "sandwich" and self.scores is None:
            raise FreqviInputError("the sandwich needs per-observation scores, which do not exist when a "
                                   "latent site outside the data plate couples the observations; use "
                                   "kind='observed'.")
        inverse = self._inverse
        if kind == "sandwich":
            reduced_scores = self.scores @ self.basis
            inverse = inverse @ (reduced_scores.T @ reduced_scores) @ inverse
        return self.basis @ inverse @ self.basis.T

    def standard_errors(self, kind: str = "observed") -> dict[str, torch.Tensor]:
        """Standard errors under the statistical names, each with its estimate's shape.

        Entries that move along a flat direction of the log-likelihood are NaN,
        with an :class:`~freqvi.infer.information.IdentifiabilityWarning` that names them.
        """
        self._warn_unless_stationary()
        estimates, jac = self._delta()
        cov = self.covariance(kind)
        out, unidentified = {}, []
        for name, value in estimates.items():
            j = jac[name].reshape(value.numel(), -1).double()
            se = (j @ cov @ j.T).diagonal().clamp_min(0).sqrt()
            touched = self._touched(j)
            if self._flat.shape[1] and touched.any():
                se = torch.where(touched, torch.nan, se)
                unidentified.append(name)
            out[name] = se.reshape(value.shape)
        if unidentified:
            cause = "the estimate is on a boundary, see the BoundaryWarning" if self.boundary \
                else "e.g. a rotation of factor loadings"
            if self.score_replicates is not None:
                cause += "; judged to within the Monte-Carlo error of Louis's identity"
            warnings.warn(
                f"the log-likelihood is flat along {self._flat.shape[1]} direction(s) at the estimate, so "
                f"{unidentified} are not identified there ({cause}); their "
                "standard errors are NaN. Quantities invariant to those directions keep theirs.",
                IdentifiabilityWarning,
                stacklevel=2,
            )
        return out

    def score_statistic(self) -> float:
        r"""Rao's score statistic at the estimate, :math:`g^\top \bigl(\sum_i s_i s_i^\top\bigr)^{+} g`.

        :math:`s_i` are the per-observation scores in the free coordinates and
        :math:`g = \sum_i s_i`; the outer-product information keeps the directions the
        observed information calls flat (a variance on a floor has a score but no
        curvature). It is 0 at a maximum; its square root is about how many standard
        errors the estimate lies from a point where the score vanishes. NaN where
        per-observation scores do not exist (a latent outside the data plate couples the rows).
        """
        if self.scores is None:
            return math.nan
        # With Monte-Carlo scores a flat direction's score is noise: keep the identified ones.
        reduced = self.scores @ self.basis
        if self.score_replicates is not None:
            reduced = reduced @ self._curved
        total = reduced.sum(0)
        outer = torch.linalg.pinv(reduced.T @ reduced, hermitian=True, rtol=_RTOL)
        return float(total @ outer @ total)

    def _warn_unless_stationary(self) -> None:
        statistic = self.score_statistic()
        if statistic > _SCORE_LIMIT:
            warnings.warn(
                f"the score is not zero at the estimate (score statistic {statistic:.3g}: about "
                f"{math.sqrt(statistic):.2g} standard errors from a stationary point), so it is not a "
                "maximum of the likelihood (a parameter held on a floor or boundary, or a fit stopped "
                "early): Wald intervals and standard errors computed here are not valid.",
                NotAMaximumWarning,
                stacklevel=3,
            )

    def summary(self, level: float = 0.95, kind: str = "observed"):
        """A parameter table like statsmodels': estimate, standard error, z, p-value, Wald interval.

        One row per free scalar entry, indexed by ``name[i, j]``; a ``pandas.DataFrame``.
        A symmetric matrix (a covariance) lists its lower triangle only: ``[k, j, i]``
        is ``[k, i, j]``, the same number with the same standard error.
        The z statistic and p-value test the entry being 0, two-sided.
        """
        import pandas as pd  # ArviZ's dependency; imported when a table is asked for

        if not 0 < level < 1:
            raise FreqviInputError(f"level must be between 0 and 1; got {level!r}.")
        estimates, jacobians = self._delta()
        errors = self.standard_errors(kind)
        quantile = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)).item()
        rows = []
        for name, value in estimates.items():
            symmetric = _is_symmetric(value, jacobians[name])
            for index in _indices(value.shape):
                if symmetric and index[-2] < index[-1]:
                    continue
                est, se = float(value[index]), float(errors[name][index])
                z = est / se if se > 0 else math.nan
                rows.append({"parameter": name + (str(list(index)) if index else ""), "estimate": est,
                             "std_err": se, "z": z, "p_value": math.erfc(abs(z) / math.sqrt(2)),
                             f"[{(1 - level) / 2:g}": est - quantile * se,
                             f"{(1 + level) / 2:g}]": est + quantile * se})
        return pd.DataFrame(rows).set_index("parameter")

    def _delta(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Estimates under their statistical names, and their Jacobians in the free coordinates."""
        vector = self.parameters.vector

        def statistics(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
            substituted = poutine.substitute(_statistics, data=self.parameters.values(v))
            return tuple(substituted(self.pair, self.parameters).values())

        names = list(_statistics(self.pair, self.parameters))
        values = statistics(vector)
        jac = jacobian(statistics, vector)
        return ({n: v.detach() for n, v in zip(names, values, strict=True)},
                dict(zip(names, jac, strict=True)))


# Eigenvalues within this fraction of the largest are flat directions: at a maximum found to
# optimiser precision, a direction the likelihood cannot see keeps a tiny, sign-less curvature.
_RTOL = 1e-7
_BOUNDARY = 1e-6  # a positive or simplex parameter this close to 0 is on its boundary
# A score statistic above 1 puts the estimate more than a standard error from a stationary point.
_SCORE_LIMIT = 1.0
# Louis's identity runs as _REPLICATES estimates of at least _MIN_DRAWS draws each; Monte-Carlo
# judgements (flat or not, moved or not) allow _MC_Z standard errors; _GROUPS for the jackknife.
_REPLICATES, _MIN_DRAWS, _MC_Z, _GROUPS = 8, 25, 4.0, 8


def _complement(flat: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``(r, r - f)`` of the complement of the columns of ``flat`` ``(r, f)``."""
    left = torch.linalg.svd(flat, full_matrices=True)[0]
    return left[:, flat.shape[1]:]


def _flat_by_scores(replicates: torch.Tensor, count: int | None = None) -> torch.Tensor:
    r"""Directions whose per-observation scores are Monte-Carlo noise alone, orthonormal ``(r, f)``.

    ``replicates`` ``(R, n, r)`` are independent estimates of the scores. With
    :math:`\bar s_i` their mean, the signal :math:`S = \sum_i \bar s_i \bar s_i^\top` and the
    noise :math:`N = \sum_i N_i`, :math:`N_i` the sample covariance of the replicates
    over ``R``: along a flat direction :math:`v^\top S v / v^\top N v` is 1 up to its
    sampling error, :math:`\sqrt{2 \sum_i (v^\top N_i v)^2} / v^\top N v`. Directions
    are the generalised eigenvectors of :math:`(S, S + N)`; ``count`` takes that many
    of the noisiest instead of testing (the jackknife's leave-outs).
    """
    copies = replicates.shape[0]
    mean = replicates.mean(0)
    deviations = replicates - mean
    signal = mean.T @ mean
    noise = torch.einsum("knp,knq->pq", deviations, deviations) / (copies * (copies - 1))
    total = signal + noise
    # A ridge makes a direction with no score at all (a parameter nothing uses) count as flat.
    total = total + 1e-12 * total.trace() * torch.eye(total.shape[0], dtype=total.dtype)
    whiten = torch.linalg.inv(torch.linalg.cholesky(total))
    share, rotation = torch.linalg.eigh(whiten @ signal @ whiten.T)  # signal's share, ascending
    directions = whiten.T @ rotation
    if count is None:
        per_observation = (deviations @ directions).square().sum(0) / (copies * (copies - 1))  # (n, r)
        noise_along = per_observation.sum(0)
        spread = (2 * per_observation.square().sum(0)).sqrt() / noise_along
        ratio = share / (1 - share).clamp_min(1e-300)
        count = int((ratio <= 1 + _MC_Z * spread).sum())
    return torch.linalg.qr(directions[:, :count])[0]


def _jackknife_groups(num_rows: int) -> list[torch.Tensor]:
    """Row indices left after removing each of ``_GROUPS`` interleaved groups."""
    groups = min(_GROUPS, num_rows)
    rows = torch.arange(num_rows)
    return [rows[rows % groups != g] for g in range(groups)]


def _warn_on_boundary(parameters: Parameters, pair: Pair) -> list[str]:
    """Warns about parameters on the boundary of their space; returns their names.

    Generic: positive and simplex entries, and a Cholesky factor's diagonal (the
    square roots of conditional variances), at most ``_BOUNDARY`` (non-strict: a value
    placed on a floor is on it). A freqvi model adds its own floors through
    ``on_boundary()`` (a mixture's covariance eigenvalues on ``reg_covar``).
    """
    at_boundary = []
    for name, value, constraint in zip(parameters.names, parameters.values(parameters.vector).values(),
                                       parameters.constraints, strict=True):
        base = getattr(constraint, "base_constraint", constraint)
        if base in (constraints.positive, constraints.simplex):
            entries = value
        elif base in (constraints.lower_cholesky, constraints.positive_definite):
            entries = value.diagonal(dim1=-2, dim2=-1).square() if base is constraints.lower_cholesky \
                else torch.linalg.eigvalsh(value)
        else:
            continue
        if bool((entries <= _BOUNDARY).any()):
            at_boundary.append(f"{name} (an entry within {_BOUNDARY:g} of 0)")
    declared = getattr(pair.owner, "on_boundary", None)
    at_boundary += declared() if declared is not None else []
    if at_boundary:
        warnings.warn(
            f"the estimate is on the boundary of the parameter space: {at_boundary} (an empty "
            "mixture component, a variance on its floor): the estimator is not normal there, so "
            "Wald intervals and standard errors of those entries are not valid; use the bootstrap, "
            "or refit a model without that component.",
            BoundaryWarning,
            stacklevel=4,
        )
    return at_boundary


def _statistics(pair: Pair, parameters: Parameters) -> dict[str, torch.Tensor]:
    """The model's statistical names (a freqvi model's), else its ``pyro.param`` values."""
    if pair.owner is not None:
        return pair.owner.statistics()
    return {name: pyro.param(name) for name in parameters.names}


def _is_symmetric(value: torch.Tensor, jacobian: torch.Tensor) -> bool:
    """Whether ``value`` is a stack of symmetric matrices whose mirrored entries are one function
    of the parameters (equal Jacobian rows), as a covariance is."""
    if value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return False
    rows = jacobian.reshape(*value.shape, -1)
    return torch.equal(value, value.transpose(-1, -2)) and torch.equal(rows, rows.transpose(-2, -3))


def _indices(shape):
    return [()] if len(shape) == 0 else [tuple(i) for i in torch.cartesian_prod(
        *[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist()]


@thread_policy
def observed_information(model, data, guide=None, *, method: str = "auto", num_samples: int = 1000,
                         data_plate_name: str = "data", seed: int | None = None) -> Information:
    r"""The observed information of a fitted model at its current parameters.

    * ``"exact"``: the autograd Hessian of the exact log-likelihood (a model's
      ``log_marginal``: log-sum-exp for mixtures, the Gaussian marginal,
      quadrature; or enumeration of discrete latents), in float64 if the data are;
    * ``"louis"``: Louis's identity (1982),

      .. math::

          I(\theta) = \sum_i \Bigl(\mathbb E\bigl[-\nabla^2 \log p(x_i, z_i)\bigr]
              - \mathrm{Cov}\bigl[\nabla \log p(x_i, z_i)\bigr]\Bigr),

      the expectations over the posterior :math:`p(z_i \mid x_i)` estimated by
      self-normalised importance sampling with ``num_samples`` draws from the
      guide, so an approximate guide still targets the exact posterior. The draws
      run as 8 independent replicates (of at least 25 draws each, when there are
      that many) whose spread corrects the estimate's leading bias and tells
      Monte-Carlo noise from curvature (:class:`Information`);
    * ``"auto"``: exact where the model allows, else Louis's identity.

    The parameters should be at a maximum of the likelihood (after :func:`~freqvi.em`
    or :func:`~freqvi.fit`); the per-observation scores kept for the sandwich are
    :math:`\nabla \ell_i`, exact or by Fisher's identity.

    After variational EM (an approximate E-step, e.g. the GLMM with a Gaussian
    guide), this is still the information of the *likelihood* at the estimate.
    The estimate :math:`\theta_{VI}` maximises the ELBO, whose maximiser differs
    from the likelihood's by a bias that does not shrink with ``n``; Wald
    intervals around it therefore under-cover as ``n`` grows, even though their
    width is right. For the GLMM, compare with the quadrature MLE.

    :param model: a freqvi model, a model callable, or a ``(model, guide)`` tuple.
    :param data: the data the model was fitted to.
    :param guide: the proposal for Louis's identity (a freqvi model brings its own).
    """
    check_choice(method, "method", METHODS)
    num_samples = check_positive_int(num_samples, "num_samples", minimum=2)
    data = as_data(data)
    seed = check_seed(seed)
    pair = resolve_pair(model, guide, require_guide=False)
    if seed is not None:
        pyro.set_rng_seed(seed)
    model_trace = check_pair(pair.model, pair.guide, data)[0] if pair.guide is not None \
        else check_model(pair.model, data)
    frame = data_plate(model_trace, data_plate_name, data[0].shape[0])
    parameters = Parameters.of(param_names(model_trace))
    exact = exact_route(pair, model_trace)
    if method == "exact" and exact is None:
        raise FreqviInputError("no exact log-likelihood for this model; use method='louis' with a guide.")
    if exact is not None and method != "louis":
        matrix, scores = _exact(exact, data, model_trace, frame, parameters)
        coupled = pair.owner is None and outside_data_plate(latent_sites(model_trace), frame)
        return Information(matrix, None if coupled else scores, "exact", parameters, pair)
    if pair.guide is None:
        raise FreqviInputError("Louis's identity needs a guide as proposal: pass guide=...")
    matrix, scores, replicates = _louis_replicated(pair, data, model_trace, frame, parameters, num_samples)
    return Information(matrix, scores, "louis", parameters, pair, replicates)


def _exact(exact, data, model_trace, frame, parameters: Parameters):
    def per_observation_loglik(v: torch.Tensor) -> torch.Tensor:
        return exact(data, frame, wrap=functools.partial(poutine.substitute, data=parameters.values(v)))

    vector = parameters.vector
    scores = jacobian(per_observation_loglik, vector, vectorize=True)  # (n, P)
    matrix = -hessian(lambda v: per_observation_loglik(v).sum(), vector)
    return matrix.double(), scores.double()


def _louis_replicated(pair: Pair, data, model_trace, frame, parameters: Parameters, num_samples: int):
    r"""Louis's identity as the mean of ``R`` independent estimates, each with ``num_samples / R`` draws.

    The replicates measure the Monte-Carlo error that :class:`Information` needs to
    tell a flat direction from a curved one, at no extra cost in draws. Their
    spread also removes the self-normalised estimate's leading bias: the weighted
    covariance of the complete-data scores about their weighted mean falls short of
    the posterior covariance by the variance of that mean, :math:`\mathrm{Var}(\hat s_i)`,
    so each replicate overstates :math:`I` by :math:`\sum_i \mathrm{Var}(\hat s_i)`, estimated
    by the scores' sample covariance across replicates (exact for the exact posterior as
    guide, first order in ``1/K_eff`` otherwise). With fewer than ``2 * _MIN_DRAWS``
    draws there is one estimate and no correction.

    On the joint weight (a latent outside the data plate) the replicates' total scores
    correct the bias the same way, and no per-observation scores exist.

    :returns: the corrected mean information ``(P, P)``, the mean scores ``(n, P)``, and
        the replicates of the scores ``(R, n, P)`` (``None`` with one estimate; both
        ``None`` on the joint weight).
    """
    count = min(_REPLICATES, num_samples // _MIN_DRAWS)
    if count < 2:
        matrix, scores, joint, log_w = _louis(pair, data, model_trace, frame, parameters, num_samples)
        _warn_on_heavy_tails(log_w)
        return matrix, None if joint else scores, None
    runs = [_louis(pair, data, model_trace, frame, parameters, num_samples // count) for _ in range(count)]
    _warn_on_heavy_tails(torch.cat([w for *_, w in runs]))  # all draws: independent, one proposal
    matrices = torch.stack([m for m, *_ in runs])  # (R, P, P)
    scores = torch.stack([s for _, s, *_ in runs])  # (R, n, P), or (R, 1, P) for the joint total
    centred = scores - scores.mean(0)
    bias = torch.einsum("rnp,rnq->pq", centred, centred) / (count - 1)
    if runs[0][2]:
        return matrices.mean(0) - bias, None, None
    return matrices.mean(0) - bias, scores.mean(0), scores


def _warn_on_heavy_tails(log_w: torch.Tensor) -> None:
    """Louis's expectations are self-normalised importance sampling: PSIS k-hat above 0.7 means
    they, and the information built on them, cannot be trusted (a poor guide gave information
    8.3 where the exact value was -3.07, with no word): say so, as log_likelihood does."""
    pareto_k, _ = pareto_k_hat(log_w, torch.finfo(log_w.dtype).eps, "columns")
    heavy = int((pareto_k > PARETO_K_THRESHOLD).sum())
    if heavy:
        warnings.warn(
            f"Louis's identity: PSIS k-hat > {PARETO_K_THRESHOLD} for {heavy} of {len(pareto_k)} importance "
            f"weight columns (max {np.nanmax(pareto_k):.2f}) with the guide as proposal: the posterior "
            "expectations, the information and the standard errors cannot be trusted. Fit the guide "
            "closer to the posterior (e.g. loss='stl' or more steps) or pass a better guide.",
            ImportanceSamplingWarning,
            stacklevel=5,
        )


def _louis(pair: Pair, data, model_trace, frame, parameters: Parameters, num_samples: int):
    r"""Louis's identity with self-normalised importance weights over ``num_samples`` draws.

    The draws and their weights are :func:`~freqvi.log_likelihood`'s (any guide,
    auxiliary autoguides included; model latents the guide lacks drawn from the
    prior, whose values are then held fixed while :math:`\theta` moves). Per
    observation where the weights factorise over the data plate; where a latent
    lies outside it (a global latent, an autoguide's joint draw), on the joint
    weight, with :math:`\mathbb E` and :math:`\mathrm{Cov}` over the joint posterior
    of all latents: the information is then the total's, and per-observation
    scores do not exist (returned as ``None``).

    :returns: ``(I, scores, joint, log_w)``: ``(P, P)`` and ``(n, P)`` per-observation scores, or
        on the joint weight ``(1, P)``, the total's score, with ``joint`` true; float64; and the
        log weights ``(K, n)`` (or ``(K, 1)``) for the tail check.
    :raises FreqviInputError: for a point-mass guide (:func:`~freqvi.traces.check_proposal`).
    """
    dims = max_plate_nesting(model_trace) + 1
    check_particles(pair.model, pair.guide, data, num_samples, dims - 1, "Louis's identity")
    check_proposal(pair.guide, trace(pair.guide, *data), *data)
    coupled = bool(outside_data_plate(latent_sites(model_trace), frame))
    with torch.no_grad():
        draws = ImportanceWeights.draw(pair, data, frame, dims, [num_samples], coupled)
        log_w = draws.columns().double()  # (K, n), or (K, 1) joint
        weights = torch.softmax(log_w, 0)

    def complete(v: torch.Tensor) -> torch.Tensor:  # log p(x, z_k) at theta = v, as weights' columns
        return draws.log_joint(poutine.substitute(pair.model, data=parameters.values(v)), data)

    vector = parameters.vector
    # Forward mode: one pass per coordinate keeps memory at (K, n, P), not (K n)^2 P.
    scores = jacobian(complete, vector, vectorize=True, strategy="forward-mode").double()  # (K, n, P)
    expected_hessian = hessian(lambda v: (weights * complete(v)).sum(), vector).double()
    mean_score = (weights.unsqueeze(-1) * scores).sum(0)  # (n, P): Fisher's identity
    centred = scores - mean_score
    covariance = torch.einsum("kn,knp,knq->pq", weights, centred, centred)
    return -expected_hessian - covariance, mean_score, draws.joint, log_w
