"""The variational autoencoder: a latent Gaussian model with a neural decoder (paper section 5)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer.util import is_validation_enabled
from pyro.nn import PyroParam, pyro_method
from torch import nn
from torch.nn.functional import softplus

from freqvi.errors import DegenerateDataWarning, FreqviInputError
from freqvi.guides.amortized import SCALE_FLOOR, AmortizedNormal
from freqvi.models.base import LatentVariableModel
from freqvi.validation import (
    allocation,
    check_choice,
    check_finite,
    check_matrix,
    check_positive_float,
    check_positive_int,
    check_widths,
)

#: The observation models of :class:`~freqvi.models.VAE` (``likelihood=``).
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")
#: The Gaussian likelihood's scale: one per coordinate, or one shared (``noise=``).
NOISE_TYPES = ("diagonal", "isotropic")
#: The default floor of that scale (``min_noise_scale=``): a variance of 1e-6, scikit-learn's ``reg_covar``.
MIN_NOISE_SCALE = 1e-3


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Affine layers through ``sizes`` (``sizes[0]`` in, ``sizes[-1]`` out); ``activation`` between only.

    ``mlp((d, h, q))`` computes :math:`W_2\\, \\mathrm{relu}(W_1 x + b_1) + b_2`, mapping
    ``(..., d)`` to ``(..., q)``; PyTorch's default initialisation.
    """
    sizes = [check_positive_int(s, "layer width") for s in sizes]
    if len(sizes) < 2:
        raise FreqviInputError(f"an MLP needs an input and an output width; got sizes {sizes}.")
    layers: list[nn.Module] = []
    with allocation(f"an MLP with layer widths {sizes}"):
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), activation()]
    return nn.Sequential(*layers[:-1])


class GaussianEncoder(nn.Module):
    r"""``x -> (mu(x), sigma(x))``, the encoder of :class:`~freqvi.guides.AmortizedNormal`'s contract.

    An :func:`mlp` ``data_dim -> hidden -> 2 latent_dim`` whose output splits into
    :math:`\mu` and :math:`\sigma = \mathrm{softplus}(\cdot) + 10^{-5}`; input ``(batch,
    data_dim)``, outputs ``(batch, latent_dim)`` each.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = ()):
        super().__init__()
        self.net = mlp((data_dim, *check_widths(hidden), 2 * latent_dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.net(x).chunk(2, -1)
        return loc, softplus(raw_scale) + SCALE_FLOOR


def _floored_scale(shape: tuple[int, ...], init: float, floor: float) -> PyroParam:
    """A scale parameter ``floor + exp(u)`` (``exp(u)`` for ``floor = 0``) of ``shape``, starting at ``init``.

    :raises FreqviInputError: unless ``init`` is a finite number above ``floor``.
    """
    init = check_positive_float(init, "init_noise_scale")
    if init <= floor:
        raise FreqviInputError(f"init_noise_scale must be above min_noise_scale = {floor:g}; got {init!r}.")
    constraint = constraints.greater_than(floor) if floor else constraints.positive
    return PyroParam(torch.full(shape, init), constraint)


class VAE(LatentVariableModel):
    r"""Variational autoencoder: a deep latent Gaussian model and its amortised guide.

    .. math::

        z_i \sim \mathcal N(0, I_q), \qquad x_i \mid z_i \sim p(x_i \mid f_\theta(z_i)),
        \qquad q_\phi(z_i \mid x_i) = \mathcal N(\mu_\phi(x_i), \operatorname{diag} \sigma_\phi(x_i)^2),

    with :math:`f_\theta` the decoder, an :func:`mlp` ``latent_dim -> reversed(hidden)
    -> data_dim``, and :math:`p(x \mid \cdot)` independent per dimension:

    * ``"bernoulli"``: :math:`\mathrm{Bernoulli}(\mathrm{sigmoid}(f))`. On values strictly
      inside ``(0, 1)`` its log-density is the cross-entropy, which is not normalised on
      ``[0, 1]``: exact for binary data, a pseudo-likelihood otherwise;
    * ``"continuous_bernoulli"``: the normalised density on ``[0, 1]`` (Loaiza-Ganem and
      Cunningham 2019) with logits :math:`f`;
    * ``"gaussian"``: :math:`\mathcal N(f, \sigma^2)` with a learned ``noise_scale``
      :math:`\sigma`, per dimension (``noise="diagonal"``) or one scalar (``"isotropic"``),
      :math:`\sigma = \sigma_{\min} + e^{u}` over its free coordinate :math:`u`. The floor
      :math:`\sigma_{\min}` (``min_noise_scale``) plays the part of scikit-learn's ``reg_covar``: on
      a constant column (a pixel that is always 0) the likelihood grows without bound as that
      :math:`\sigma \to 0`, by :math:`-\log \sigma` per row; the floor bounds it at
      :math:`-\log \sigma_{\min} - \tfrac12 \log 2\pi` per row, and :math:`\sigma` there converges
      to :math:`\sigma_{\min}`. :meth:`check_data` warns of such columns
      (:class:`~freqvi.errors.DegenerateDataWarning`).

    The decoder :math:`\theta` is estimated by maximum likelihood through the ELBO; the
    encoder :math:`\phi` (a :class:`GaussianEncoder` ``data_dim -> hidden -> latent_dim``
    inside ``guide``, an :class:`~freqvi.guides.AmortizedNormal`) only serves the
    approximation. Sites: ``"latent"`` (event shape ``(q,)``) and ``"obs"`` (event shape
    ``(d,)``) inside the plate ``"data"``. Both networks are built at construction, in
    float32; float64 data converts them.

    Default ``hidden=(128, 64)``: two layers of at most twice the 64 pixels of the
    digits, enough to fit their 1,500 training images (wider nets only overfit sooner)
    and fast enough to train in about a minute on two CPU cores.

    :param data_dim: ``d``, the observation's dimension.
    :param latent_dim: ``q >= 1``.
    :param hidden: the encoder's hidden widths, input side first; the decoder mirrors them.
    :param likelihood: one of :data:`~freqvi.models.vae.LIKELIHOODS`.
    :param noise: the Gaussian likelihood's scale, one of :data:`~freqvi.models.vae.NOISE_TYPES`.
    :param init_noise_scale: its initial value, above ``min_noise_scale``.
    :param min_noise_scale: the floor :math:`\sigma_{\min} \ge 0` of the Gaussian likelihood's scale,
        in the data's units; the default ``1e-3`` is a variance of ``1e-6``, scikit-learn's
        ``reg_covar`` default. ``0`` removes it (then a constant column makes the likelihood
        unbounded).
    :raises FreqviInputError: for a bad size, width, likelihood, noise type or scale.
    """

    exact_guide = False

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (128, 64),
                 likelihood: str = "bernoulli", *, noise: str = "diagonal", init_noise_scale: float = 1.0,
                 min_noise_scale: float = MIN_NOISE_SCALE, name: str | None = None):
        super().__init__(name=name)
        self.data_dim = check_positive_int(data_dim, "data_dim")
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.hidden = check_widths(hidden)
        self.likelihood = check_choice(likelihood, "likelihood", LIKELIHOODS)
        self.noise = check_choice(noise, "noise", NOISE_TYPES)
        self.decoder = mlp((self.latent_dim, *reversed(self.hidden), self.data_dim))
        self.min_noise_scale = check_positive_float(min_noise_scale, "min_noise_scale", allow_zero=True)
        if self.likelihood == "gaussian":
            shape = (self.data_dim,) if self.noise == "diagonal" else ()
            self.noise_scale = _floored_scale(shape, init_noise_scale, self.min_noise_scale)
        encoder = GaussianEncoder(self.data_dim, self.latent_dim, self.hidden)
        self.guide = AmortizedNormal(self.model, encoder, data_plate=self.data_plate)

    @property
    def initialized(self) -> bool:
        """Always ``True``: the networks exist from construction."""
        return True

    def _prepare(self, x: torch.Tensor) -> None:
        check_matrix(x, self.data_dim)
        if self._dtype() != x.dtype:
            self.to(x.dtype)

    def check_data(self, x: torch.Tensor) -> None:
        """Raises :class:`~freqvi.errors.FreqviInputError` unless ``x`` is ``(n, data_dim)``,
        finite and, for the two Bernoulli likelihoods, inside their support ``[0, 1]``; for the
        Gaussian likelihood, warns (:class:`~freqvi.errors.DegenerateDataWarning`) of the columns on
        which only ``min_noise_scale`` bounds it: constant ones (with one scale per column) or all of
        them when every row is the same (one shared scale)."""
        self._check_values(x)
        if self.likelihood == "gaussian" and x.shape[0] > 1:
            self._warn_constant_columns(x)

    def _warn_constant_columns(self, x: torch.Tensor) -> None:
        constant = (x == x[:1]).all(0)
        if self.noise == "isotropic" and not constant.all():
            return
        columns = constant.nonzero().flatten().tolist()
        if not columns:
            return
        floor = self.min_noise_scale
        bound = -math.log(floor) - 0.5 * math.log(2 * math.pi) if floor else math.inf  # max of log N(x; x, s)
        shown = columns if len(columns) <= 20 else [*columns[:20], "..."]
        warnings.warn(DegenerateDataWarning(
            f"columns {shown} of the data ({len(columns)} of {self.data_dim}) are constant: there the "
            f"Gaussian likelihood grows as the noise scale falls, bounded only by min_noise_scale = "
            f"{self.min_noise_scale:g} (at most {bound:.4g} nats per row and column), so the scale there "
            "is the floor, not an estimate, and the log-likelihood counts that bound. Drop those columns, "
            "or choose min_noise_scale (the data's resolution, e.g. half a grey level)."), stacklevel=3)

    def _check_values(self, x: torch.Tensor) -> None:
        """:meth:`check_data`'s refusals, without its warning (the model's own check at every trace)."""
        check_matrix(x, self.data_dim)
        check_finite(x, "data")
        if self.likelihood != "gaussian" and ((x < 0) | (x > 1)).any():
            raise FreqviInputError(
                f"the {self.likelihood} likelihood needs values in [0, 1]; the data range over "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}]. Rescale them (e.g. divide by the "
                "maximum intensity) or use likelihood='gaussian'."
            )

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """:math:`p(x \\mid z; \\theta)`: batch shape ``z.shape[:-1]``, event shape ``(data_dim,)``."""
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # validate_args=False: the cross-entropy also scores non-binary values in [0, 1]
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=out).to_event(1)
        return dist.Normal(out, self.noise_scale.expand(self.data_dim)).to_event(1)

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        """``z_i ~ N(0, I_q)``, ``x_i ~ p(x | decoder(z_i))`` for each row ``x_i`` the plate visits."""
        self._prepare(x)
        with pyro.plate(self.data_plate, x.shape[0]) as i:
            obs = x[i]
            if is_validation_enabled():  # fit checks the data once, then steps with validation off
                self._check_values(obs)
            z = pyro.sample("latent", dist.Normal(x.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1))
            pyro.sample("obs", self.decode(z), obs=obs)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's ``(loc, scale)`` of :math:`q_\\phi(z \\mid x)`, each ``(n, latent_dim)``."""
        self._prepare(x)
        self._check_values(x)
        return self.guide.encoder(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of :math:`p(x \\mid z = \\mu_\\phi(x))`, shape ``(n, data_dim)``."""
        return self.decode(self.encode(x)[0]).mean

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """The means of :math:`p(x \\mid z)` at ``num_samples`` draws :math:`z \\sim \\mathcal N(0, I)`."""
        z = torch.randn(check_positive_int(num_samples, "num_samples"), self.latent_dim, dtype=self._dtype())
        return self.decode(z).mean
