"""What :func:`~freqvi.log_likelihood` returns: an exact, importance-sampled or annealed log-likelihood."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from freqvi.errors import FreqviInputError

#: PSIS :math:`\hat k` above which an importance-sampling estimate cannot be trusted (Vehtari et al. 2024).
PARETO_K_THRESHOLD = 0.7

NO_PER_OBSERVATION = (
    "this model has latent sites outside the data plate (a global latent, or an autoguide's joint "
    "draw), which couple the observations: log p(x_i) of single observations do not exist, only the "
    "total log p(x_1, ..., x_n)."
)


@dataclass
class LogLikelihood:
    """What :func:`~freqvi.log_likelihood` returns.

    :ivar total: :math:`\\ell = \\sum_i \\log p(x_i)` (:math:`\\log p(x_1, \\ldots, x_n)` when ``joint``).
    :ivar per_observation: :math:`\\log p(x_i)`, shape ``(n,)``; ``None`` when ``joint``.
    :ivar standard_error: Monte-Carlo standard error of ``total`` (0 when exact).
    :ivar pareto_k: PSIS :math:`\\hat k` per observation, shape ``(n,)`` (``(1,)``, of the joint
        weight, when ``joint``); ``None`` when exact or annealed. ``-inf`` where the weights are
        constant (an exact proposal), NaN where :math:`\\hat k` cannot be estimated
        (see ``pareto_k_note``), which is not evidence of heavy tails.
    :ivar method: ``"exact"``, ``"importance"`` or ``"ais"`` (then the result is an
        :class:`~freqvi.infer.annealed.AnnealedLogLikelihood`).
    :ivar num_samples: ``K``, the weights per observation: importance samples, or AIS
        chains (0 when exact).
    :ivar joint: whether a latent site outside the data plate (a global latent, an
        autoguide's joint draw) couples the observations, so that only the total exists.
    :ivar pareto_k_note: why :math:`\\hat k` could not be estimated, where it could not.
    :ivar proposal: the importance proposal used, by name (``"guide"``,
        ``"student-t(df=3)"``, ``"adaptive student-t(df=3, 2 rounds of 0.5K pilot draws)"``,
        ...; see :mod:`freqvi.infer.proposals`); AIS's starting
        distribution, ``"guide"``; ``None`` when exact.
    :ivar per_observation_se: the Monte-Carlo standard error of each
        :math:`\\log \\hat p(x_i)`, :math:`\\mathrm{sd}(w_i) / (\\sqrt K\\, \\bar w_i)`, shape
        ``(n,)``; ``None`` when exact or ``joint``.
    :ivar effective_sample_size: Kish's :math:`(\\sum_k w_{ik})^2 / \\sum_k w_{ik}^2` of each
        column of weights, between 1 and ``K``, shape ``(n,)`` (``(1,)`` when ``joint``);
        ``None`` when exact.
    :ivar cpu_seconds_per_observation: the process time the estimate took (an adaptive
        proposal's pilot draws included), divided by ``n``
        (``None`` when exact).
    """

    total: float
    per_observation: torch.Tensor | None
    standard_error: float
    pareto_k: np.ndarray | None
    method: str
    num_samples: int = 0
    joint: bool = False
    pareto_k_note: str | None = None
    proposal: str | None = None
    per_observation_se: torch.Tensor | None = None
    effective_sample_size: torch.Tensor | None = None
    cpu_seconds_per_observation: float | None = None

    def __repr__(self) -> str:
        """One line: the total, its standard error and method, and what k-hat says."""
        text = f"log-likelihood {self.total:.4f} nats ({self.method}"
        if self.method == "importance":
            text += (f", proposal {self.proposal}, s.e. {self.standard_error:.4f}, K = {self.num_samples}, "
                     f"max PSIS k-hat {self.max_pareto_k:.2f}")
            text += f", {self.num_heavy_tailed} above 0.7" if self.num_heavy_tailed else ""
            text += f", {self.num_unestimable} not estimable" if self.num_unestimable else ""
        text += ")"
        return text + ("; the total only: " + NO_PER_OBSERVATION if self.joint else "")

    @property
    def max_pareto_k(self) -> float:
        """The largest :math:`\\hat k` that could be estimated (NaN if none could, or exact)."""
        if self.pareto_k is None or np.isnan(self.pareto_k).all():
            return math.nan
        return float(np.nanmax(self.pareto_k))

    @property
    def num_heavy_tailed(self) -> int:
        """How many entries of ``pareto_k`` exceed 0.7 (0 when exact)."""
        return 0 if self.pareto_k is None else int((self.pareto_k > PARETO_K_THRESHOLD).sum())

    @property
    def num_unestimable(self) -> int:
        """How many entries of ``pareto_k`` could not be estimated (0 when exact)."""
        return 0 if self.pareto_k is None else int(np.isnan(self.pareto_k).sum())

    def to_inference_data(self, name: str = "obs"):
        """``per_observation`` as ArviZ's ``log_likelihood`` group (one chain, one draw).

        ``name`` is the observed variable's name in that group.

        :raises ~freqvi.errors.FreqviInputError: when ``joint`` (no per-observation values exist).
        """
        import arviz as az  # deferred: importing ArviZ is slow

        if self.per_observation is None:
            raise FreqviInputError(NO_PER_OBSERVATION)
        return az.from_dict(log_likelihood={name: self.per_observation.detach().numpy()[None, None]})
