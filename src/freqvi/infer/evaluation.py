"""How good is the approximation? The ELBO's two terms and the amortisation gap.

Both complement :func:`freqvi.log_likelihood` (the held-out log-likelihood by
importance sampling): the gap ``log p(x) - ELBO`` is the KL from q to the exact
posterior, and the amortisation gap is the part of it that a shared encoder adds
to the best guide of its family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import TraceMeanField_ELBO
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import kl_divergence, transform_to

from freqvi.errors import FreqviInputError
from freqvi.guides import AmortizedNormal, LocalMeanField
from freqvi.infer.log_likelihood import per_observation
from freqvi.infer.pair import first_run, resolve_pair
from freqvi.infer.threads import thread_policy
from freqvi.infer.vectorize import check_particles
from freqvi.traces import latent_sites, max_plate_nesting, trace
from freqvi.validation import as_data, check_positive_float, check_positive_int, check_seed


@dataclass
class ELBOTerms:
    r"""The ELBO split as :math:`\mathrm{ELBO} = \text{reconstruction} - \mathrm{KL}`, totals over data.

    :ivar elbo: :math:`\sum_i \mathbb E_q \log p(x_i \mid z_i) - \mathrm{KL}(q(z_i \mid x_i) \,\|\, p(z_i))`.
    :ivar reconstruction: :math:`\sum_i \mathbb E_q \log p(x_i \mid z_i)`.
    :ivar kl: :math:`\sum_i \mathrm{KL}(q(z_i \mid x_i) \,\|\, p(z_i))`.
    :ivar per_observation: the ELBO of each observation, shape ``(n,)``.
    :ivar standard_error: Monte-Carlo standard error of ``elbo``.
    :ivar analytic_kl: whether every latent site's KL was in closed form (else Monte Carlo).
    :ivar num_samples: draws from q per observation.
    """

    elbo: float
    reconstruction: float
    kl: float
    per_observation: torch.Tensor
    standard_error: float
    analytic_kl: bool
    num_samples: int

    def __repr__(self) -> str:
        n = len(self.per_observation)
        kl = "analytic" if self.analytic_kl else "Monte-Carlo"
        return (f"ELBOTerms: ELBO {self.elbo:.6g} nats (s.e. {self.standard_error:.3g}) over {n} "
                f"observations = reconstruction {self.reconstruction:.6g} - KL {self.kl:.6g} ({kl} KL, "
                f"{self.num_samples} draws each)")


@thread_policy
def elbo_terms(model, data, guide=None, *, num_samples: int = 100, data_plate_name: str = "data",
               seed: int | None = None) -> ELBOTerms:
    r"""Estimates the reconstruction term and the KL term of the ELBO per observation.

    With ``K = num_samples`` draws :math:`z_{ik} \sim q(z_i \mid x_i)`, the
    reconstruction term is :math:`\frac1K \sum_k \log p(x_i \mid z_{ik})` (every
    observed site) and the KL term :math:`\mathrm{KL}(q \| p)` in closed form where
    :func:`torch.distributions.kl_divergence` has it (as
    :class:`~pyro.infer.TraceMeanField_ELBO` does), else :math:`\frac1K \sum_k \log
    q(z_{ik}) - \log p(z_{ik})`. The standard error is that of the per-draw ELBO's
    mean, summed in quadrature over observations. Every site must sit inside the
    plate ``data_plate_name``; latent sites are those of the guide.
    """
    seed = check_seed(seed)
    num_samples = check_positive_int(num_samples, "num_samples")
    data = as_data(data)
    pair = resolve_pair(model, guide)
    model_trace, _, frame = first_run(pair, data, seed, data_plate_name)
    particle_dim = -max_plate_nesting(model_trace) - 1
    check_particles(pair.model, pair.guide, data, num_samples, -particle_dim - 1, "elbo_terms")
    particles = pyro.plate("_num_samples", num_samples, dim=particle_dim)
    with torch.no_grad():
        guide_tr = trace(particles(pair.guide), *data)
        model_tr = trace(poutine.replay(particles(pair.model), trace=guide_tr), *data)
        reconstruction = sum(per_observation(site, particle_dim, frame)
                             for site in model_tr.nodes.values() if _observed(site))
        kl, analytic = 0.0, True
        for name, q_site in latent_sites(guide_tr).items():
            site_kl, exact = _site_kl(q_site, model_tr.nodes[name], particle_dim, frame)
            kl, analytic = kl + site_kl, analytic and exact
    shape = (num_samples, data[0].shape[0])
    per_draw = (reconstruction - kl).expand(shape).double()
    per_obs = per_draw.mean(0)
    se = per_draw.std(0, correction=1).square().sum().sqrt() / math.sqrt(num_samples) if num_samples > 1 \
        else torch.tensor(math.inf)
    recon = float(reconstruction.expand(shape).double().mean(0).sum())
    return ELBOTerms(float(per_obs.sum()), recon, recon - float(per_obs.sum()), per_obs.to(data[0].dtype),
                     float(se), analytic, num_samples)


def _observed(site: dict) -> bool:
    return site["type"] == "sample" and site["is_observed"] and not isinstance(site["fn"], _Subsample)


def _site_kl(q_site: dict, p_site: dict, particle_dim: int, frame) -> tuple[torch.Tensor, bool]:
    """``KL(q || p)`` of one latent site per particle and observation, and whether in closed form."""
    try:
        kl = kl_divergence(q_site["fn"], p_site["fn"])
    except NotImplementedError:
        log_q = per_observation(q_site, particle_dim, frame)
        return log_q - per_observation(p_site, particle_dim, frame), False
    # per_observation reduces a site's log_prob; a copy of the site holding the KL reduces the KL alike
    return per_observation({**q_site, "fn": _Constant(kl)}, particle_dim, frame), True


class _Constant:
    """Stands in for a distribution whose ``log_prob`` is a fixed tensor."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def log_prob(self, _) -> torch.Tensor:
        return self.value


@dataclass
class AmortizationGap:
    r"""ELBO with the encoder versus with per-observation optimised guide parameters.

    :ivar encoder_elbo: the ELBO of each observation under the encoder's :math:`q_\phi(z_i \mid x_i)`,
        shape ``(n,)``.
    :ivar optimized_elbo: the ELBO under free Gaussian factors :math:`q_{\lambda_i}`
        started at the encoder's output and maximised with the model fixed, shape ``(n,)``.
    :ivar gap: ``sum(optimized_elbo - encoder_elbo)``: the amortisation gap (>= 0 up to
        Monte-Carlo and optimisation error).
    :ivar standard_error: Monte-Carlo standard error of ``gap``.
    """

    encoder_elbo: torch.Tensor
    optimized_elbo: torch.Tensor
    gap: float
    standard_error: float

    def __repr__(self) -> str:
        return (f"AmortizationGap: {self.gap:.4g} nats over {len(self.encoder_elbo)} observations "
                f"(s.e. {self.standard_error:.3g}), {self.gap / len(self.encoder_elbo):.4g} per observation")


@thread_policy
def amortization_gap(model, data, guide: AmortizedNormal, *, num_steps: int = 500, lr: float = 0.02,
                     num_samples: int = 1000, seed: int | None = None) -> AmortizationGap:
    r"""The amortisation gap on ``data`` (a few observations): how much ELBO the shared encoder gives up.

    A :class:`~freqvi.guides.LocalMeanField` guide gets, for each observation, the
    encoder's :math:`(\mu_\phi(x_i), \sigma_\phi(x_i))` as starting values, and
    ``num_steps`` Adam steps on the analytic-KL ELBO
    (:class:`~pyro.infer.TraceMeanField_ELBO`) over those local parameters only; the
    model's parameters stay fixed. Both ELBOs are then estimated by
    :func:`elbo_terms` with ``num_samples`` draws. The model's latent sites must sit
    in the data plate at dim -1 (one latent vector per observation).

    :param model: the model callable (or a freqvi model, whose ``model`` is used).
    :param data: a few observations (one array or a tuple of arrays).
    :param guide: the trained amortised guide.
    """
    pair = resolve_pair(model, guide)
    if not isinstance(guide, AmortizedNormal):
        raise FreqviInputError(f"guide must be an AmortizedNormal; got {type(guide).__name__}.")
    num_steps = check_positive_int(num_steps, "num_steps")
    lr = check_positive_float(lr, "lr")
    seed = check_seed(seed)
    data = as_data(data)
    if seed is not None:
        pyro.set_rng_seed(seed)
    local = LocalMeanField(pair.model)
    local(*data)  # creates the local parameters
    _start_from_encoder(local, guide, data)
    _maximize_local(pair.model, local, data, num_steps, lr)
    encoder = elbo_terms(pair.model, data, guide, num_samples=num_samples)
    optimized = elbo_terms(pair.model, data, local, num_samples=num_samples)
    gap = float((optimized.per_observation - encoder.per_observation).double().sum())
    return AmortizationGap(encoder.per_observation, optimized.per_observation, gap,
                           math.hypot(encoder.standard_error, optimized.standard_error))


def _start_from_encoder(local: LocalMeanField, guide: AmortizedNormal, data) -> None:
    """Copies the encoder's ``(loc, scale)`` of every observation into the local guide's parameters."""
    with torch.no_grad():
        trace(guide, *data)  # the guide learns its latent sites on its first call
        loc, scale = guide.encoder(*data)
        sizes = [math.prod(s) for s in guide.latent_shapes.values()]
        columns = zip(loc.split(sizes, -1), scale.split(sizes, -1), strict=True)
        for (name, shape), (site_loc, site_scale) in zip(guide.latent_shapes.items(), columns, strict=True):
            safe = name.replace(".", "_")
            for kind, value in (("loc", site_loc), ("scale", site_scale)):
                target = getattr(local, f"{safe}_{kind}_unconstrained")
                value = value.reshape(len(value), *shape)
                if value.shape != target.shape:
                    raise FreqviInputError(
                        f"latent site {name!r} has local parameters of shape {tuple(target.shape)}, "
                        f"the encoder gives {tuple(value.shape)}: the amortisation gap needs one latent "
                        "value per observation, in the data plate at dim -1."
                    )
                constraint = constraints.real if kind == "loc" else constraints.positive
                target.copy_(transform_to(constraint).inv(value.to(target.dtype)))


def _maximize_local(model, local: LocalMeanField, data, num_steps: int, lr: float) -> None:
    """Adam on the local parameters; gradients reach nothing else (``autograd.grad``, not ``.grad``)."""
    params = list(local.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    fixed_model = poutine.block(model, hide_types=["param"])
    estimator = TraceMeanField_ELBO()
    for _ in range(num_steps):
        loss = estimator.differentiable_loss(fixed_model, local, *data)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
