"""``log_likelihood``: the fitted model's log-likelihood, exact or importance-sampled."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import config_enumerate
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.subsample_messenger import _Subsample

from freqvi.errors import FreqviInputError, ImportanceSamplingWarning
from freqvi.infer.pair import Pair, resolve_pair
from freqvi.infer.vectorize import check_particles
from freqvi.traces import check_pair, data_plate, latent_sites, max_plate_nesting, trace
from freqvi.validation import as_data, check_choice, check_positive_int

METHODS = ("auto", "exact", "importance")
PARETO_K_THRESHOLD = 0.7


@dataclass
class LogLikelihood:
    """What :func:`log_likelihood` returns.

    :ivar total: :math:`\\ell = \\sum_i \\log p(x_i)`.
    :ivar per_observation: :math:`\\log p(x_i)`, shape ``(n,)``.
    :ivar standard_error: Monte-Carlo standard error of ``total`` (0 when exact).
    :ivar pareto_k: PSIS :math:`\\hat k` per observation, shape ``(n,)``; ``None`` when exact.
    :ivar method: ``"exact"`` or ``"importance"``.
    :ivar num_samples: importance samples per observation (0 when exact).
    """

    total: float
    per_observation: torch.Tensor
    standard_error: float
    pareto_k: np.ndarray | None
    method: str
    num_samples: int = 0

    def to_inference_data(self, name: str = "obs"):
        """``per_observation`` as ArviZ's ``log_likelihood`` group (one chain, one draw).

        ``name`` is the observed variable's name in that group.
        """
        import arviz as az  # deferred: importing ArviZ is slow

        return az.from_dict(log_likelihood={name: self.per_observation.detach().numpy()[None, None]})


def log_likelihood(
    model,
    guide=None,
    data=None,
    *,
    num_samples: int = 1000,
    method: str = "auto",
    chunk_size: int | None = None,
    data_plate_name: str = "data",
    seed: int | None = None,
) -> LogLikelihood:
    r"""The log-likelihood :math:`\ell(\theta) = \sum_i \log \int p(x_i, z; \theta)\,dz`.

    Routes, in the order ``method="auto"`` tries them:

    * **exact**, by the model's closed-form marginal (a freqvi model's
      ``log_marginal``: log-sum-exp for mixtures, the Gaussian integral for
      factor analysis), or by enumeration when every latent site is discrete
      (all sums carried out by Pyro's tensor contraction, keeping the data plate);
    * **importance**, with the guide as proposal: for each observation,
      :math:`\hat p(x_i) = \frac1K \sum_k w_{ik}`, :math:`w_{ik} = p(x_i,
      z_{ik}) / q(z_{ik} \mid x_i)`, :math:`z_{ik} \sim q`. The standard error of
      :math:`\log \hat p(x_i)` is :math:`\mathrm{sd}(w_i) / (\sqrt K\, \bar w_i)`
      (delta method), summed in quadrature over ``i``. PSIS (Vehtari et al.
      2024, via :func:`arviz.psislw`) gives each observation's Pareto
      :math:`\hat k`; above 0.7 the estimate cannot be trusted and a warning says so.
      Latent sites of the model that the guide lacks are drawn from the model's
      prior, which then cancels from the weight.

    Every latent site must sit inside the data plate ``data_plate_name``.

    :param num_samples: ``K``, importance samples per observation.
    :param chunk_size: samples drawn at once (default: bounded to ~4 million
        log-density entries per chunk).
    """
    check_choice(method, "method", METHODS)
    num_samples = check_positive_int(num_samples, "num_samples")
    data = as_data(data)
    pair = resolve_pair(model, guide, require_guide=False)
    if seed is not None:
        pyro.set_rng_seed(seed)
    if pair.guide is not None:
        model_trace, _ = check_pair(pair.model, pair.guide, data)
    else:
        model_trace = trace(pair.model, *data)
    n = data[0].shape[0]
    frame = data_plate(model_trace, data_plate_name, n)
    exact = exact_route(pair, model_trace)
    if method == "exact" and exact is None:
        raise FreqviInputError(
            "no exact log-likelihood for this model: it has continuous latent sites and no "
            "log_marginal(); use method='importance' with a guide."
        )
    if exact is not None and method != "importance":
        with torch.no_grad():
            per_obs = exact(data, frame)
        return LogLikelihood(float(per_obs.double().sum()), per_obs, 0.0, None, "exact")
    if pair.guide is None:
        raise FreqviInputError("importance sampling needs a guide as proposal: pass guide=...")
    chunk = chunk_size or max(1, min(num_samples, 4_000_000 // max(n, 1)))
    check_particles(pair.model, pair.guide, data, num_samples, max_plate_nesting(model_trace),
                    "log_likelihood's importance sampling")
    with torch.no_grad():
        log_w = torch.cat([
            _log_weights(pair, data, frame, k, model_trace)
            for k in _chunks(num_samples, check_positive_int(chunk, "chunk_size"))
        ])  # (K, n)
    return _importance_estimate(log_w)


def exact_route(pair: Pair, model_trace):
    """``f(data, frame, wrap) -> log p(x_i)``, shape ``(n,)``, where one exists; else ``None``.

    ``wrap`` (default: none) is applied to the program before it runs, e.g.
    ``poutine.substitute`` to evaluate it at other parameter values.
    """
    if pair.owner is not None and hasattr(pair.owner, "log_marginal"):
        return lambda data, frame, wrap=_unwrapped: wrap(pair.owner.log_marginal)(*data)
    latents = latent_sites(model_trace)
    if latents and all(site["fn"].has_enumerate_support for site in latents.values()):
        return lambda data, frame, wrap=_unwrapped: _enumerated(wrap(pair.model), data, model_trace, frame)
    return None


def _unwrapped(fn):
    return fn


def _enumerated(model, data, model_trace, frame) -> torch.Tensor:
    """``log p(x_i)`` by summing every discrete latent out, keeping the data plate."""
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
    target = frozenset({tr.plate_to_symbol[frame.name]})
    return contract_to_tensor(factors, sum_dims, target_ordinal=target).reshape(-1)


def _chunks(total: int, size: int):
    while total > 0:
        yield min(size, total)
        total -= size


def _log_weights(pair: Pair, data, frame, k: int, model_trace) -> torch.Tensor:
    """``log p(x_i, z_ik) - log q(z_ik | x_i)`` for ``k`` draws, shape ``(k, n)``."""
    particle_dim = -max_plate_nesting(model_trace) - 1
    particles = pyro.plate("_num_samples", k, dim=particle_dim)
    guide_tr = trace(particles(pair.guide), *data)
    model_tr = trace(poutine.replay(particles(pair.model), trace=guide_tr), *data)
    proposed = latent_sites(guide_tr)
    log_w = 0.0
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            if not site["is_observed"] and name not in proposed:
                continue  # drawn from the model's prior: prior / proposal = 1
            log_w = log_w + sign * per_observation(site, particle_dim, frame)
    return log_w.expand(k, data[0].shape[0])


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


def _pareto_k(log_w: torch.Tensor, eps: float) -> np.ndarray:
    """PSIS k-hat per observation (ArviZ); ``-inf`` where the weights are constant.

    Constant weights mean the proposal is the exact posterior: the estimate has
    no Monte-Carlo error, and a Pareto tail cannot (and need not) be fitted.
    """
    import arviz as az  # deferred: importing ArviZ is slow and prints a notice

    spread = log_w.max(0).values - log_w.min(0).values
    constant = (spread <= 1e2 * eps * log_w.abs().max(0).values).numpy()
    pareto_k = np.full(log_w.shape[1], -np.inf)
    if not constant.all():
        _, k = az.psislw(log_w[:, ~constant].T.numpy())
        pareto_k[~constant] = np.asarray(k)
    return pareto_k


def _importance_estimate(log_w: torch.Tensor) -> LogLikelihood:
    k = log_w.shape[0]
    log_w64 = log_w.double()
    per_obs = torch.logsumexp(log_w64, 0) - math.log(k)
    w = torch.exp(log_w64 - log_w64.max(0).values)
    se_obs = w.std(0, correction=1) / (math.sqrt(k) * w.mean(0)) if k > 1 \
        else torch.full_like(per_obs, float("inf"))
    pareto_k = _pareto_k(log_w64, torch.finfo(log_w.dtype).eps)
    bad = int((pareto_k > PARETO_K_THRESHOLD).sum())
    if bad:
        warnings.warn(
            f"{bad} of {len(pareto_k)} observations have PSIS k-hat > {PARETO_K_THRESHOLD} "
            f"(max {pareto_k.max():.2f}): their importance-sampling estimates cannot be trusted. The "
            "weights are heavy-tailed where the guide's tails are lighter than the posterior's; more "
            "samples do not cure that: use a proposal with heavier tails (e.g. a Student-t guide with the "
            "fitted guide's location and scale) or a guide closer to the posterior.",
            ImportanceSamplingWarning,
            stacklevel=3,
        )
    return LogLikelihood(
        total=float(per_obs.sum()),
        per_observation=per_obs.to(log_w.dtype),
        standard_error=float(se_obs.square().sum().sqrt()),
        pareto_k=pareto_k,
        method="importance",
        num_samples=k,
    )
