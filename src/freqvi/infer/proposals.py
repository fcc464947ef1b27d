r"""Importance proposals built from a guide: itself, a Student-t, a defensive mixture, an adaptive Student-t.

Importance sampling estimates :math:`p(x_i) = E_r[p(x_i, z) / r(z)]` for any proposal
:math:`r` whose support covers the posterior's; its variance is finite only where
:math:`p(z \mid x_i)^2 / r(z)` is integrable, i.e. where :math:`r`'s tails are at least
as heavy as the posterior's. A Gaussian guide fitted by the ELBO (which penalises
mass where the posterior has none) is typically lighter-tailed than the posterior,
and PSIS :math:`\hat k > 0.7` flags the resulting heavy-tailed weights. The
proposals here keep the guide's location and scale and widen its tails:

* :class:`GuideProposal`: :math:`r = q`, the guide itself;
* :class:`StudentTProposal`: each Normal factor :math:`N(m, s^2)` of the guide
  becomes :math:`t_\nu(m, s)` (a MultivariateNormal :math:`N(m, LL^\top)`
  becomes the multivariate :math:`t_\nu(m, L)`), whose polynomial tails dominate
  any Gaussian posterior tail (Geweke 1989);
* :class:`DefensiveMixtureProposal`: each Normal factor becomes
  :math:`(1 - \alpha) N(m, s^2) + \alpha N(m, c^2 s^2)`, so that
  :math:`w = p(x, z) / r(z) \le p(x, z) / (\alpha N(z; m, c^2 s^2))`: the weights
  are bounded wherever the wide component's tails dominate the posterior's
  (Hesterberg 1995, "Weighted average importance sampling and defensive
  mixture distributions", *Technometrics* 37(2));
* :class:`AdaptiveStudentTProposal`: the Student-t moved, for each observation, to
  that observation's posterior mean and covariance, estimated from pilot draws by
  importance-weighted moment matching (:mod:`freqvi.infer.adaptive`; Paananen et al.
  2021), which corrects a guide whose location and scale are off from the posterior
  (an amortised encoder's amortisation gap), not only its tails. What it draws from
  in the end is a :class:`MomentMatchedStudentT`, one :class:`SiteStudentT` per site.

A proposal replaces the distribution of every latent sample site the guide draws
(auxiliary ones included) by a Pyro handler, keeping its support transform
(``TransformedDistribution``), its ``to_event`` dimensions and its mask, so that
freqvi's guides (:class:`~freqvi.guides.LocalMeanField`,
:class:`~freqvi.guides.AmortizedNormal`) and Pyro's ``AutoNormal``,
``AutoDiagonalNormal`` and ``AutoMultivariateNormal`` can all be widened. The point
masses through which an autoguide hands its auxiliary draw to the model are
left as they are: they are functions of the widened draw and carry its Jacobian.
:func:`choose_proposal` settles ``"auto"``, :func:`~freqvi.log_likelihood`'s default:
the adaptive Student-t where every draw of the guide can be widened and the weights are
per observation over all rows at once, the plain Student-t where the data plate is
subsampled, the guide otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

from freqvi.errors import FreqviInputError
from freqvi.traces import is_point_mass, latent_sites

PROPOSALS = ("auto", "guide", "student_t", "mixture", "adaptive")


class Proposal:
    """A proposal built from a guide: ``wrap(guide)`` returns the guide with its draws replaced."""

    def wrap(self, guide: Callable) -> Callable:
        """``guide`` run under a handler that replaces each latent site's Normal factor (see module)."""
        return _Widening(self)(guide)

    def at(self, name: str) -> Proposal:
        """The proposal that replaces the site ``name``: this one, unless it holds settings per site."""
        return self

    def check(self, guide_trace) -> None:
        """Raises :class:`~freqvi.errors.FreqviInputError`, naming the site, where a latent site of
        ``guide_trace`` (a run of the guide) cannot be replaced."""
        for name, site in drawn_sites(guide_trace).items():
            _replaced(site["fn"], self, name)

    def normal(self, loc: torch.Tensor, scale: torch.Tensor, event_dims: int) -> dist.Distribution:
        """The replacement of ``Normal(loc, scale).to_event(event_dims)``."""
        raise NotImplementedError

    def multivariate_normal(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> dist.Distribution:
        """The replacement of ``MultivariateNormal(loc, scale_tril=scale_tril)``."""
        raise NotImplementedError


@dataclass(frozen=True)
class GuideProposal(Proposal):
    """The guide itself, :math:`r = q`."""

    def wrap(self, guide: Callable) -> Callable:
        """``guide``, unchanged."""
        return guide

    def check(self, guide_trace) -> None:
        """Any guide is its own proposal (point masses are refused elsewhere)."""

    def __str__(self) -> str:
        return "guide"


@dataclass(frozen=True)
class StudentTProposal(Proposal):
    r"""Each Normal factor :math:`N(m, s^2)` of the guide replaced by a Student-t :math:`t_\nu(m, s)`.

    :param df: the degrees of freedom :math:`\nu > 0`; the smaller, the heavier the tails
        (the variance :math:`s^2 \nu / (\nu - 2)` exists for :math:`\nu > 2`).
    :raises FreqviInputError: for ``df`` not a positive finite number.
    """

    df: float = 3.0

    def __post_init__(self):
        _check_positive(self.df, "df", "the Student-t's degrees of freedom")

    def normal(self, loc, scale, event_dims):
        return dist.StudentT(loc.new_tensor(self.df), loc, scale).to_event(event_dims)

    def multivariate_normal(self, loc, scale_tril):
        return dist.MultivariateStudentT(loc.new_tensor(self.df), loc, scale_tril)

    def __str__(self) -> str:
        return f"student-t(df={self.df:g})"


@dataclass(frozen=True)
class AdaptiveStudentTProposal(StudentTProposal):
    r"""A Student-t :math:`t_\nu` per observation at its posterior's moments, adapted from pilot draws.

    The settings of per-observation adaptive importance sampling by importance-weighted
    moment matching (Paananen, Piironen, Bürkner and Vehtari 2021, "Implicitly adaptive
    importance sampling", *Statistics and Computing* 31; Cappé, Guillin, Marin and Robert
    2004, "Population Monte Carlo", *JCGS* 13): it starts as :class:`StudentTProposal`
    (the guide's location and scale) and :func:`~freqvi.infer.adaptive.adapt` moves each
    observation's Student-t, ``adaptations`` times, to the self-normalised importance-weighted
    mean (first round) and then mean and covariance of ``ceil(pilot_fraction * K)`` pilot
    draws, keeping a move only where it lowers that observation's PSIS :math:`\hat k`. The result, a
    :class:`MomentMatchedStudentT`, is what the estimate draws its ``K`` fresh draws from.

    :param df: the degrees of freedom :math:`\nu > 0`, of the first and the adapted Student-t.
    :param pilot_fraction: each round's pilot draws per observation, as a share of ``K``
        (``num_samples``); the pilot rounds cost ``(1 + adaptations) * pilot_fraction * K``
        draws per observation on top of the estimate's ``K``.
    :param adaptations: the rounds of moment matching (0: the plain Student-t).
    :raises FreqviInputError: for ``df`` or ``pilot_fraction`` not a positive finite number,
        or ``adaptations`` not a non-negative integer.
    """

    pilot_fraction: float = 0.5
    adaptations: int = 2

    def __post_init__(self):
        super().__post_init__()
        _check_positive(self.pilot_fraction, "pilot_fraction", "the pilot draws' share of num_samples")
        rounds = self.adaptations
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise FreqviInputError(f"adaptations (the rounds of moment matching) must be a non-negative "
                                   f"integer; got {self.adaptations!r}.")

    def pilot_size(self, num_samples: int) -> int:
        """Pilot draws per observation in each round, for an estimate from ``num_samples`` draws."""
        return math.ceil(self.pilot_fraction * num_samples)

    def __str__(self) -> str:
        rounds = f"{self.adaptations} round{'s' * (self.adaptations != 1)}"
        return f"adaptive student-t(df={self.df:g}, {rounds} of {self.pilot_fraction:g}K pilot draws)"


@dataclass(frozen=True, eq=False)
class SiteStudentT(Proposal):
    r"""One latent site's Student-t at given locations and scales, the guide's own ignored.

    Shapes are the site's draw on its base (unconstrained) space without the particle
    dimension: ``loc`` has the site's batch and event shape; ``scale_tril`` adds one
    trailing dimension (a full covariance over the last event dimension, independent
    across the others: :math:`t_\nu(m, LL^\top)`), or ``scale`` has ``loc``'s shape
    (independent scalar Student-t's, for a site without event dimensions).
    """

    df: float
    loc: torch.Tensor
    scale: torch.Tensor | None = None
    scale_tril: torch.Tensor | None = None

    def normal(self, loc, scale, event_dims):
        if self.scale_tril is None:
            return dist.StudentT(self.loc.new_tensor(self.df), self.loc, self.scale).to_event(event_dims)
        return self.multivariate_normal(loc, None).to_event(event_dims - 1)

    def multivariate_normal(self, loc, scale_tril):
        return dist.MultivariateStudentT(self.loc.new_tensor(self.df), self.loc, self.scale_tril)


@dataclass(frozen=True, eq=False)
class MomentMatchedStudentT(Proposal):
    """A Student-t per latent site at adapted locations and scales (:class:`SiteStudentT`), as
    :func:`~freqvi.infer.adaptive.adapt` builds it; a site it does not hold keeps the guide's
    (:class:`StudentTProposal`).

    :ivar sites: the site's name to its Student-t.
    :ivar settings: the settings it was adapted under; its name is theirs.
    """

    sites: dict[str, SiteStudentT]
    settings: AdaptiveStudentTProposal

    def at(self, name: str) -> Proposal:
        return self.sites.get(name, self.settings)

    def __str__(self) -> str:
        return str(self.settings)


@dataclass(frozen=True)
class DefensiveMixtureProposal(Proposal):
    r"""Each Normal factor :math:`N(m, s^2)` replaced by :math:`(1-\alpha) N(m, s^2) + \alpha N(m, c^2 s^2)`.

    The mixture is over the factor's whole event (one component per draw, as
    Hesterberg 1995 has it), so the weight is at most :math:`1/\alpha` times the
    weight of the wide component alone.

    :param weight: :math:`\alpha \in (0, 1)`, the wide component's share.
    :param widen: :math:`c \ge 1`, the wide component's scale relative to the guide's.
    :raises FreqviInputError: for ``weight`` outside (0, 1) or ``widen`` below 1.
    """

    weight: float = 0.2
    widen: float = 3.0

    def __post_init__(self):
        _check_positive(self.widen, "widen", "the wide component's scale factor")
        if not 0 < self.weight < 1:
            raise FreqviInputError(f"weight (the wide component's share) must lie in (0, 1); "
                                   f"got {self.weight!r}.")
        if self.widen < 1:
            raise FreqviInputError(f"widen (the wide component's scale factor) must be at least 1; "
                                   f"got {self.widen!r}.")

    def _mixing(self, like: torch.Tensor, batch_shape: torch.Size) -> dist.Categorical:
        """The component choice, one per draw (torch's sampler wants it in the mixture's full batch shape)."""
        return dist.Categorical(probs=like.new_tensor([1 - self.weight, self.weight])).expand(batch_shape)

    def normal(self, loc, scale, event_dims):
        at = loc.dim() - event_dims  # the component dimension sits just left of the event
        loc, scale = torch.broadcast_tensors(loc, scale)
        components = dist.Normal(torch.stack([loc, loc], at), torch.stack([scale, self.widen * scale], at))
        return dist.MixtureSameFamily(self._mixing(loc, loc.shape[:at]), components.to_event(event_dims))

    def multivariate_normal(self, loc, scale_tril):
        loc = loc.expand(scale_tril.shape[:-1])
        scale_tril = torch.stack([scale_tril, self.widen * scale_tril], -3)
        components = dist.MultivariateNormal(torch.stack([loc, loc], -2), scale_tril=scale_tril)
        return dist.MixtureSameFamily(self._mixing(loc, loc.shape[:-1]), components)

    def __str__(self) -> str:
        return f"defensive mixture({1 - self.weight:g} guide + {self.weight:g} guide, scale x{self.widen:g})"


def as_proposal(proposal: str | Proposal) -> Proposal:
    """A proposal from its name (``"guide"``, ``"student_t"``, ``"mixture"``: default settings) or itself.

    ``"auto"`` is returned as it is (:func:`choose_proposal` settles it given the guide).

    :raises FreqviInputError: for anything else.
    """
    if isinstance(proposal, Proposal) or proposal == "auto":
        return proposal
    named = {"guide": GuideProposal, "student_t": StudentTProposal, "mixture": DefensiveMixtureProposal,
             "adaptive": AdaptiveStudentTProposal}
    if isinstance(proposal, str) and proposal in named:
        return named[proposal]()
    raise FreqviInputError(
        f"proposal must be one of {list(PROPOSALS)} or a freqvi.infer.proposals.Proposal (e.g. "
        f"StudentTProposal(df=3)); got {proposal!r}."
    )


def _check_positive(value, name: str, what: str) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise FreqviInputError(f"{name} ({what}) must be a positive finite number; got {value!r}.")


#: What ``"auto"`` chooses for a guide whose every draw can be widened, per observation over all
#: rows at once: see :func:`choose_proposal` for what was measured.
DEFAULT = AdaptiveStudentTProposal()


def choose_proposal(proposal: str | Proposal, guide_trace, joint: bool = False, all_rows: bool = True
                    ) -> Proposal:
    """The proposal to draw from, given a run of the guide.

    ``"auto"`` is ``DEFAULT`` (:class:`AdaptiveStudentTProposal`: a Student-t with 3 degrees
    of freedom, moved to each observation's posterior moments) where every latent site the
    guide draws is a Normal factor it can widen, the weights are per observation and the
    data plate visits all its rows in one run (``all_rows``); the plain Student-t with the
    guide's location and scale where the plate is subsampled (``subsample_size``: its rows
    are visited in blocks); and the guide itself otherwise: for a discrete or non-Normal
    draw, and for one joint weight over all rows (``joint``, a latent outside the data plate),
    where widening every one of many dimensions puts too little mass near the posterior
    (measured: 80 rows under ``AutoDiagonalNormal``, k-hat 2.45 with the Student-t against
    0.64 with the guide, and an estimate 0.59 nats off against 0.04). On the digits VAE
    (latent 8) the share of test images with PSIS k-hat > 0.7 at K = 5000 was 19% under the
    guide, 2.7-7.4% under df = 3 (across trainings), more under df = 5 or 10 and 13-18% under
    the defensive mixtures, whose wide component loses density near the mode in 8 dimensions;
    the remaining heavy tails come from the encoder's location and scale being off from each
    image's posterior (the amortisation gap), which the adaptation corrects: 1.0-1.7% under
    the adaptive Student-t on the tour's VAE at K = 5000, and at K = 1000 1-2% on three
    trainings against 12-18% under the plain Student-t (``benchmarks/adaptive_proposal.py``).
    Any other choice is :func:`as_proposal`'s, checked against the guide.

    :raises FreqviInputError: for an unknown proposal, or one that cannot replace a site
        of the guide (naming it); for :class:`AdaptiveStudentTProposal` with ``joint``
        weights or a subsampled data plate (it adapts each observation's proposal from
        one run over all rows).
    """
    if proposal == "auto":
        if joint:
            return GuideProposal()
        try:
            DEFAULT.check(guide_trace)
        except FreqviInputError:
            return GuideProposal()
        return DEFAULT if all_rows else StudentTProposal(DEFAULT.df)
    proposal = as_proposal(proposal)
    proposal.check(guide_trace)
    if isinstance(proposal, AdaptiveStudentTProposal) and (joint or not all_rows):
        why = ("a latent outside the data plate couples the rows into one joint weight" if joint else
               "the data plate is subsampled (subsample_size), so its rows are visited in blocks")
        raise FreqviInputError(
            f"the {proposal} proposal adapts each observation's Student-t from pilot draws over all rows in "
            f"one run, but {why}: use proposal='student_t' or 'guide'.")
    return proposal


def drawn_sites(guide_trace) -> dict[str, dict]:
    """The latent sites of a guide run that a proposal replaces: all but the point masses."""
    return {name: site for name, site in latent_sites(guide_trace).items() if not is_point_mass(site["fn"])}


class _Widening(Messenger):
    """Replaces the distribution of each latent sample site by the proposal's (see the module)."""

    def __init__(self, proposal: Proposal):
        super().__init__()
        self.proposal = proposal

    def _pyro_sample(self, msg) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or isinstance(fn, _Subsample) or is_point_mass(fn):
            return
        msg["fn"] = _replaced(fn, self.proposal.at(msg["name"]), msg["name"])


def _replaced(fn, proposal: Proposal, name: str) -> dist.Distribution:
    """``fn`` with its Normal (or MultivariateNormal) core replaced, its wrappers rebuilt around it."""
    if isinstance(fn, dist.MaskedDistribution):
        return _replaced(fn.base_dist, proposal, name).mask(fn._mask)
    if isinstance(fn, dist.ExpandedDistribution):
        return _replaced(fn.base_dist, proposal, name).expand(fn.batch_shape)
    if isinstance(fn, dist.TransformedDistribution):
        return dist.TransformedDistribution(_replaced(fn.base_dist, proposal, name), fn.transforms)
    event_dims = 0
    while isinstance(fn, dist.Independent):  # the event dims go to the proposal: one mixture per draw
        event_dims, fn = event_dims + fn.reinterpreted_batch_ndims, fn.base_dist
    if isinstance(fn, torch.distributions.Normal):
        return proposal.normal(fn.loc, fn.scale, event_dims)
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return proposal.multivariate_normal(fn.loc, fn.scale_tril).to_event(event_dims)
    if event_dims:
        return _replaced(fn, proposal, name).to_event(event_dims)
    kind = "discrete" if fn.support.is_discrete else "continuous but not Normal"
    raise FreqviInputError(
        f"the proposal {proposal} cannot widen the guide's site {name!r}: it draws from "
        f"{type(fn).__name__}, which is {kind}. The Student-t and mixture proposals replace a Normal or "
        "MultivariateNormal factor (possibly transformed to the site's support, as freqvi's guides and "
        "Pyro's AutoNormal, AutoDiagonalNormal and AutoMultivariateNormal draw); use proposal='guide' for "
        "this guide, or sum a discrete site out (infer={'enumerate': 'parallel'} in the model)."
    )
