r"""Denoising diffusion as a deep latent chain (paper section 6): a VAE whose latent is
:math:`x_{1:T}`, whose fixed "encoder" is the forward noising chain and whose decoder
is the learned reverse chain.

* :class:`ForwardNoising`: the guide :math:`q(x_{1:T} \mid x_0) = \prod_t q(x_t \mid x_{t-1})`,
  no parameters, with the closed forms the estimators use.
* :class:`GaussianDiffusion`: the model :math:`p(x_T) \prod_t p_\theta(x_{t-1} \mid x_t)`, the
  mean in the noise-prediction parameterisation, and samplers.
* :class:`TimeMLP`: the default noise-prediction network :math:`\epsilon_\theta(x_t, t)`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method
from torch import nn

from freqvi.errors import FreqviInputError
from freqvi.models.base import LatentVariableModel
from freqvi.models.noise_schedule import NoiseSchedule
from freqvi.models.registration import submodule
from freqvi.models.vae import mlp
from freqvi.validation import (
    allocation,
    check_choice,
    check_finite,
    check_matrix,
    check_positive_int,
    check_widths,
)

#: The reverse step's variance sigma_t^2: beta_t, or the forward posterior's betatilde_t.
REVERSE_VARIANCES = ("beta", "posterior")
SAMPLERS = ("ancestral", "ddim")


def site_name(t: int) -> str:
    """The name of the chain's sample site for :math:`x_t`: ``"x_0"`` (observed) ... ``"x_T"``."""
    return f"x_{t}"


class TimeMLP(nn.Module):
    r""":math:`\epsilon_\theta(x_t, t)`: an :func:`~freqvi.models.mlp` on :math:`[x_t, e(t)]`, SiLU between.

    The time embedding is sinusoidal (Vaswani et al. 2017; Ho et al. 2020):
    :math:`e(t) = [\sin(t \omega_k), \cos(t \omega_k)]_{k < m/2}`,
    :math:`\omega_k = 10000^{-2k/m}`, ``m = embedding_dim``. Input ``x_t`` of shape
    ``(..., data_dim)`` and integer ``t`` of shape ``(...)``; output ``(..., data_dim)``.

    :param hidden: hidden widths (the digits benchmark uses ``(512, 512, 512)``).
    :param embedding_dim: ``m``, even.
    """

    def __init__(self, data_dim: int, hidden: Sequence[int] = (128, 128, 128), embedding_dim: int = 32):
        super().__init__()
        embedding_dim = check_positive_int(embedding_dim, "embedding_dim", minimum=2)
        if embedding_dim % 2:
            raise FreqviInputError(f"embedding_dim must be even; got {embedding_dim}.")
        half = embedding_dim // 2
        self.register_buffer("frequencies", torch.exp(-math.log(10000.0) * torch.arange(half) / half))
        self.net = mlp((data_dim + embedding_dim, *check_widths(hidden), data_dim), nn.SiLU)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t.unsqueeze(-1).to(x_t.dtype) * self.frequencies
        return self.net(torch.cat([x_t, angles.sin(), angles.cos()], -1))


class _Columns:
    """Per-dtype stacks of coefficient columns ``(T + 1, k)``, gathered at ``t`` in one indexing."""

    def __init__(self, columns: Sequence[torch.Tensor]):
        self._stacked = {torch.float64: torch.stack(list(columns), -1)}

    def at(self, t: torch.Tensor | int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The columns at ``t`` (shape ``t.shape``) in ``dtype``."""
        return self._table(dtype)[t].unbind(-1)

    def per_row(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The columns at ``t`` shaped ``t.shape + (1,)``, to multiply rows ``(..., d)``."""
        return self._table(dtype)[t].unsqueeze(-1).unbind(-2)

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._stacked:
            self._stacked[dtype] = self._stacked[torch.float64].to(dtype)
        return self._stacked[dtype]


class ForwardNoising:
    r"""The guide: the forward chain :math:`q(x_t \mid x_{t-1}) = N(\sqrt{\alpha_t} x_{t-1}, \beta_t I)`.

    A Pyro program (call it with the data ``x``, shape ``(n, d)``) that draws ``"x_1"``, ...,
    ``"x_T"`` in that order inside the plate ``data_plate``; it has no parameters. Its
    closed forms (from its :class:`~freqvi.models.NoiseSchedule`) are what the
    time-subsampled estimators read: the marginal :math:`q(x_t \mid x_0)` and the
    posterior :math:`q(x_{t-1} \mid x_t, x_0)`. Per-row steps ``t`` are integer
    tensors; coefficients come back with ``t``'s shape.
    """

    def __init__(self, schedule: NoiseSchedule, data_plate: str = "data"):
        self.schedule, self.data_plate = schedule, data_plate
        tab = schedule.table()
        self._columns = _Columns([tab.alphas_cumprod.sqrt(), 1 - tab.alphas_cumprod, tab.posterior_x0,
                                  tab.posterior_xt, tab.posterior_variance, (1 - tab.alphas_cumprod).sqrt()])

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.schedule.num_steps

    def __call__(self, x: torch.Tensor) -> None:
        tab = self.schedule.table(x.dtype)
        with pyro.plate(self.data_plate, x.shape[0]) as i:
            x_t = x[i]
            for t in range(1, self.num_steps + 1):
                loc = tab.alphas[t].sqrt() * x_t
                x_t = pyro.sample(site_name(t), dist.Normal(loc, tab.betas[t].sqrt()).to_event(1))

    def marginal(self, t: torch.Tensor | int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\sqrt{\bar\alpha_t}, 1 - \bar\alpha_t)`, each of ``t``'s shape.

        :math:`q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t} x_0, (1 - \bar\alpha_t) I)`.
        """
        return self._columns.at(t, dtype)[:2]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        r""":math:`x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\, \epsilon`, shape of ``x0``
        (``t`` of shape ``x0.shape[:-1]``; ``eps`` standard normal, drawn if not given)."""
        columns = self._columns.per_row(t, x0.dtype)
        mean, std = columns[0], columns[5]
        eps = torch.randn_like(x0) if eps is None else eps
        return mean * x0 + std * eps

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\tilde\mu_t(x_t, x_0)`, mean of :math:`q(x_{t-1} \mid x_t, x_0)`; ``x0`` at ``t = 1``."""
        a, b = self._columns.per_row(t, x0.dtype)[2:4]
        return a * x0 + b * x_t

    def posterior_variance(self, t: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        r""":math:`\tilde\beta_t`, shape of ``t`` (0 at ``t = 1``)."""
        return self._columns.at(t, dtype)[4]


class GaussianDiffusion(LatentVariableModel):
    r"""A Gaussian denoising diffusion model and its forward-noising guide.

    .. math::

        p(x_T) = \mathcal N(0, I), \quad
        p_\theta(x_{t-1} \mid x_t) = \mathcal N\Bigl(\frac{1}{\sqrt{\alpha_t}}\Bigl(x_t
            - \frac{\beta_t}{\sqrt{1 - \bar\alpha_t}} \epsilon_\theta(x_t, t)\Bigr), \sigma_t^2 I\Bigr),
        \quad t = T, \dots, 1,

    with ``x_0`` the observation, :math:`\epsilon_\theta` the ``denoiser`` and
    :math:`\sigma_t^2 = \beta_t` (``reverse_variance="beta"``) or :math:`\tilde\beta_t`
    (``"posterior"``). The decoder :math:`p_\theta(x_0 \mid x_1)` is the same Gaussian with
    :math:`\sigma_1^2 = \beta_1` in both cases (:math:`\tilde\beta_1 = 0`): a density for
    continuous data. The guide (``guide``, a :class:`ForwardNoising`) is the fixed forward
    chain. The model's sites, inside the plate ``"data"``: ``"x_T"``, ..., ``"x_1"`` (latent,
    event shape ``(d,)``) and ``"x_0"`` (observed), named by ``site_name``.

    The pair is a genuine Pyro model/guide pair, so Pyro's :class:`~pyro.infer.Trace_ELBO`
    fits it as the hierarchical VAE it is (at a cost growing with ``T``); freqvi's
    :class:`~freqvi.estimators.TimeSubsampledELBO` estimates the same ELBO at a cost
    independent of ``T`` through the closed forms the pair exposes (:meth:`reverse_mean`,
    :meth:`reverse_variance`, and the guide's :class:`ForwardNoising` methods).

    :param data_dim: ``d``.
    :param num_steps: ``T >= 1`` (default 1000; with a :class:`NoiseSchedule` its own ``T``).
    :param schedule: ``"linear"``, ``"cosine"`` or a :class:`~freqvi.models.NoiseSchedule`.
    :param denoiser: any module ``(x_t, t) -> eps`` mapping ``(b, d)`` and integer ``(b,)`` to
        ``(b, d)``; default a :class:`TimeMLP` with ``hidden`` widths. It is run once at
        construction to check its output shape.
    :param reverse_variance: one of :data:`~freqvi.models.diffusion.REVERSE_VARIANCES`.
    """

    exact_guide = False

    def __init__(self, data_dim: int, num_steps: int | None = None, schedule: str | NoiseSchedule = "linear",
                 denoiser: nn.Module | None = None, reverse_variance: str = "beta", *,
                 hidden: Sequence[int] = (128, 128, 128), name: str | None = None):
        super().__init__(name=name)
        self.data_dim = check_positive_int(data_dim, "data_dim")
        self.schedule = _schedule(schedule, num_steps)
        self.reverse_variance_type = check_choice(reverse_variance, "reverse_variance", REVERSE_VARIANCES)
        self.denoiser = TimeMLP(self.data_dim, hidden) if denoiser is None else denoiser
        _check_denoiser(self.denoiser, self.data_dim, self.num_steps)
        self.guide = ForwardNoising(self.schedule, self.data_plate)
        tab = self.schedule.table()
        sigma2 = (tab.betas if reverse_variance == "beta" else tab.posterior_variance).clone()
        sigma2[1] = tab.betas[1]  # the decoder's variance in both cases
        # mean = x_t / sqrt(alpha_t) - eps_coef_t eps, eps_coef_t = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t))
        eps_coef = tab.betas / ((1 - tab.alphas_cumprod).clamp_min(1e-300).sqrt() * tab.alphas.sqrt())
        self._columns = _Columns([tab.alphas.rsqrt(), eps_coef, sigma2])

    @property
    def num_steps(self) -> int:
        """``T``."""
        return self.schedule.num_steps

    @property
    def initialized(self) -> bool:
        """Always ``True``: the network exists from construction."""
        return True

    def check_data(self, x: torch.Tensor) -> None:
        """Raises :class:`~freqvi.errors.FreqviInputError` unless ``x`` is finite, shape ``(n, data_dim)``."""
        check_matrix(x, self.data_dim)
        check_finite(x, "data")

    def prepare(self, x: torch.Tensor) -> None:
        """Checks observations as :meth:`check_data` does and moves the network to their dtype."""
        check_matrix(x, self.data_dim)
        if not torch.isfinite(x).all():  # one reduction per step; the details only on failure
            check_finite(x, "data")
        if self._dtype() != x.dtype:
            self.to(x.dtype)

    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.parameters()), torch.get_default_dtype())

    # ----- the reverse chain -----------------------------------------------------------------
    @pyro_method
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r""":math:`\epsilon_\theta(x_t, t)`, shape of ``x_t``; ``t`` integer of shape ``x_t.shape[:-1]``.

        The denoiser's parameters are ``pyro.param`` sites where anything could see them
        (:func:`~freqvi.models.registration.submodule`)."""
        return submodule(self, "denoiser")(x_t, t)

    @pyro_method
    def reverse_mean(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r"""The mean of :math:`p_\theta(x_{t-1} \mid x_t)`, shape of ``x_t`` (one denoiser call)."""
        inv_sqrt_alpha, eps_coef, _ = self._columns.per_row(t, x_t.dtype)
        return inv_sqrt_alpha * x_t - eps_coef * self.predict_noise(x_t, t)

    def reverse_variance(self, t: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        r""":math:`\sigma_t^2`, shape of ``t``."""
        return self._columns.at(t, dtype)[2]

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        """``x_T ~ N(0, I)``, then ``x_{t-1} ~ p(x_{t-1} | x_t)`` down to the observed ``x_0``."""
        with pyro.plate(self.data_plate, x.shape[0]) as i:
            obs = x[i]
            self.prepare(obs)  # the rows visited: a full pass before training, then cheap per step
            x_t = pyro.sample(site_name(self.num_steps),
                              dist.Normal(x.new_zeros(()), 1.0).expand([self.data_dim]).to_event(1))
            for t in range(self.num_steps, 0, -1):
                steps = torch.full(x_t.shape[:-1], t, dtype=torch.long)
                scale = self.reverse_variance(t, x.dtype).sqrt()
                step = dist.Normal(self.reverse_mean(x_t, steps), scale).to_event(1)
                x_t = pyro.sample(site_name(t - 1), step, obs=obs if t == 1 else None)

    # ----- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int, *, method: str = "ancestral", num_steps: int | None = None,
               seed: int | None = None) -> torch.Tensor:
        r"""Draws from the fitted model, shape ``(num_samples, data_dim)``, all rows at once.

        * ``"ancestral"``: :math:`x_T \sim \mathcal N(0, I)`, then :math:`x_{t-1} \sim p_\theta(x_{t-1}
          \mid x_t)` down to ``x_0`` (its noise :math:`\sigma_1` included): exact draws from the model.
        * ``"ddim"``: the deterministic sampler of Song, Meng and Ermon (2021, :math:`\eta = 0`) on
          ``num_steps`` evenly spaced steps :math:`\tau_k` (default ``T``):
          :math:`\hat x_0 = (x_\tau - \sqrt{1 - \bar\alpha_\tau} \epsilon_\theta) / \sqrt{\bar\alpha_\tau}`,
          :math:`x_{\tau'} = \sqrt{\bar\alpha_{\tau'}} \hat x_0 + \sqrt{1-\bar\alpha_{\tau'}}\epsilon_\theta`,
          ending at :math:`\hat x_0`. Not a draw from :math:`p_\theta`, only its initial
          noise is random.

        :param seed: if given, a private generator seeded with it draws the noise, so equal seeds
            give equal samples and the global random state is untouched.
        """
        num_samples = check_positive_int(num_samples, "num_samples")
        method = check_choice(method, "method", SAMPLERS)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        x = torch.randn(num_samples, self.data_dim, generator=gen, dtype=self._dtype())
        if method == "ddim":
            return self._ddim(x, self.num_steps if num_steps is None else num_steps)
        if num_steps is not None:
            raise FreqviInputError("num_steps chooses the steps of the ddim sampler; ancestral sampling "
                                   f"runs all T = {self.num_steps}.")
        for t in range(self.num_steps, 0, -1):
            steps = torch.full((num_samples,), t, dtype=torch.long)
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x = self.reverse_mean(x, steps) + self.reverse_variance(t, x.dtype).sqrt() * noise
        return x

    def _ddim(self, x: torch.Tensor, num_steps: int) -> torch.Tensor:
        num_steps = check_positive_int(num_steps, "num_steps")
        if num_steps > self.num_steps:
            raise FreqviInputError(f"DDIM takes at most T = {self.num_steps} steps; got {num_steps}.")
        taus = torch.linspace(self.num_steps, 0, num_steps + 1).round().long().tolist()
        for tau, nxt in itertools.pairwise(taus):
            sqrt_abar, var = self.guide.marginal(tau, x.dtype)
            eps = self.predict_noise(x, torch.full(x.shape[:-1], tau, dtype=torch.long))
            x0 = (x - var.sqrt() * eps) / sqrt_abar
            if nxt == 0:
                return x0
            next_sqrt_abar, next_var = self.guide.marginal(nxt, x.dtype)
            x = next_sqrt_abar * x0 + next_var.sqrt() * eps
        return x

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int,
                 eps: torch.Tensor | None = None) -> torch.Tensor:
        r"""Noises data: :math:`x_t \sim q(x_t \mid x_0)` for every row of ``x0`` ``(n, d)`` (see
        :meth:`ForwardNoising.q_sample`); ``t`` an int or per-row integers ``(n,)``."""
        t = torch.as_tensor(t, dtype=torch.long).expand(x0.shape[:-1])
        if bool(((t < 0) | (t > self.num_steps)).any()):
            raise FreqviInputError(f"steps t must lie in 0..{self.num_steps}.")
        return self.guide.q_sample(x0, t, eps)


def _schedule(schedule: str | NoiseSchedule, num_steps: int | None) -> NoiseSchedule:
    if isinstance(schedule, NoiseSchedule):
        if num_steps is not None and num_steps != schedule.num_steps:
            raise FreqviInputError(f"num_steps = {num_steps} disagrees with the schedule's T = "
                                   f"{schedule.num_steps}; leave num_steps out.")
        return schedule
    with allocation(f"a noise schedule of {num_steps} steps"):
        return NoiseSchedule.named(schedule, 1000 if num_steps is None else num_steps)


def _check_denoiser(denoiser: nn.Module, data_dim: int, num_steps: int) -> None:
    """Runs ``denoiser`` on two zero rows at ``t = T``; its output must have the input's shape."""
    if not isinstance(denoiser, nn.Module):
        raise FreqviInputError(f"denoiser must be a torch.nn.Module (x_t, t) -> eps; got "
                               f"{type(denoiser).__name__}.")
    dtype = next((p.dtype for p in denoiser.parameters()), torch.get_default_dtype())
    x = torch.zeros(2, data_dim, dtype=dtype)
    try:
        with torch.no_grad():
            out = denoiser(x, torch.full((2,), num_steps, dtype=torch.long))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise FreqviInputError(f"the denoiser fails on x_t of shape (2, {data_dim}) and t of shape (2,): "
                               f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise FreqviInputError(f"the denoiser must return eps of its input's shape (2, {data_dim}); "
                               f"got {shape}.")
