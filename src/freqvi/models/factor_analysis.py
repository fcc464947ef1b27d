"""Factor analysis and probabilistic PCA: a latent model with a Gaussian posterior."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import pyro_method

from freqvi.errors import FreqviInputError
from freqvi.guides import LocalMeanField
from freqvi.models.base import LatentVariableModel
from freqvi.validation import check_choice, check_init, check_matrix, check_positive_int

NOISE_TYPES = ("diagonal", "isotropic")


class FactorAnalysis(LatentVariableModel):
    r"""Linear-Gaussian factor model; ``noise="isotropic"`` is probabilistic PCA.

    .. math::

        z_i \sim \mathcal N(0, I_q), \qquad
        x_i \mid z_i \sim \mathcal N(\mu + W z_i, \Psi), \qquad
        x_i \sim \mathcal N(\mu, W W^\top + \Psi),

    with :math:`\Psi = \operatorname{diag}(\psi)` or :math:`\sigma^2 I`. The
    posterior is Gaussian, :math:`z_i \mid x_i \sim \mathcal N(M^{-1} W^\top
    \Psi^{-1} (x_i - \mu), M^{-1})` with :math:`M = I + W^\top \Psi^{-1} W`.

    Sites: ``"factors"`` (latent, event shape ``(q,)``) and ``"obs"`` inside the
    plate ``"data"``. Guides: :meth:`guide` (the exact posterior above) and
    :meth:`mean_field_guide` (free per-observation diagonal Gaussians). The
    M-step has a closed form in :meth:`expected_statistics` / :meth:`maximize`.
    ``W`` is identified only up to rotation, ``W R`` for orthogonal ``R``.

    :param dim: observed dimension ``d``.
    :param latent_dim: number of factors ``q``, ``1 <= q <= d``.
    :param noise: ``"diagonal"`` (factor analysis) or ``"isotropic"`` (PPCA).
    :param init: optional ``{"mean": (d,), "loading": (d, q), "noise_variance":
        (d,) or ()}``; default: the principal-component solution of the sample
        covariance.

    Fitted parameters: ``mean`` ``(d,)``, ``loading`` ``W`` ``(d, q)``,
    ``noise_variance`` ``(d,)`` (diagonal) or a scalar (isotropic).

    :raises FreqviInputError: on the first data, if a column is constant or the
        columns are linearly dependent (:meth:`check_data`): noise variances would
        go to 0 and the log-likelihood to infinity.
    """

    _estimate_names = ("mean", "loading", "noise_variance")

    def __init__(self, dim: int, latent_dim: int, noise: str = "diagonal", *,
                 init: dict | None = None, name: str | None = None):
        self.dim = check_positive_int(dim, "dim")
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        if self.latent_dim > self.dim:
            raise FreqviInputError(f"latent_dim must be <= dim = {dim}; got {latent_dim}.")
        self.noise = check_choice(noise, "noise", NOISE_TYPES)
        super().__init__(init=init, name=name)

    # ----- parameters -------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """Identified parameters: ``d`` means, ``d q`` loadings less ``q(q-1)/2`` rotations, the noise."""
        d, q = self.dim, self.latent_dim
        return d + d * q - q * (q - 1) // 2 + (d if self.noise == "diagonal" else 1)

    def _noise_shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.noise == "diagonal" else ()

    def _check_init(self, init: dict) -> dict:
        expected = {"mean": (self.dim,), "loading": (self.dim, self.latent_dim),
                    "noise_variance": self._noise_shape()}
        init = check_init(init, expected)
        if (init["noise_variance"] <= 0).any():
            raise FreqviInputError("init['noise_variance'] must be positive.")
        return init

    def _set_values(self, values: dict[str, torch.Tensor]) -> None:
        self._set("mean", values["mean"], constraints.real)
        self._set("loading", values["loading"], constraints.real)
        self._set("noise_variance", values["noise_variance"], constraints.positive)

    def _initial_values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Principal components: ``W = U_q (L_q - s)^{1/2}``, ``s`` the mean discarded eigenvalue."""
        mean = x.mean(0)
        cov = torch.cov(x.T, correction=0).reshape(self.dim, self.dim)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0), evecs.flip(1)
        q = self.latent_dim
        rest = evals[q:].mean() if q < self.dim else 0.1 * evals[-1]
        floor = 1e-6 * evals[0].clamp_min(1e-12)
        rest = rest.clamp_min(floor)
        loading = evecs[:, :q] * (evals[:q] - rest).clamp_min(floor).sqrt()
        noise = torch.diagonal(cov) - loading.square().sum(-1) if self.noise == "diagonal" else rest
        return {"mean": mean, "loading": loading, "noise_variance": noise.clamp_min(floor)}

    def check_data(self, x: torch.Tensor) -> None:
        """Raises :class:`~freqvi.errors.FreqviInputError` unless ``x`` is ``(n, dim)``, likelihood bounded.

        The log-likelihood has no maximum (it grows without bound as noise variances
        go to 0) when some combination :math:`u^\top x_i` of the columns is constant,
        i.e. the sample covariance is singular: for diagonal noise always (the noise
        of the columns in :math:`u` can vanish with :math:`W^\top u = 0`), for isotropic
        noise when the rank is at most ``latent_dim``. The error names the columns.
        """
        check_matrix(x, self.dim)
        _refuse_constant_columns(x)
        _refuse_dependent_columns(x, 0 if self.noise == "diagonal" else self.latent_dim)

    def _prepare(self, x: torch.Tensor) -> None:
        check_matrix(x, self.dim)
        if not self.initialized:
            self.check_data(x)
            # Statistics are moments about this fixed shift: raw ones cancel in float32 at
            # large offsets, and a shift held fixed keeps online EM's blend linear.
            self.register_buffer("shift", x.mean(0).detach().clone())
        self._ensure_initialized(x)

    def _psi(self) -> torch.Tensor:
        """Noise variances as a ``(d,)`` vector."""
        return self.noise_variance.expand(self.dim)

    # ----- densities --------------------------------------------------------------------------
    @pyro_method
    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log N(x_i; mu, W W^T + Psi)``, shape ``(n,)`` (the Gaussian integral)."""
        self._prepare(x)
        return self._marginal().log_prob(x)

    def _marginal(self) -> dist.LowRankMultivariateNormal:
        return dist.LowRankMultivariateNormal(self.mean, self.loading, self._psi())

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The exact posterior of the factors, batch shape ``(n,)``, event shape ``(q,)``."""
        w_scaled = self.loading / self._psi().unsqueeze(-1)  # Psi^{-1} W, (d, q)
        precision = torch.eye(self.latent_dim, dtype=x.dtype) + self.loading.T @ w_scaled
        chol = torch.linalg.cholesky(precision)
        cov = torch.cholesky_inverse(chol)
        loc = (x - self.mean) @ w_scaled @ cov
        return dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(cov))

    # ----- model and guides -------------------------------------------------------------------
    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        """``z_i ~ N(0, I_q)``, ``x_i ~ N(mu + W z_i, Psi)`` for each row ``x_i``."""
        self._prepare(x)
        zeros = x.new_zeros(self.latent_dim)
        with pyro.plate(self.data_plate, x.shape[0]) as i:
            z = pyro.sample("factors", dist.Normal(zeros, 1.0).to_event(1))
            loc = self.mean + z @ self.loading.T
            pyro.sample("obs", dist.Normal(loc, self._psi().sqrt()).to_event(1), obs=x[i])

    @pyro_method
    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """The exact Gaussian posterior of the factors at the current parameters.

        Returns its normaliser, ``log p(x_i)`` for the rows the plate visits.
        """
        self._prepare(x)
        with pyro.plate(self.data_plate, x.shape[0]) as i:
            pyro.sample("factors", self.posterior(x[i]))
        return self._marginal().log_prob(x[i])

    def mean_field_guide(self) -> LocalMeanField:
        """A guide with free per-observation diagonal Gaussian factors (variational E-step)."""
        return LocalMeanField(self.model)

    # ----- closed-form M-step -----------------------------------------------------------------
    def expected_statistics(self, guide_trace, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""Averages of :math:`\tilde x^2` (diagonal), :math:`\tilde x\, E[\tilde z]^\top` and
        :math:`E[\tilde z \tilde z^\top]`, with :math:`\tilde x = x - c` and :math:`\tilde z = (z, 1)`.

        ``c`` is the data's mean when the model was initialised (the buffer ``shift``),
        the MLE of :math:`\mu` on those data, so the second moments are about a point
        near the mean: uncentred ones at an offset of 1e4 would cancel every digit of
        a unit noise variance in float32. Any guide with a Gaussian factor site works
        (exact or mean-field); its mean and covariance are read off the trace.
        """
        fn = guide_trace.nodes["factors"]["fn"]
        index = guide_trace.nodes[self.data_plate]["value"]
        xb = x[index] - self.shift
        n, q = xb.shape[0], self.latent_dim
        mean = fn.mean
        cov = fn.covariance_matrix if hasattr(fn, "covariance_matrix") \
            else torch.diag_embed(fn.variance)
        ez = torch.cat([mean, mean.new_ones(n, 1)], -1)  # E[z~], (n, q+1)
        ezz = ez.T @ ez / n
        ezz[:q, :q] += cov.expand(n, q, q).mean(0)
        return {"xx": xb.square().mean(0), "xz": xb.T @ ez / n, "zz": ezz}

    def maximize(self, statistics: dict[str, torch.Tensor]) -> None:
        """``[W, mu - c] = S_xz S_zz^{-1}``, ``psi = diag(S_xx - [W, mu - c] S_xz^T)``.

        ``psi`` is averaged over coordinates if the noise is isotropic.
        """
        xz, zz = statistics["xz"], statistics["zz"]
        coef = torch.linalg.solve(zz, xz.T).T  # (d, q+1) = [W, mu - c]
        psi = statistics["xx"] - (coef * xz).sum(-1)
        floor = torch.finfo(psi.dtype).eps * statistics["xx"].mean()
        psi = psi.clamp_min(floor) if self.noise == "diagonal" else psi.mean().clamp_min(floor)
        self._set_values({"mean": self.shift + coef[:, -1], "loading": coef[:, :-1],
                          "noise_variance": psi})


def _refuse_dependent_columns(x: torch.Tensor, rank_needed_above: int) -> None:
    """Refuses data whose sample covariance is singular (rank below ``d``, or at most the bound)."""
    centred = x.double() - x.double().mean(0)
    values, vectors = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    # Below the rounding of the eigensolver or of the data's own precision, a spread is 0.
    eps = max(x.shape[1] * torch.finfo(torch.float64).eps, (10 * torch.finfo(x.dtype).eps) ** 2)
    null = values <= eps * values[-1]
    rank = x.shape[1] - int(null.sum())
    if rank < x.shape[1] and (rank_needed_above == 0 or rank <= rank_needed_above):
        u = vectors[:, 0] / vectors[:, 0].abs().max()
        columns = (u.abs() > 1e-6).nonzero().flatten().tolist()
        raise FreqviInputError(
            f"the data's columns are linearly dependent (the sample covariance has rank {rank} < "
            f"{x.shape[1]}): the combination {[round(float(u[j]), 6) for j in columns]} of columns "
            f"{columns} is constant, so the likelihood has no maximum (their noise variances go to 0 "
            "and the log-likelihood to infinity); drop a column of each dependent set."
        )


def _refuse_constant_columns(x: torch.Tensor) -> None:
    """Refuses data with a constant column: its noise variance would go to 0, the likelihood to infinity."""
    constant = (x == x[:1]).all(0).nonzero().flatten().tolist()
    if constant:
        raise FreqviInputError(
            f"columns {constant} of the data are constant ({[float(x[0, j]) for j in constant]}): "
            "factor analysis's likelihood has no maximum there (that noise variance goes to 0 and "
            "the log-likelihood to infinity); drop those columns, which the model cannot explain."
        )
