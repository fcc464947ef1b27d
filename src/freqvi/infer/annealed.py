r"""Annealed importance sampling (Neal 2001) of the log-likelihood, per observation.

From the guide :math:`q(z \mid x_i)` to the posterior :math:`p(z \mid x_i)` along the
geometric path :math:`f_\beta(z) = q(z \mid x_i)^{1-\beta}\, p(x_i, z)^\beta`,
:math:`0 = \beta_0 < \beta_1 < \ldots < \beta_T = 1`, each of ``K`` chains starts at a
draw of the guide and moves by one Hamiltonian Monte Carlo transition that leaves
:math:`f_{\beta_t}` invariant, accumulating the log weight

.. math::

    \log w = \sum_{t=1}^T (\beta_t - \beta_{t-1})
             \bigl[\log p(x_i, z_{t-1}) - \log q(z_{t-1} \mid x_i)\bigr],

whose expectation is :math:`p(x_i)`: :math:`\log \frac1K \sum_k w_k` estimates
:math:`\log p(x_i)` (biased low by the log's concavity, as importance sampling is).
HMC runs on the unconstrained space :math:`u = T^{-1}(z)` (``biject_to`` of each
site's support), whose densities carry :math:`\log|\det \partial T/\partial u|` for
both ends of the path, so it cancels from the weight. All chains and observations
move at once: the data plate makes their targets independent, so one gradient of the
summed log densities holds each one's gradient, and each accepts or rejects alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.poutine.trace_struct import Trace

from freqvi.errors import FreqviInputError
from freqvi.infer.log_likelihood_result import LogLikelihood
from freqvi.infer.pair import Pair, first_run, resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.infer.vectorize import check_particles
from freqvi.infer.weights import arrange, on_rows, summarize
from freqvi.traces import (
    is_auxiliary,
    is_point_mass,
    latent_sites,
    max_plate_nesting,
    outside_data_plate,
    trace,
)
from freqvi.validation import as_data, check_positive_float, check_positive_int, check_seed


@dataclass(frozen=True)
class AnnealingSettings:
    """The settings of annealed importance sampling, and its cost.

    Each observation costs ``num_temperatures x num_chains x (leapfrog_steps + 1)``
    evaluations of the model's and the guide's log densities and of their gradients.

    :ivar num_temperatures: ``T``, the transitions of each chain.
    :ivar num_chains: ``K``, independent chains per observation.
    :ivar leapfrog_steps: leapfrog steps per Hamiltonian Monte Carlo transition.
    :ivar step_size: the leapfrog step on the unconstrained space (unit mass).
    """

    num_temperatures: int = 100
    num_chains: int = 16
    leapfrog_steps: int = 5
    step_size: float = 0.1

    @classmethod
    def checked(cls, **given) -> AnnealingSettings:
        """The settings ``given`` by name (the defaults for those left out or ``None``), checked.

        :raises ~freqvi.errors.FreqviInputError: for a count that is not a positive integer or a
            step size that is not a finite positive number.
        """
        settings = {name: value for name, value in given.items() if value is not None}
        counts = {name: check_positive_int(settings[name], name) for name in
                  ("num_temperatures", "num_chains", "leapfrog_steps") if name in settings}
        if "step_size" in settings:
            counts["step_size"] = float(check_positive_float(settings["step_size"], "step_size"))
        return cls(**counts)

    @property
    def evaluations_per_observation(self) -> int:
        """Log-density-and-gradient evaluations per observation, the unit of the cost."""
        return self.num_temperatures * self.num_chains * (self.leapfrog_steps + 1)


@dataclass(repr=False)
class AnnealedLogLikelihood(LogLikelihood):
    """What annealed importance sampling returns: a :class:`~freqvi.LogLikelihood` with ``method="ais"``.

    ``num_samples`` is the number of chains ``K``; ``per_observation_se`` and
    ``effective_sample_size`` are across them; ``pareto_k`` is ``None`` (with the
    default 16 chains PSIS cannot fit a tail: the standard errors and effective sample
    sizes are the diagnostics).

    :ivar acceptance_rate: the share of HMC proposals accepted, over all transitions.
    :ivar settings: the :class:`AnnealingSettings` it ran with.
    """

    acceptance_rate: float = math.nan
    settings: AnnealingSettings | None = None

    @property
    def num_chains(self) -> int:
        """``K``, the chains per observation (``num_samples``)."""
        return self.num_samples

    def __repr__(self) -> str:
        """One line: the total, its standard error, the settings and the diagnostics."""
        settings = self.settings
        return (f"log-likelihood {self.total:.4f} nats (annealed importance sampling, s.e. "
                f"{self.standard_error:.4f}, {settings.num_temperatures} temperatures x {self.num_chains} "
                f"chains x {settings.leapfrog_steps} leapfrog steps, acceptance {self.acceptance_rate:.2f}, "
                f"smallest ESS {float(self.effective_sample_size.min()):.1f}, "
                f"{self.cpu_seconds_per_observation:.2g} CPU s per observation)")


_DEFAULT = AnnealingSettings()


@thread_policy
def annealed_log_likelihood(model, data, guide=None, *, num_temperatures: int = _DEFAULT.num_temperatures,
                            num_chains: int = _DEFAULT.num_chains,
                            leapfrog_steps: int = _DEFAULT.leapfrog_steps,
                            step_size: float = _DEFAULT.step_size, data_plate_name: str = "data",
                            seed: int | None = None, _start: dict | None = None) -> AnnealedLogLikelihood:
    r"""The log-likelihood :math:`\sum_i \log p(x_i)` by annealed importance sampling from the guide.

    The same as :func:`freqvi.log_likelihood` with ``method="ais"``. See
    :mod:`freqvi.infer.annealed` for the estimator. The temperatures follow
    Grosse et al.'s (2015) sigmoid schedule, :math:`\beta_t \propto \sigma(8t/T - 4)`,
    rescaled to run from 0 to 1. The cost per observation is ``num_temperatures x
    num_chains x (leapfrog_steps + 1)`` evaluations of the model's and the guide's log
    densities and their gradients (:class:`AnnealingSettings`); the result states the
    CPU seconds it took per observation.

    :param num_temperatures: ``T``, the transitions of each chain.
    :param num_chains: ``K``, independent chains per observation (the standard error
        and the effective sample size are across them).
    :param leapfrog_steps: leapfrog steps per HMC transition.
    :param step_size: the leapfrog step on the unconstrained space (unit mass).
    :param _start: private, for :func:`bidirectional_log_likelihood`: exact posterior
        draws to run the reverse chain from.
    :raises ~freqvi.errors.FreqviInputError: for a guide that is not a density over the
        model's latents drawn directly (auxiliary draws, point masses), a discrete latent,
        a latent outside the data plate or a model latent the guide lacks (naming the
        site), a subsampled data plate, a pair that does not broadcast over the chains,
        or non-positive settings.
    """
    settings = AnnealingSettings.checked(num_temperatures=num_temperatures, num_chains=num_chains,
                                         leapfrog_steps=leapfrog_steps, step_size=step_size)
    seed = check_seed(seed)
    data = as_data(data)
    pair = resolve_pair(model, guide)
    model_trace, guide_trace, frame = first_run(pair, data, seed, data_plate_name)
    return anneal(pair, data, frame, (model_trace, guide_trace), settings, start=_start)


def anneal(pair: Pair, data: tuple, frame, traces: tuple[Trace, Trace], settings: AnnealingSettings,
           start: dict | None = None) -> AnnealedLogLikelihood:
    """Annealed importance sampling of a pair already checked (:func:`~freqvi.traces.check_pair`'s
    ``traces``, the data plate's ``frame``): forward from the guide, or, from ``start`` (exact posterior
    draws), reverse, returning the upper bound of :func:`bidirectional_log_likelihood`.

    :raises ~freqvi.errors.FreqviInputError: where the pair cannot be annealed (see
        :func:`annealed_log_likelihood`), before any transition.
    """
    model_trace, guide_trace = traces
    _check_annealable(model_trace, guide_trace, frame)
    dims = max_plate_nesting(model_trace) + 1
    check_particles(pair.model, pair.guide, data, settings.num_chains, dims - 1,
                    "annealed importance sampling")
    began = time.process_time()
    chains = _Chains(pair, data, frame, dims, settings.num_chains)
    betas = _schedule(settings.num_temperatures)
    if start is not None:
        chains.start_at(start)
        betas = betas.flip(0)  # from the posterior (1) back to the guide (0)
    log_w, acceptance = chains.anneal(betas, settings.step_size, settings.leapfrog_steps)
    return _estimate(log_w, acceptance, settings, (time.process_time() - began) / frame.size,
                     reverse=start is not None)


@dataclass
class BidirectionalBounds:
    r"""What :func:`bidirectional_log_likelihood` returns: a stochastic lower and upper bound.

    :ivar lower: forward AIS from the guide, :math:`E[\log \hat p(x)] \le \log p(x)`.
    :ivar upper: reverse AIS from exact posterior draws, :math:`E[\log \hat p(x)] \ge \log p(x)`.
    """

    lower: AnnealedLogLikelihood
    upper: AnnealedLogLikelihood

    @property
    def gap(self) -> float:
        """``upper.total - lower.total``: how far apart the two bounds are, in nats."""
        return self.upper.total - self.lower.total

    def __repr__(self) -> str:
        """One line: the two totals and the gap."""
        return (f"log-likelihood between {self.lower.total:.4f} (forward AIS) and {self.upper.total:.4f} "
                f"(reverse AIS) nats, gap {self.gap:.4f}")


@thread_policy
def bidirectional_log_likelihood(model, data, guide, latents: dict[str, torch.Tensor], *,
                                 num_temperatures: int = _DEFAULT.num_temperatures,
                                 num_chains: int = _DEFAULT.num_chains,
                                 leapfrog_steps: int = _DEFAULT.leapfrog_steps,
                                 step_size: float = _DEFAULT.step_size, data_plate_name: str = "data",
                                 seed: int | None = None) -> BidirectionalBounds:
    r"""Bidirectional Monte Carlo (Grosse et al. 2015) for data simulated from the model.

    Where ``data`` were drawn from the fitted model together with ``latents`` (the
    simulated latent values, ``{site name: value}`` of the model's shapes), each latent is
    an exact draw of its posterior. Reverse AIS starts there, runs the transitions of
    :func:`annealed_log_likelihood` from :math:`\beta = 1` down to 0 and accumulates
    :math:`\log w_{\mathrm{rev}} = \sum_t (\beta_t - \beta_{t-1})[\log q(z_t) - \log p(x, z_t)]`,
    with :math:`E[w_{\mathrm{rev}}] = 1 / p(x)`; so
    :math:`-\log \frac1K \sum_k w_{\mathrm{rev},k}` is a stochastic upper bound, and forward
    AIS (:func:`annealed_log_likelihood`) the lower one. Their gap bounds either's error.

    :param latents: the simulated latent values, one entry per latent site of the model.
    :raises ~freqvi.errors.FreqviInputError: as :func:`annealed_log_likelihood`, and where
        ``latents`` do not name the model's latent sites.
    """
    options = dict(num_temperatures=num_temperatures, num_chains=num_chains, leapfrog_steps=leapfrog_steps,
                   step_size=step_size, data_plate_name=data_plate_name)
    # the reverse run first: it checks the latents before any work
    upper = annealed_log_likelihood(model, data, guide, seed=seed, _start=latents, **options)
    return BidirectionalBounds(annealed_log_likelihood(model, data, guide, **options), upper)


def _check_annealable(model_trace: Trace, guide_trace: Trace, frame) -> None:
    n = frame.full_size or frame.size
    if frame.size != n:
        raise FreqviInputError(f"annealed importance sampling runs over all rows at once; the data plate "
                               f"{frame.name!r} draws {frame.size} of its {n} rows (subsample_size): declare "
                               f"pyro.plate({frame.name!r}, {n}).")
    guide_sites, model_sites = latent_sites(guide_trace), latent_sites(model_trace)
    for name, site in guide_sites.items():
        if is_auxiliary(site) or is_point_mass(site["fn"]):
            raise FreqviInputError(
                f"annealed importance sampling needs a guide that draws the model's latent sites directly "
                f"(freqvi's LocalMeanField or AmortizedNormal, a hand-written guide); its site {name!r} is "
                "an auxiliary draw or a point mass (an autoguide's): use log_likelihood's importance "
                "sampling.")
    for name, site in model_sites.items():
        if site["fn"].support.is_discrete:
            raise FreqviInputError(f"annealed importance sampling moves continuous latents by Hamiltonian "
                                   f"Monte Carlo; the model's site {name!r} is discrete.")
        if name not in guide_sites:
            raise FreqviInputError(f"the model's latent site {name!r} has no site in the guide: annealed "
                                   "importance sampling starts every latent at a draw of the guide.")
    outside = outside_data_plate(model_sites, frame)
    if outside:
        raise FreqviInputError(f"the latent site(s) {outside} lie outside the data plate {frame.name!r}: "
                               "annealed importance sampling here anneals each observation's latents alone.")


def _schedule(num_temperatures: int) -> torch.Tensor:
    """:math:`\\beta_0 = 0 < \\ldots < \\beta_T = 1`, sigmoid-spaced (Grosse et al. 2015), float64."""
    s = torch.sigmoid(torch.linspace(-4.0, 4.0, num_temperatures + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


class _Chains:
    """``K`` chains per observation on the unconstrained space, their log densities and HMC moves."""

    def __init__(self, pair, data, frame, dims: int, k: int):
        self.data, self.frame, self.dims, self.k = data, frame, dims, k
        self.model, self.guide = (on_rows(program, frame.name, k, dims)
                                  for program in (pair.model, pair.guide))
        with torch.no_grad():
            self.sites = latent_sites(trace(self.guide, *data))
        self.transforms = {name: biject_to(site["fn"].support) for name, site in self.sites.items()}
        self.u = {name: self.transforms[name].inv(site["value"]).detach()
                  for name, site in self.sites.items()}
        self.arrangement = None

    def start_at(self, latents: dict[str, torch.Tensor]) -> None:
        """Every chain starts at the given latent values (broadcast over the chains)."""
        if set(latents) != set(self.u):
            raise FreqviInputError(f"latents must give a value for each of the model's latent sites "
                                   f"{sorted(self.u)}; got {sorted(latents)}.")
        self.u = {name: self.transforms[name].inv(torch.as_tensor(latents[name], dtype=value.dtype))
                  .expand_as(value).clone() for name, value in self.u.items()}

    def densities(self, u: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log p(x_i, z), log q(z | x_i), log|det dT/du|)`` at ``z = T(u)``, each ``(K, n)``."""
        z = {name: self.transforms[name](value) for name, value in u.items()}
        given = Trace()
        for name, value in z.items():
            given.add_node(name, type="sample", is_observed=False, value=value, infer={})
        self.arrangement = arrange(self.model, poutine.replay(self.guide, trace=given), self.data, self.k,
                                   self.dims, self.frame.name)
        log_p = self.arrangement.model_parts(self.arrangement.model_trace)[0]
        log_q = log_p - self.arrangement.parts({})[0][0]
        log_det = sum(self._per_observation(name, transform.log_abs_det_jacobian(u[name], z[name]))
                      for name, transform in self.transforms.items())
        return log_p, log_q, log_det

    def _per_observation(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """A tensor over a site's batch and (unconstrained) event dimensions, summed to ``(K, n)``."""
        site = self.sites[name]
        batch_dims = site["value"].dim() - site["fn"].event_dim
        return self.arrangement.reduce(site, sum_rightmost(values, values.dim() - batch_dims))[0]

    def _laid(self, name: str, per_obs: torch.Tensor) -> torch.Tensor:
        """A ``(K, n)`` tensor shaped to broadcast against site ``name``'s unconstrained value."""
        site, value = self.sites[name], self.u[name]
        batch_dims = site["value"].dim() - site["fn"].event_dim
        shape = [1] * value.dim()
        shape[batch_dims - self.dims], shape[batch_dims + self.frame.dim] = self.k, self.frame.size
        return per_obs.reshape(shape)

    def _target(self, u, beta: float):
        """``log f_beta`` on the unconstrained space, its gradient, and the two log densities."""
        u = {name: value.detach().requires_grad_() for name, value in u.items()}
        log_p, log_q, log_det = self.densities(u)
        target = (1 - beta) * log_q + beta * log_p + log_det
        grads = torch.autograd.grad(target.sum(), list(u.values()))
        return target.detach(), dict(zip(u, grads, strict=True)), log_p.detach(), log_q.detach()

    def _hmc(self, beta: float, step: float, steps: int) -> torch.Tensor:
        """One HMC transition of every chain at ``beta``; returns which were accepted, ``(K, n)``."""
        target, grad, log_p, log_q = self._target(self.u, beta)
        momentum = {name: torch.randn_like(value) for name, value in self.u.items()}
        energy = -target + self._kinetic(momentum)
        u = dict(self.u)
        for _ in range(steps):
            momentum = {name: r + 0.5 * step * grad[name] for name, r in momentum.items()}
            u = {name: value + step * momentum[name] for name, value in u.items()}
            new_target, grad, new_log_p, new_log_q = self._target(u, beta)
            momentum = {name: r + 0.5 * step * grad[name] for name, r in momentum.items()}
        new_energy = -new_target + self._kinetic(momentum)
        accept = torch.rand_like(energy).log() < (energy - new_energy).nan_to_num(nan=-math.inf)
        self.u = {name: torch.where(self._laid(name, accept), u[name].detach(), value)
                  for name, value in self.u.items()}
        self.log_p, self.log_q = torch.where(accept, new_log_p, log_p), torch.where(accept, new_log_q, log_q)
        return accept

    def _kinetic(self, momentum) -> torch.Tensor:
        return sum(self._per_observation(name, 0.5 * r.square()) for name, r in momentum.items()).detach()

    def anneal(self, betas: torch.Tensor, step: float, steps: int) -> tuple[torch.Tensor, float]:
        """Runs the chains along ``betas``; returns the log weights ``(K, n)`` and the acceptance rate."""
        with torch.no_grad():
            log_p, log_q, _ = self.densities(self.u)
        self.log_p, self.log_q = log_p, log_q
        log_w, accepted = torch.zeros_like(log_p, dtype=torch.float64), 0.0
        for previous, beta in zip(betas[:-1].tolist(), betas[1:].tolist(), strict=True):
            log_w += (beta - previous) * (self.log_p - self.log_q).double()
            accepted += float(self._hmc(beta, step, steps).double().mean())
        return log_w, accepted / (len(betas) - 1)


def _estimate(log_w: torch.Tensor, acceptance: float, settings: AnnealingSettings, cpu: float,
              reverse: bool) -> AnnealedLogLikelihood:
    """The result from the chains' log weights ``(K, n)``; ``reverse``: the weights are reverse AIS's,
    :math:`1 / \\hat p`, and the estimate is minus their log mean."""
    summary = summarize(log_w)
    sign = -1.0 if reverse else 1.0
    per_obs = sign * summary.log_mean
    return AnnealedLogLikelihood(
        total=float(per_obs.sum()), per_observation=per_obs,
        standard_error=float(summary.standard_error.square().sum().sqrt()), pareto_k=None, method="ais",
        num_samples=settings.num_chains, proposal="guide", per_observation_se=summary.standard_error,
        effective_sample_size=summary.effective_sample_size, cpu_seconds_per_observation=cpu,
        acceptance_rate=acceptance, settings=settings)
