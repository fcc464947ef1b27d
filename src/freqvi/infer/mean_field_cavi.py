r"""Exact coordinate ascent (CAVI) on a mean-field guide whose every factor is categorical.

When the guide is :math:`q(z) = \prod_j \pi_j(z_j)` over discrete sites that the model
does not sum out itself (a :class:`~freqvi.guides.LocalMeanField` on a model whose latents
are all discrete), the ELBO is a polynomial in the factors' probabilities,

.. math::

    F(\pi) = \sum_s \sum_{z_{D(s)}} \Big(\prod_{j \in D(s)} \pi_j(z_j)\Big) \log p_s(z_{D(s)})
             - \sum_j \sum_{z_j} \pi_j(z_j) \log \pi_j(z_j),

with :math:`\log p_s` the log-density of the model's site :math:`s` (latent or observed,
scaled by its plates) and :math:`D(s)` the latent sites it depends on. The tables
:math:`\log p_s` do not depend on :math:`\pi`: one run of the model, each latent
enumerated in a dimension of its own (as :class:`~pyro.infer.TraceEnum_ELBO` runs it),
gives them all, and the E-step then works on them without running the model again.
:math:`F` is linear in each :math:`\pi_j`, so :math:`\partial F / \partial \pi_j(k) =
\mathbb E_{q_{-j}}[\log p \mid z_j = k] - \log \pi_j(k) - 1` and the optimum in
:math:`\pi_j` given the others is :math:`\log \pi_j^*(k) = \mathbb E_{q_{-j}}[\log p \mid
z_j = k] + c` (Bishop 2006, section 10.1.1). Factors that share no table
(:math:`j, k \notin D(s)` together for every :math:`s`: alternate time steps of a
chain) are updated together from one gradient; one colour after another this is block
coordinate ascent, so :math:`F` never decreases.
"""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.poutine.subsample_messenger import _Subsample

from freqvi.traces import is_enumerated, latent_sites


def cavi_applies(model_trace, guide_trace, logits: list[torch.Tensor], local: list[torch.Tensor]) -> bool:
    """Whether :class:`MeanFieldTables` can run the E-step: every local parameter of the guide is a
    categorical factor's logits (``logits``, in the guide's site order), every latent site of the guide
    is enumerated, and every latent site of the model has a factor in the guide (the model sums none out)."""
    guide_latent = latent_sites(guide_trace)
    model_latent = latent_sites(model_trace)
    return (bool(logits) and len(logits) == len(local) == len(guide_latent)
            and {id(p) for p in logits} == {id(p) for p in local}
            and all(is_enumerated(site) for site in guide_latent.values())
            and set(model_latent) <= set(guide_latent))


class MeanFieldTables:
    """The log-density tables of one run of the model at the current theta, and CAVI on them.

    :param model: the model callable.
    :param guide: the mean-field guide, whose categorical factors' logits are ``logits`` in the order
        of its latent sites.
    :param data: the data tuple.
    :param plate_nesting: the plates model and guide nest (enumeration dims start left of them).
    :param logits: the guide's logits parameters, each of shape ``batch_shape + (K,)``.
    :param differentiable: whether the tables keep their graph to theta (for the gradient of the
        profile objective); else they are computed without it.
    """

    def __init__(self, model, guide, data: tuple, plate_nesting: int, logits: list[torch.Tensor],
                 differentiable: bool = False):
        self.logits = logits
        with torch.set_grad_enabled(differentiable), poutine.block():
            enum = poutine.enum(first_available_dim=-1 - plate_nesting)
            guide_trace = poutine.trace(enum(guide)).get_trace(*data)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*data)
            model_trace.compute_log_prob(lambda name, site: not isinstance(site["fn"], _Subsample))
        sites = latent_sites(guide_trace)
        # the dimension each factor is enumerated in, and the shape its probabilities take there
        self.dims = [site["infer"]["_enumerate_dim"] for site in sites.values()]
        self.shapes = [site["fn"].batch_shape for site in sites.values()]
        self.scales = [site["scale"] for site in sites.values()]  # a plate's n / rows, as the log-densities'
        self.layouts = [torch.Size([p.shape[-1], *[1] * (-d - 1 - len(b)), *b])
                        for p, d, b in zip(logits, self.dims, self.shapes, strict=True)]
        self.tables = []  # (log-density table, the factors it depends on)
        for site in model_trace.nodes.values():
            if site["type"] != "sample" or isinstance(site["fn"], _Subsample):
                continue
            table = site["log_prob"]
            depends = [j for j, d in enumerate(self.dims) if -d <= table.dim() and table.shape[d] > 1]
            self.tables.append((table, depends))
        self.colours = _colour(len(logits), [d for _, d in self.tables])

    def probabilities(self) -> list[torch.Tensor]:
        """Each factor's probabilities, shape ``batch_shape + (K,)``, detached from the logits."""
        return [p.detach().softmax(-1) for p in self.logits]

    def _laid(self, probs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``probs`` moved to the enumeration layout: ``K`` at each factor's dimension, then its batch."""
        return [p.movedim(-1, 0).reshape(layout) for p, layout in zip(probs, self.layouts, strict=True)]

    def objective(self, probs: list[torch.Tensor]) -> torch.Tensor:
        """:math:`F(\\pi)` (module docstring) at ``probs`` (each ``batch_shape + (K,)``); differentiable in
        theta when the tables are."""
        laid = self._laid(probs)
        total = 0.0
        for table, depends in self.tables:
            for j in depends:
                table = table * laid[j]
            total = total + table.sum()
        entropy = sum(-scale * (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum()
                      for p, scale in zip(probs, self.scales, strict=True))
        return total + entropy

    def expected_log_joint(self, j: int, laid: list[torch.Tensor]) -> torch.Tensor:
        """:math:`\\mathbb E_{q_{-j}}[\\log p \\mid z_j]` in factor ``j``'s enumeration layout (up to a
        constant per observation): each table that depends on ``z_j``, weighted by the other factors it
        depends on and summed down to ``z_j`` and its batch."""
        message = laid[j].new_zeros(self.layouts[j])
        for table, depends in self.tables:
            if j in depends:
                term = table.detach()
                for k in depends:
                    if k != j:
                        term = term * laid[k]
                message = message + term.sum_to_size(self.layouts[j])
        return message

    def ascend(self, max_sweeps: int, tol: float) -> int:
        """Block CAVI sweeps on the logits (in place, warm-started from their values) until no logit
        moves by more than ``tol`` (up to a constant per row) or ``max_sweeps``; returns the sweeps run.

        The update of factor ``j`` is :math:`\\log \\pi_j \\propto \\mathbb E_{q_{-j}}[\\log p \\mid z_j]`
        divided by its plate's scale (the weight of its entropy in :math:`F`)."""
        with torch.no_grad():
            logits = [p.detach() - p.detach().logsumexp(-1, keepdim=True) for p in self.logits]
            laid = self._laid([x.exp() for x in logits])
            sweeps = 0
            while sweeps < max_sweeps:
                sweeps += 1
                largest = 0.0
                for colour in self.colours:
                    updates = [self.expected_log_joint(j, laid) for j in colour]
                    for j, message in zip(colour, updates, strict=True):
                        new = (message / self.scales[j]).reshape(self.layouts[j][0], -1).T
                        new = new.reshape(logits[j].shape)  # back to batch_shape + (K,)
                        new = new - new.logsumexp(-1, keepdim=True)
                        largest = max(largest, float((new - logits[j]).abs().max()))
                        logits[j] = new
                        laid[j] = new.exp().movedim(-1, 0).reshape(self.layouts[j])
                if largest <= tol:
                    break
            for param, value in zip(self.logits, logits, strict=True):
                param.copy_(value)
        return sweeps


def _colour(count: int, groups: list[list[int]]) -> list[list[int]]:
    """Greedy colouring of the factors ``0..count-1``: two factors that appear in one group (one table)
    never share a colour."""
    neighbours = [set() for _ in range(count)]
    for group in groups:
        for j in group:
            neighbours[j].update(k for k in group if k != j)
    colour_of: list[int] = []
    for j in range(count):
        taken = {colour_of[k] for k in neighbours[j] if k < j}
        colour_of.append(next(c for c in range(count) if c not in taken))
    return [[j for j in range(count) if colour_of[j] == c] for c in range(max(colour_of, default=-1) + 1)]
