"""The EM objective: the Q-function as a Pyro ELBO."""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.util import torch_item

from freqvi.handlers import FrozenPosterior
from freqvi.traces import latent_sites


class QFunctionELBO(ELBO):
    r"""The negative EM Q-function, with the guide frozen as the E-step posterior.

    .. math::

        Q(\theta \mid \theta') = \sum_i \mathbb{E}_{q(z_i \mid x_i; \theta')}
            \bigl[\log p(x_i, z_i; \theta)\bigr],

    where ``q`` is whatever the guide returns at the parameters current when
    the loss is called (theta'); its distributions are recorded under
    :func:`torch.no_grad` and replayed, so gradients flow to the model only.
    The loss is :math:`-Q`, computed as the negative ELBO of the frozen guide
    plus its entropy :math:`H(q) = -\mathbb{E}_q \log q`, which is constant in
    theta: ``-Q = -ELBO(q, theta) + H(q)``. Expectations over guide sites marked
    ``infer={"enumerate": "parallel"}`` are exact; others are Monte-Carlo
    averages over ``num_particles`` draws, vectorised (unbiased).

    Its gradient at theta = theta' is the score, by Fisher's identity
    (Dempster, Laird and Rubin 1977; Louis 1982): with the exact posterior as
    guide, :math:`\nabla_\theta Q(\theta \mid \theta')|_{\theta=\theta'} =
    \nabla_\theta \ell(\theta')`. In :func:`freqvi.em` the guide is frozen for a
    whole M-step, which makes the M-step maximise Q; in a plain
    :class:`~pyro.infer.SVI` loop each step re-freezes the guide, which makes
    SVI gradient ascent on the log-likelihood itself (generalised EM).

    :param int num_particles: Monte-Carlo draws for non-enumerated sites.
    :param max_plate_nesting: as in :class:`~pyro.infer.ELBO`; guessed if infinite.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: float = float("inf")):
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=True)  # as its TraceEnum_ELBO: drivers check the pair for it
        self._elbo = TraceEnum_ELBO(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            strict_enumeration_warning=False,
        )

    def _get_trace(self, model, guide, args, kwargs):
        return self._elbo._get_trace(model, guide, args, kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Returns :math:`-Q(\\theta \\mid \\theta')` as a differentiable scalar."""
        with torch.no_grad(), poutine.block():
            posterior = poutine.trace(guide).get_trace(*args, **kwargs)
        frozen = FrozenPosterior(posterior)(guide)
        negative_elbo = self._elbo.differentiable_loss(model, frozen, *args, **kwargs)
        return negative_elbo + entropy(posterior)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Returns :math:`-Q(\\theta \\mid \\theta')` as a float."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Returns :math:`-Q` and accumulates its gradient in the model's parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


def entropy(guide_trace) -> torch.Tensor:
    r"""Entropy :math:`-\mathbb{E}_q \log q` of a guide trace, scaled as Pyro scales sites.

    Uses each distribution's closed form where it has one, else the one-draw
    estimate :math:`-\log q(z)` at the recorded value.
    """
    total = torch.zeros(())
    for site in latent_sites(guide_trace).values():
        fn = site["fn"]
        try:
            h = fn.entropy()
        except NotImplementedError:
            h = -fn.log_prob(site["value"])
        if site["mask"] is not None:
            h = h * site["mask"]
        total = total + (site["scale"] * h).sum()
    return total
