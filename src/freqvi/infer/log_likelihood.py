"""``log_likelihood``: the fitted model's log-likelihood, exact, importance-sampled or annealed."""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import config_enumerate
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from freqvi.errors import FreqviInputError, ImportanceSamplingWarning, UnestimableParetoKWarning
from freqvi.estimators.particles import Arrangement
from freqvi.handlers import SubsamplePlate
from freqvi.infer.adaptive import Pilot, adapt
from freqvi.infer.annealed import AnnealingSettings, anneal
from freqvi.infer.log_likelihood_result import PARETO_K_THRESHOLD, LogLikelihood
from freqvi.infer.pair import Pair, first_run, resolve_pair
from freqvi.infer.proposals import AdaptiveStudentTProposal, Proposal, as_proposal, choose_proposal
from freqvi.infer.threads import thread_policy
from freqvi.infer.vectorize import check_particles
from freqvi.infer.weights import arrange, on_rows, summarize
from freqvi.traces import (
    check_proposal,
    latent_sites,
    max_plate_nesting,
    outside_data_plate,
    trace,
)
from freqvi.validation import as_data, check_choice, check_positive_int, check_seed

METHODS = ("auto", "exact", "importance", "ais")
#: Importance samples per observation by default.
NUM_SAMPLES = 1000
#: The options of ``method="ais"`` (:class:`~freqvi.infer.annealed.AnnealingSettings`).
AIS_OPTIONS = frozenset({"num_temperatures", "num_chains", "leapfrog_steps", "step_size"})


@thread_policy
def log_likelihood(
    model,
    data,
    guide=None,
    *,
    num_samples: int | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    data_plate_name: str = "data",
    seed: int | None = None,
    proposal: str | Proposal = "auto",
    num_temperatures: int | None = None,
    num_chains: int | None = None,
    leapfrog_steps: int | None = None,
    step_size: float | None = None,
) -> LogLikelihood:
    r"""The log-likelihood :math:`\ell(\theta) = \log \int p(x_{1..n}, z; \theta)\,dz`.

    Routes, in the order ``method="auto"`` tries them (annealed importance sampling,
    the costliest, runs only when asked for):

    * **exact**, by the model's closed-form marginal (a freqvi model's
      ``log_marginal``: log-sum-exp for mixtures, the Gaussian integral for
      factor analysis), or by enumeration when every latent site is discrete
      (all sums carried out by Pyro's tensor contraction, keeping the data plate);
    * **importance**, with a proposal :math:`r` built from the guide :math:`q`
      (``proposal``, below): for each observation,
      :math:`\hat p(x_i) = \frac1K \sum_k w_{ik}`, :math:`w_{ik} = p(x_i,
      z_{ik}) / r(z_{ik} \mid x_i)`, :math:`z_{ik} \sim r`. The standard error of
      :math:`\log \hat p(x_i)` is :math:`\mathrm{sd}(w_i) / (\sqrt K\, \bar w_i)`
      (delta method), summed in quadrature over ``i``. PSIS (Vehtari et al.
      2024, via :func:`arviz.psislw`) gives each observation's Pareto
      :math:`\hat k`; above 0.7 the estimate cannot be trusted and an
      :class:`~freqvi.errors.ImportanceSamplingWarning` says so. Where the weights'
      tail is too short or tied to fit (ArviZ returns infinity), :math:`\hat k` is
      NaN and an :class:`~freqvi.errors.UnestimableParetoKWarning` says why.
      :math:`\log q` is the guide trace's whole log density, as in
      :class:`~pyro.infer.Trace_ELBO`: for an autoguide that draws one auxiliary
      vector ``u`` and hands the model :math:`z = T(u)`, that is :math:`\log q(u)`
      plus the point masses' :math:`-\log|\det \partial T / \partial u|`, the density
      of the model's latent values. Latent sites of the model that the guide lacks
      are drawn from the model's prior, which then cancels from the weight.

    * **ais**, annealed importance sampling (Neal 2001) from the guide to each
      observation's posterior along a geometric path of ``num_temperatures``
      temperatures, with Hamiltonian Monte Carlo transitions (``leapfrog_steps``
      leapfrog steps of ``step_size``), ``num_chains`` chains per observation
      (:mod:`freqvi.infer.annealed`; the same as
      :func:`~freqvi.infer.annealed.annealed_log_likelihood`). Its result is an
      :class:`~freqvi.infer.annealed.AnnealedLogLikelihood`: per-observation estimates,
      their standard errors and effective sample sizes across chains, the acceptance
      rate and the CPU seconds per observation. It needs a guide that draws each of the
      model's latent sites directly, continuous and inside the data plate; others are
      refused. Where the guide is far from the posterior (heavy-tailed importance
      weights), more temperatures buy accuracy that more importance samples cannot.

    Latent sites outside the data plate (a global latent, crossed random effects,
    an autoguide's joint draw) couple the observations: then the estimate is of the
    total, :math:`\log \frac1K \sum_k w_k` with the joint weight
    :math:`w_k = p(x_{1..n}, z_k) / q(z_k)`, its standard error and one
    :math:`\hat k`; ``joint`` is set and ``per_observation`` is ``None``. The exact
    route sums a shared discrete latent out of the joint likelihood alike. A data
    plate declared with ``subsample_size`` is evaluated over all its rows.

    The proposal (:mod:`freqvi.infer.proposals`) is the guide itself (``"guide"``,
    :math:`r = q`), or the guide with its tails widened, each Normal factor
    :math:`N(m, s^2)` of it (on the unconstrained space, auxiliary draws included)
    replaced: ``"student_t"`` by a Student-t :math:`t_3(m, s)`, ``"mixture"`` by
    Hesterberg's (1995) defensive mixture :math:`0.8\,N(m, s^2) + 0.2\,N(m, 9 s^2)`;
    or ``"adaptive"``, that Student-t moved for each observation to :math:`t_3(m_i, L_i)`,
    :math:`m_i` and :math:`L_i L_i^\top` the self-normalised importance-weighted mean and
    covariance of pilot draws (adaptive importance sampling by moment matching, Paananen,
    Piironen, Bürkner and Vehtari 2021, *Statistics and Computing* 31; see
    :mod:`freqvi.infer.adaptive`): two rounds of :math:`K/2` pilot draws each after a first
    :math:`K/2` from :math:`t_3(m, s)`, a round's move kept for an observation only where
    it lowers that observation's :math:`\hat k`, so the pilot costs :math:`1.5K` draws per
    observation on top of the estimate's :math:`K`. The estimate's :math:`K` draws are
    fresh draws of the adapted proposal, not the pilot's, so it remains a plain unbiased
    importance estimate of :math:`p(x_i)` given that proposal. Or a
    :class:`~freqvi.infer.proposals.Proposal` with other settings
    (:class:`~freqvi.infer.proposals.AdaptiveStudentTProposal`'s ``pilot_fraction`` and
    ``adaptations``). A fitted Gaussian guide is lighter-tailed than the posterior, and an
    amortised one is off from each observation's posterior (the amortisation gap), both of
    which make the weights heavy-tailed; ``"auto"`` (the default) takes the adaptive
    Student-t where every draw of the guide is a Normal factor, the weights are per
    observation and the data plate visits all its rows in one run, the plain Student-t
    where the plate is subsampled, and the guide itself otherwise. On the digits VAE
    (latent 8, trained as in the tour, its 297 test images) the share of images with
    :math:`\hat k > 0.7` at :math:`K = 1000` was 23% under the guide, 14% under the
    Student-t and 2.0% under the adaptive Student-t (1.0% at :math:`K = 5000`, within
    0.002 nats per image of annealed importance sampling), for 2.7 times the Student-t's
    CPU time. The result's ``proposal`` names the one used. A guide equal to the exact
    posterior gives exact, zero-variance weights only as ``proposal="guide"``.

    :param method: ``"auto"``, ``"exact"``, ``"importance"`` or ``"ais"``.
    :param num_samples: ``K``, importance samples per observation (default 1000;
        importance sampling only: AIS's draws are its ``num_chains``); the adaptive
        proposal's pilot draws come on top (``1.5 K`` at its defaults).
    :param proposal: ``"auto"``, ``"guide"``, ``"student_t"``, ``"mixture"``, ``"adaptive"`` or a
        :class:`~freqvi.infer.proposals.Proposal`.
    :param chunk_size: samples drawn at once (default: bounded to ~4 million
        log-density entries per chunk); importance sampling only.
    :param num_temperatures: AIS only (default 100): the transitions of each chain.
    :param num_chains: AIS only (default 16): chains per observation.
    :param leapfrog_steps: AIS only (default 5): leapfrog steps per HMC transition.
    :param step_size: AIS only (default 0.1): the leapfrog step, on the unconstrained space.
    :raises ~freqvi.errors.FreqviInputError: for an option of one method given to another
        (``num_samples`` with ``method="ais"``, ``num_chains`` without it, ...); for
        ``method="ais"`` without a guide, or with one it cannot anneal (see
        :func:`~freqvi.infer.annealed.annealed_log_likelihood`); for a guide that puts a
        point mass on a model latent (``AutoDelta``): it is no proposal (see
        ``freqvi.traces.check_proposal``); for an unknown ``proposal``, or a Student-t or
        mixture proposal of a guide with a site it cannot widen (a discrete or non-Normal
        draw), naming the site; for the adaptive proposal where the weights are joint or the
        data plate is subsampled.
    """
    check_choice(method, "method", METHODS)
    annealing = _check_method_options(
        method, num_samples=num_samples, chunk_size=chunk_size, proposal=proposal,
        num_temperatures=num_temperatures, num_chains=num_chains, leapfrog_steps=leapfrog_steps,
        step_size=step_size)
    num_samples = check_positive_int(NUM_SAMPLES if num_samples is None else num_samples, "num_samples")
    proposal = as_proposal(proposal)
    data = as_data(data)
    seed = check_seed(seed)
    chunk_size = None if chunk_size is None else check_positive_int(chunk_size, "chunk_size")
    pair = resolve_pair(model, guide, require_guide=False)
    if method == "ais" and pair.guide is None:
        raise FreqviInputError("annealed importance sampling starts its chains at draws of the guide: pass "
                               "guide=... (a guide that draws each of the model's latent sites).")
    model_trace, guide_trace, frame = first_run(pair, data, seed, data_plate_name)
    n = data[0].shape[0]
    if method == "ais":
        return anneal(pair, data, frame, (model_trace, guide_trace), annealing)
    exact = exact_route(pair, model_trace)
    if method == "exact" and exact is None:
        raise FreqviInputError(
            "no exact log-likelihood for this model: it has continuous latent sites and no "
            "log_marginal(); use method='importance' with a guide."
        )
    if exact is not None and method != "importance":
        with torch.no_grad():
            per_obs = exact(data, frame)
        joint = pair.owner is None and bool(outside_data_plate(latent_sites(model_trace), frame))
        return LogLikelihood(float(per_obs.double().sum()), None if joint else per_obs, 0.0, None, "exact",
                             joint=joint)
    if pair.guide is None:
        raise FreqviInputError("importance sampling needs a guide as proposal: pass guide=...")
    began = time.process_time()
    check_proposal(pair.guide, guide_trace, *data)
    coupled = bool(outside_data_plate({**latent_sites(model_trace), **latent_sites(guide_trace)}, frame))
    proposal = choose_proposal(proposal, guide_trace, joint=coupled, all_rows=frame.size == n)
    chunk = max(1, min(num_samples, 4_000_000 // max(n, 1))) if chunk_size is None else chunk_size
    dims = max_plate_nesting(model_trace) + 1
    check_particles(pair.model, proposal.wrap(pair.guide), data, num_samples, dims - 1,
                    "log_likelihood's importance sampling")
    with torch.no_grad():
        if isinstance(proposal, AdaptiveStudentTProposal):
            proposal = adapt(proposal, _pilot(pair, data, frame, dims, chunk), frame.dim, dims, num_samples)
        pair = Pair(pair.model, proposal.wrap(pair.guide), pair.owner)  # draws come from the proposal
        weights = ImportanceWeights.draw(pair, data, frame, dims, _chunks(num_samples, chunk), coupled)
    result = _importance_estimate(weights.columns(), weights.offset(), weights.joint, str(proposal))
    result.cpu_seconds_per_observation = (time.process_time() - began) / n
    return result


def _check_method_options(method: str, **options) -> AnnealingSettings | None:
    """Refuses an option given (not ``None``; ``proposal`` not ``"auto"``) to a method that does not use it;
    returns AIS's settings, checked, when ``method="ais"``.

    :raises ~freqvi.errors.FreqviInputError: naming the option and the method it belongs to.
    """
    given = {name for name, value in options.items()
             if value is not None and not (name == "proposal" and isinstance(value, str) and value == "auto")}
    ais = {name for name in given if name in AIS_OPTIONS}
    if method == "ais":
        misplaced = sorted(given - AIS_OPTIONS)
        if misplaced:
            raise FreqviInputError(
                f"{', '.join(misplaced)}: option(s) of importance sampling, but method='ais': annealed "
                "importance sampling starts at the guide itself and its draws per observation are its chains "
                "(num_chains=...); its other options are num_temperatures, leapfrog_steps and step_size.")
        return AnnealingSettings.checked(**{name: options[name] for name in ais})
    if ais:
        raise FreqviInputError(f"{', '.join(sorted(ais))}: option(s) of annealed importance sampling, but "
                               f"method={method!r}: pass method='ais' with them.")
    return None


def exact_route(pair: Pair, model_trace):
    """``f(data, frame, wrap) -> log p(x_i)``, shape ``(n,)``, where one exists; else ``None``.

    When a discrete latent lies outside the data plate the observations do not
    factorise, and ``f`` returns the total :math:`\\log p(x_1, \\ldots, x_n)`, shape ``(1,)``.
    ``wrap`` (default: none) is applied to the program before it runs, e.g.
    ``poutine.substitute`` to evaluate it at other parameter values.
    """
    if pair.owner is not None and hasattr(pair.owner, "log_marginal"):
        return lambda data, frame, wrap=_unwrapped: wrap(pair.owner.log_marginal)(*data)
    latents = latent_sites(model_trace)
    if all(site["fn"].has_enumerate_support for site in latents.values()):  # none: the sum of log-densities
        return functools.partial(_enumerated_rows, pair.model, model_trace)
    return None


def _unwrapped(fn):
    return fn


def _enumerated_rows(model, model_trace, data, frame, wrap=_unwrapped) -> torch.Tensor:
    """:func:`_enumerated` over every row of the data plate: in blocks where it is subsampled.

    A block's sites are not scaled up to the plate's full size (``SubsamplePlate``'s ``size``).
    """
    coupled = bool(outside_data_plate(latent_sites(model_trace), frame))
    blocks = row_blocks(frame, data[0].shape[0], joint=coupled)
    return torch.cat([
        _enumerated(wrap(model if rows is None else SubsamplePlate(frame.name, rows, size=len(rows))(model)),
                    data, model_trace, frame)[keep:]
        for rows, keep in blocks])


def _enumerated(model, data, model_trace, frame) -> torch.Tensor:
    """``log p(x_i)`` by summing every discrete latent out, keeping the data plate.

    A latent outside the data plate is summed out of the joint: the result is then
    the total, shape ``(1,)``.
    """
    first_dim = -max_plate_nesting(model_trace) - 1
    enum_model = poutine.enum(config_enumerate(model, default="parallel"), first_dim)
    tr = trace(enum_model, *data)
    tr.compute_log_prob()
    tr.pack_tensors()
    factors = OrderedDict()
    for site in tr.nodes.values():
        if site["type"] == "sample" and not isinstance(site["fn"], _Subsample):
            ordinal = frozenset(
                tr.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized
            )
            factors.setdefault(ordinal, []).append(site["packed"]["log_prob"])
    sum_dims = set(tr.symbol_to_dim) - set(tr.plate_to_symbol.values())
    joint = outside_data_plate(latent_sites(tr), frame)
    target = frozenset() if joint else frozenset({tr.plate_to_symbol[frame.name]})
    return contract_to_tensor(factors, sum_dims, target_ordinal=target).reshape(-1)


def row_blocks(frame, n: int, joint: bool = False) -> list[tuple[torch.Tensor | None, int]]:
    """How to visit all ``n`` rows of a data plate declared with ``subsample_size``.

    Pyro's plate draws ``frame.size`` of its ``n`` rows per run and insists on that
    many, so the rows are visited in consecutive blocks of that size, the last one
    shifted back to end at row ``n``; each entry is ``(rows, keep)``: the block's
    indices (``None``: the plate's own, all ``n``) and the first of its columns not
    already visited. Observations coupled by a latent outside the plate (``joint``)
    cannot be split into blocks.

    :raises FreqviInputError: for a subsampled plate when ``joint``.
    """
    size = frame.size
    if size == n:
        return [(None, 0)]
    if joint:
        raise _coupled_rows(frame, n)
    starts = [*range(0, n - size, size), n - size]
    return [(torch.arange(start, start + size), max(0, i * size - start))
            for i, start in enumerate(starts)]


def _coupled_rows(frame, n: int) -> FreqviInputError:
    return FreqviInputError(
        f"the data plate {frame.name!r} draws {frame.size} of its {n} rows per run (subsample_size), and a "
        "site outside it couples all rows, so its log-likelihood needs one run over every row: evaluate a "
        f"copy of the model with pyro.plate({frame.name!r}, {n})."
    )


def _pilot(pair: Pair, data, frame, dims: int, chunk: int):
    """``draw(proposal, k)``: a :class:`~freqvi.infer.adaptive.Pilot` of ``k`` draws of ``proposal`` built on
    the pair's guide, at most ``chunk`` at once, all rows of the data plate in one run."""
    def draw(proposal: Proposal, k: int) -> Pilot:
        drawn = Pair(pair.model, proposal.wrap(pair.guide), pair.owner)
        chunks = [ImportanceWeights.draw(drawn, data, frame, dims, [size], coupled=False)
                  for size in _chunks(k, chunk)]
        log_w = torch.cat([weights.columns() for weights in chunks])
        pareto_k, _ = pareto_k_hat(log_w.double(), torch.finfo(log_w.dtype).eps, "observations")
        return Pilot(log_w, [weights.blocks[0][2].guide_trace for weights in chunks], pareto_k)

    return draw


def _chunks(total: int, size: int):
    while total > 0:
        yield min(size, total)
        total -= size


@dataclass
class ImportanceWeights:
    """Log importance weights :math:`\\log p(x, z_k) - \\log q(z_k)` of ``K`` draws of the guide.

    :ivar inside: the data plate's part, one column per observation, shape ``(K, n)``.
    :ivar outside: the sites outside the data plate, shape ``(K,)``.
    :ivar joint: whether the weights do not factorise over observations
        (:class:`~freqvi.estimators.particles.Arrangement`).
    :ivar blocks: for each block of rows (:func:`row_blocks`) of the last chunk of
        draws, ``(rows, keep, arrangement)``, the arrangement holding its traces.
    """

    inside: torch.Tensor
    outside: torch.Tensor
    joint: bool
    blocks: list[tuple[torch.Tensor | None, int, Arrangement]]

    @classmethod
    def draw(cls, pair: Pair, data, frame, dims: int, chunks, coupled: bool) -> ImportanceWeights:
        """Draws the guide ``k`` times for each ``k`` in ``chunks``, over every row of the data plate.

        ``coupled``: whether a latent site lies outside the data plate (then the rows
        cannot be visited in blocks).
        """
        visits = row_blocks(frame, len(data[0]), joint=coupled)
        inside, outside = [], []
        for k in chunks:
            blocks = [(rows, keep, _arranged(pair, data, frame, dims, k, rows)) for rows, keep in visits]
            parts = [arrangement.parts({})[0] for _, _, arrangement in blocks]
            inside.append(torch.cat([part[0][:, keep:]
                                     for part, (_, keep, _) in zip(parts, blocks, strict=True)], 1))
            outside.append(parts[0][1])  # the same terms in every block: counted once
        outside = torch.cat(outside)
        joint = blocks[0][2].is_joint(outside)
        if joint and len(visits) > 1:  # a site outside the plate that depends on the rows' draws
            raise _coupled_rows(frame, len(data[0]))
        return cls(torch.cat(inside), outside, joint, blocks)

    def columns(self) -> torch.Tensor:
        """The log weights, ``(K, n)``, or ``(K, 1)`` joint."""
        return self.blocks[0][2].columns((self.inside, self.outside), self.joint, scale=1.0)

    def offset(self) -> float:
        """Terms outside the data plate that do not depend on the draws (0 when joint)."""
        return 0.0 if self.joint else float(self.outside.double().mean())

    def log_joint(self, model, data) -> torch.Tensor:
        """:math:`\\log p(x, z_k)` at the last chunk's draws under ``model`` (the pair's model, wrapped to
        run at other parameters), as columns like :meth:`columns`'s.

        In per-observation columns the terms outside the data plate (which do not
        depend on the draws) are shared out equally, so that the columns still sum
        to the total.
        """
        inside, outside = [], None
        for rows, keep, arrangement in self.blocks:
            program = on_rows(model, arrangement.frame.name, arrangement.k, arrangement.dims, rows)
            tr = trace(poutine.replay(program, trace=arrangement.model_trace), *data)
            tr = prune_subsample_sites(tr)
            tr.compute_log_prob()
            block_inside, block_outside = arrangement.model_parts(tr)
            inside.append(block_inside[:, keep:])
            outside = block_outside if outside is None else outside
        inside = torch.cat(inside, 1)
        if self.joint:
            return self.blocks[0][2].columns((inside, outside), True, scale=1.0)
        return inside + outside.unsqueeze(-1) / inside.shape[1]


def _arranged(pair: Pair, data, frame, dims: int, k: int, rows) -> Arrangement:
    """One guide trace of ``k`` particles and the model replayed on it, over ``rows`` of the plate."""
    model, guide = (on_rows(program, frame.name, k, dims, rows) for program in (pair.model, pair.guide))
    return arrange(model, guide, data, k, dims, frame.name)


def per_observation(site, particle_dim: int, frame) -> torch.Tensor:
    """A site's log-density, masked as the site is (``poutine.mask``: a masked cell adds 0), summed over all
    dimensions but particles and the data plate."""
    if not any(f.name == frame.name for f in site["cond_indep_stack"]):
        raise FreqviInputError(
            f"site {site['name']!r} is outside the data plate {frame.name!r}; the log-likelihood "
            "per observation needs every latent and observed site inside it."
        )
    lp = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
    lp = lp.reshape((1,) * (-particle_dim - lp.dim()) + lp.shape)
    keep = {lp.dim() + particle_dim, lp.dim() + frame.dim}
    summed = [d for d in range(lp.dim()) if d not in keep]
    return lp.sum(summed) if summed else lp


def pareto_k_hat(log_w: torch.Tensor, eps: float, what: str) -> tuple[np.ndarray, str | None]:
    """PSIS k-hat per column (ArviZ) and, where it cannot be estimated (NaN), why (``what``: the columns).

    ``-inf`` where the weights are constant: the proposal is the exact posterior,
    the estimate has no Monte-Carlo error, and a Pareto tail cannot (and need not)
    be fitted. ArviZ fits the tail to the weights above its ``M``-th largest,
    :math:`M = \\lceil \\min(K/5, 3\\sqrt K) \\rceil`, and returns infinity when fewer
    than 5 lie strictly above it: with ``K <= 20`` draws always, and otherwise when
    the largest weights are tied (a proposal over few distinct values, such as a
    discrete latent's). That says nothing about heavy tails, so it is NaN here.
    """
    import arviz as az  # deferred: importing ArviZ is slow and prints a notice

    num, width = log_w.shape
    spread = log_w.max(0).values - log_w.min(0).values
    constant = (spread <= 1e2 * eps * log_w.abs().max(0).values).numpy()
    pareto_k = np.full(width, -np.inf)
    if not constant.all():
        _, k = az.psislw(log_w[:, ~constant].T.numpy())
        pareto_k[~constant] = np.asarray(k)
    unestimable = ~np.isfinite(pareto_k) & ~constant
    pareto_k[unestimable] = np.nan
    if not unestimable.any():
        return pareto_k, None
    tail = math.ceil(min(num / 5, 3 * math.sqrt(num)))
    if tail <= 4:
        why = (f"with K = {num} draws PSIS fits its Pareto tail to the {tail} largest weights, fewer than "
               "the 5 it needs; use num_samples >= 21 (better: hundreds)")
    else:
        top = log_w.double().topk(tail + 1, dim=0).values[:, torch.from_numpy(unestimable)]
        distinct = max(len(torch.unique(column)) for column in top.T)
        why = (f"the {tail + 1} largest of the {num} weights take at most {distinct} distinct value(s) (tied "
               "weights: the proposal draws few distinct values, e.g. a discrete latent), so fewer than 5 "
               "lie above the tail cutoff and no Pareto tail can be fitted. This is not evidence of heavy "
               "tails; the standard error stands for the estimate's accuracy where the weights are bounded")
    return pareto_k, f"PSIS k-hat cannot be estimated for {int(unestimable.sum())} of {width} {what}: {why}."


def _importance_estimate(log_w: torch.Tensor, offset: float, joint: bool, proposal: str) -> LogLikelihood:
    """The estimate from log weights ``(K, b)``: one column per observation, or one joint column."""
    summary = summarize(log_w)
    what = "joint weight(s)" if joint else "observations"
    pareto_k, note = pareto_k_hat(log_w.double(), torch.finfo(log_w.dtype).eps, what)
    result = LogLikelihood(
        total=float(summary.log_mean.sum()) + offset,
        per_observation=None if joint else summary.log_mean.to(log_w.dtype),
        standard_error=float(summary.standard_error.square().sum().sqrt()),
        pareto_k=pareto_k,
        method="importance",
        num_samples=log_w.shape[0],
        joint=joint,
        pareto_k_note=note,
        proposal=proposal,
        per_observation_se=None if joint else summary.standard_error,
        effective_sample_size=summary.effective_sample_size,
    )
    _warn_on_pareto_k(result, what)
    return result


def _warn_on_pareto_k(result: LogLikelihood, what: str) -> None:
    """Warns when k-hat flags heavy tails, or could not be estimated (each with its reason)."""
    heavy = result.num_heavy_tailed
    if heavy:
        unestimable = f" {result.pareto_k_note}" if result.pareto_k_note else ""
        if result.proposal == "guide":
            remedy = ("the weights are heavy-tailed where the guide's tails are lighter than the "
                      "posterior's; more samples do not cure that: use a proposal with heavier tails "
                      "(proposal='adaptive', a Student-t moved to each observation's posterior moments; "
                      "proposal='student_t', a Student-t with the guide's location and scale; or "
                      "proposal='mixture') or a guide closer to the posterior.")
        else:  # already widened: what is left is a guide far from the posterior, or annealing
            remedy = (f"the {result.proposal} proposal built on the guide is still too far from the "
                      "posterior there (heavy-tailed weights); more samples do not cure that: fit the guide "
                      "closer to the posterior" + (
                          "." if result.joint else  # AIS anneals each observation's latents alone
                          ", or use method='ais' (annealed importance sampling, which moves each draw "
                          "towards the posterior; for a guide that draws the model's latents directly)."))
        warnings.warn(
            f"{heavy} of {len(result.pareto_k)} {what} have PSIS k-hat > {PARETO_K_THRESHOLD} "
            f"(max {result.max_pareto_k:.2f}): their importance-sampling estimates cannot be trusted: "
            f"{remedy}{unestimable}",
            ImportanceSamplingWarning,
            stacklevel=4,
        )
    elif result.pareto_k_note:
        warnings.warn(result.pareto_k_note, UnestimableParetoKWarning, stacklevel=4)
