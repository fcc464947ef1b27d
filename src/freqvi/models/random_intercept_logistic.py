"""Random-intercept logistic regression: a GLMM whose E-step is intractable (paper section 3)."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from pyro.distributions import constraints
from pyro.nn import pyro_method

from freqvi.errors import FreqviInputError
from freqvi.guides import LocalMeanField
from freqvi.models.base import LatentVariableModel
from freqvi.models.quadrature import adaptive_gauss_hermite
from freqvi.validation import as_real, check_finite, check_init, check_positive_int


class RandomInterceptLogistic(LatentVariableModel):
    r"""Logistic regression with a Gaussian random intercept per group (a GLMM), fitted by ML.

    .. math::

        u_i \sim \mathcal N(0, \sigma^2), \qquad
        y_{ij} \mid u_i \sim \mathrm{Bernoulli}\big(\operatorname{sigmoid}(x_{ij}^\top \beta + u_i)\big),
        \qquad
        \ell(\beta, \sigma) = \sum_{i=1}^m \log \int \prod_{j=1}^{n_i}
        p(y_{ij} \mid u)\, \mathcal N(u; 0, \sigma^2)\, du,

    for groups :math:`i = 1..m` with :math:`n_i` observations each. The posterior
    of :math:`u_i` has no closed form, so EM's E-step is intractable
    (``exact_guide = False``); the log-likelihood is a sum of one-dimensional
    integrals, which :meth:`log_marginal` computes by adaptive Gauss-Hermite
    quadrature: the ground truth against which variational fits are judged.

    Data are padded to the largest group, one row per group (:meth:`pad` builds
    them from the flat form):

    * ``X``: covariates, shape ``(m, n_max, p)``; include a column of ones for a
      fixed intercept;
    * ``y``: labels in ``{0, 1}``, shape ``(m, n_max)``;
    * ``mask``: ``1`` where ``(i, j)`` is an observation, ``0`` for padding,
      shape ``(m, n_max)``, bool or numbers (freqvi's drivers take numeric arrays
      only, so :meth:`pad` returns numbers in ``X``'s dtype).

    Padded entries are ignored but must still be finite, with labels 0 or 1.

    Sites: ``"intercept"`` (:math:`u_i`) and ``"obs"`` (event shape
    ``(n_max,)``, masked) inside the plate ``"data"`` over groups, so a
    minibatch is a subsample of groups. Guides: :attr:`guide` (default), free
    per-group Gaussians :math:`q(u_i) = \mathcal N(\mu_i, s_i^2)` owned by this
    model, so that ``freqvi.em(model, data)`` runs variational EM and
    ``freqvi.fit(model, None, data)`` joint SVI; :meth:`mean_field_guide`, a
    fresh guide of the same family.

    :param dim: number of covariates ``p``.
    :param init: optional ``{"beta": (p,), "sigma": ()}``; default: ``beta`` from
        the logistic regression that pools the groups, ``sigma = 1``.
    :param quadrature_nodes: Gauss-Hermite nodes per group in :meth:`log_marginal`,
        which holds ``quadrature_nodes * m * n_max`` log-densities at once. The
        hard case for adaptive quadrature is a small group whose labels all
        disagree with its covariates: its posterior is one-sided, the prior's tail
        cut by a logistic step. Measured worst relative errors of :math:`p(y_i)` for
        such groups (one to three observations, offsets ``x'beta`` within 6 of 0),
        with 100 nodes: 5e-12 for ``sigma <= 2``, 3e-7 at ``sigma = 3``, 4e-5 at
        ``sigma = 5`` (with 50 nodes: 2e-7, 1e-4, 3e-3); for groups with mixed
        labels, below 1e-11 up to ``sigma = 5``.

    Fitted parameters: ``beta`` ``(p,)``, ``sigma`` (a scalar).
    """

    _estimate_names = ("beta", "sigma")
    exact_guide = False

    def __init__(self, dim: int, *, init: dict | None = None, quadrature_nodes: int = 100,
                 name: str | None = None):
        self.dim = check_positive_int(dim, "dim")
        self.quadrature_nodes = check_positive_int(quadrature_nodes, "quadrature_nodes")
        super().__init__(init=init, name=name)
        # A tuple: the guide's per-group parameters are not the model's (theta's) parameters.
        self._guide = (self.mean_field_guide(),)

    # ----- data -------------------------------------------------------------------------------
    @staticmethod
    def pad(X: ArrayLike, y: ArrayLike, groups: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Turns flat data into the padded ``(X, y, mask)`` this model takes.

        :param X: covariates, shape ``(N, p)``.
        :param y: labels, shape ``(N,)``.
        :param groups: a group label per observation, shape ``(N,)``, of any sortable type.
        :returns: ``X`` ``(m, n_max, p)``, ``y`` ``(m, n_max)`` and ``mask``
            ``(m, n_max)`` in ``X``'s dtype, zero-padded. Row ``i`` is the ``i``-th label of
            ``np.unique(groups)``; within a group, observations keep their order.
        """
        X, y = as_real(X, "X"), as_real(y, "y")
        groups = np.asarray(groups)
        if X.dim() != 2 or X.shape[0] == 0:
            raise FreqviInputError(f"X must have shape (n_observations, p); got {tuple(X.shape)}.")
        n = X.shape[0]
        if y.shape != (n,) or groups.shape != (n,):
            raise FreqviInputError(f"y and groups must have shape ({n},), one entry per row of X; "
                                   f"got {tuple(y.shape)} and {groups.shape}.")
        index = torch.as_tensor(np.unique(groups, return_inverse=True)[1].reshape(-1))
        counts = torch.bincount(index)
        order = torch.argsort(index, stable=True)
        position = torch.empty_like(index)
        position[order] = torch.arange(n) - (counts.cumsum(0) - counts)[index[order]]
        shape = (len(counts), int(counts.max()))
        padded = X.new_zeros(*shape, X.shape[1]), X.new_zeros(shape), X.new_zeros(shape)
        for out, values in zip(padded, (X, y.to(X.dtype), X.new_ones(n)), strict=True):
            out[index, position] = values
        return padded

    @classmethod
    def simulate(cls, num_groups: int = 200, group_size: int = 10, beta: ArrayLike = (-0.5, 1.0),
                 sigma: float = 1.0, *, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded data ``(X, y, mask)`` drawn from the model with known ``beta`` and ``sigma``.

        ``X`` holds an intercept column and ``len(beta) - 1`` standard normal covariates;
        every group has ``group_size`` observations. A generator seeded with ``seed``
        makes the draw reproducible without touching the global random state.
        """
        m, n = check_positive_int(num_groups, "num_groups"), check_positive_int(group_size, "group_size")
        beta = torch.as_tensor(beta, dtype=torch.float64)
        if beta.dim() != 1 or len(beta) < 1:
            raise FreqviInputError(f"beta must be a vector, intercept first; got shape {tuple(beta.shape)}.")
        g = torch.Generator().manual_seed(seed)
        covariates = torch.randn(m, n, len(beta) - 1, generator=g, dtype=torch.float64)
        X = torch.cat([torch.ones(m, n, 1, dtype=torch.float64), covariates], -1)
        u = float(sigma) * torch.randn(m, 1, generator=g, dtype=torch.float64)
        y = torch.bernoulli(torch.sigmoid(X @ beta + u), generator=g)
        return X.to(dtype), y.to(dtype), torch.ones(m, n, dtype=dtype)

    def _as_tensors(self, X, y, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks the shapes (values are checked where they are read); ``y`` gets ``X``'s dtype."""
        X = as_real(X, "X")
        y = as_real(y, "y").to(X.dtype)
        mask = torch.as_tensor(mask)
        if X.dim() != 3 or X.shape[-1] != self.dim or X.shape[0] == 0 or X.shape[1] == 0:
            raise FreqviInputError(f"X must have shape (groups, max_group_size, {self.dim}) with at "
                                   f"least one group; got {tuple(X.shape)}.")
        for name, t in (("y", y), ("mask", mask)):
            if t.shape != X.shape[:2]:
                raise FreqviInputError(f"{name} must have shape {tuple(X.shape[:2])} (groups, "
                                       f"max_group_size), matching X; got {tuple(t.shape)}.")
        return X, y, mask

    # ----- parameters -------------------------------------------------------------------------
    def _check_init(self, init: dict) -> dict:
        expected = {"beta": (self.dim,), "sigma": ()}
        init = check_init(init, expected)
        if init["sigma"] <= 0:
            raise FreqviInputError(f"init['sigma'] must be positive; got {float(init['sigma'])}.")
        return init

    def _set_values(self, values: dict[str, torch.Tensor]) -> None:
        self._set("beta", values["beta"], constraints.real)
        self._set("sigma", values["sigma"], constraints.positive)

    def _pooled_start(self, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      num_steps: int = 10) -> dict[str, torch.Tensor]:
        r"""``beta``: Newton steps for the logistic regression pooling the groups; ``sigma = 1``.

        A unit ridge, :math:`\beta \leftarrow \beta + (X^\top W X + I)^{-1} X^\top (y - p)`,
        keeps the start finite when the classes are separable.
        """
        x, t = X[mask], y[mask]
        beta = x.new_zeros(self.dim)
        eye = torch.eye(self.dim, dtype=x.dtype)
        for _ in range(num_steps):
            prob = torch.sigmoid(x @ beta)
            hessian = x.T @ (x * (prob * (1 - prob)).unsqueeze(-1)) + eye
            beta = beta + torch.linalg.solve(hessian, x.T @ (t - prob))
        return {"beta": beta, "sigma": x.new_ones(())}

    def _prepare(self, X, y, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks shapes; on the first call checks all values too and creates the parameters."""
        X, y, mask = self._as_tensors(X, y, mask)
        # The pooled start reads y and mask, which the base class's _initial_values(x) does not get.
        if not self.initialized and self._init is None:
            self._set_values(self._pooled_start(X, y, _checked_mask(X, y, mask)))
        self._ensure_initialized(X)
        return X, y, mask

    # ----- densities --------------------------------------------------------------------------
    @pyro_method
    def log_marginal(self, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r"""Per-group log-likelihood :math:`\log p(y_i)`, shape ``(m,)``, by adaptive Gauss-Hermite.

        The integrand :math:`f_i(u) = \sum_j \log p(y_{ij} \mid u) + \log \mathcal
        N(u; 0, \sigma^2)` is strictly concave, with mode in :math:`|u| < \sigma^2
        n_i` (where :math:`f_i' = 0`); see
        :func:`~freqvi.models.quadrature.adaptive_gauss_hermite`. Differentiable
        in ``beta`` and ``sigma`` to any order by autograd.
        """
        X, y, mask = self._prepare(X, y, mask)
        weights = _checked_mask(X, y, mask).to(X.dtype)
        offsets, sigma = X @ self.beta, self.sigma  # (m, n_max), ()
        bound = sigma.detach().square() * weights.sum(-1)

        def log_f(u: torch.Tensor) -> torch.Tensor:
            return _log_joint(u, offsets, y, weights, sigma)

        def derivatives(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _log_joint_derivatives(u, offsets, y, weights, sigma)

        return adaptive_gauss_hermite(log_f, derivatives, -bound, bound, self.quadrature_nodes)

    # ----- model and guides -------------------------------------------------------------------
    @pyro_method
    def model(self, X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        """``u_i ~ N(0, sigma^2)``, ``y_ij ~ Bernoulli(sigmoid(x_ij' beta + u_i))`` where ``mask_ij``."""
        X, y, mask = self._prepare(X, y, mask)
        with pyro.plate(self.data_plate, X.shape[0]) as i:
            observed = _checked_mask(X[i], y[i], mask[i])  # only the visited groups: minibatches stay cheap
            u = pyro.sample("intercept", dist.Normal(X.new_zeros(()), self.sigma))
            logits = X[i] @ self.beta + u.unsqueeze(-1)  # (..., batch, n_max)
            pyro.sample("obs", dist.Bernoulli(logits=logits).mask(observed).to_event(1), obs=y[i])

    @property
    def guide(self) -> LocalMeanField:
        """The default guide: per-group Gaussians ``N(mu_i, s_i^2)``, created with the model.

        One guide per model, so its fitted local parameters persist from one driver
        call to the next (``freqvi.em`` continues from where ``freqvi.fit`` left them).
        """
        return self._guide[0]

    def mean_field_guide(self) -> LocalMeanField:
        """A new guide with free per-group Gaussian factors (variational E-step)."""
        return LocalMeanField(self.model)


def _check_binary(t: torch.Tensor, name: str) -> None:
    bad = (t != 0) & (t != 1)
    if bad.any():
        first = tuple(int(k) for k in bad.nonzero()[0])
        raise FreqviInputError(f"{name} must hold only 0 and 1 (padding included); {int(bad.sum())} "
                               f"value(s) do not, the first {t[first].item()} at index {first}.")


def _checked_mask(X: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Checks for finite covariates, binary labels and mask, an observation in every group.

    Returns the mask as bool.
    """
    check_finite(X, "X")
    _check_binary(y, "y")
    _check_binary(mask, "mask")
    mask = mask.bool()
    empty = (~mask.any(-1)).nonzero().reshape(-1)
    if len(empty):
        raise FreqviInputError(f"every group needs at least one observation; the mask rows of "
                               f"{len(empty)} group(s) are all 0 (first: group {int(empty[0])}).")
    return mask


def _log_joint(u: torch.Tensor, offsets: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
    r"""The log-integrand of group ``i``, elementwise in ``u``.

    .. math::

        f_i(u) = \sum_j w_{ij} \log p(y_{ij} \mid x_{ij}^\top\beta + u) + \log \mathcal N(u; 0, \sigma^2).

    ``u`` has shape ``(..., m)``; ``offsets`` (:math:`x_{ij}^\top \beta`), ``y`` and
    the 0/1 ``weights`` have shape ``(m, n_max)``. Returns shape ``(..., m)``.
    """
    logits = offsets + u.unsqueeze(-1)
    log_lik = -F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    log_prior = -0.5 * (u / sigma).square() - sigma.log() - 0.5 * math.log(2 * math.pi)
    return (log_lik * weights).sum(-1) + log_prior


def _log_joint_derivatives(u: torch.Tensor, offsets: torch.Tensor, y: torch.Tensor,
                           weights: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`f_i'(u) = \sum_j w_{ij} (y_{ij} - p_{ij}) - u / \sigma^2` and
    :math:`f_i''(u) = -\sum_j w_{ij} p_{ij} (1 - p_{ij}) - 1 / \sigma^2`, shape ``(m,)``."""
    prob = torch.sigmoid(offsets + u.unsqueeze(-1))
    precision = sigma.square().reciprocal()
    slope = ((y - prob) * weights).sum(-1) - u * precision
    curvature = -(prob * (1 - prob) * weights).sum(-1) - precision
    return slope, curvature
