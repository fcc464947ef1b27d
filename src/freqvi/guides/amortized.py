"""An amortised Gaussian guide: an encoder maps each observation to its posterior (amortised VI)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro.nn import PyroModule
from pyro.poutine.indep_messenger import CondIndepStackFrame
from torch import nn
from torch.nn.functional import softplus

from freqvi.errors import FreqviInputError
from freqvi.guides._sites import LatentSite, inside_plates, model_latent_sites, normal_factor, site_plates
from freqvi.validation import check_positive_float, check_positive_int

_names = itertools.count()

#: Smallest scale the default encoder outputs, so that log q stays finite.
SCALE_FLOOR = 1e-5


class AmortizedNormal(PyroModule):
    r"""Amortised diagonal Gaussian guide :math:`q_\phi(z_i \mid x_i) = \mathcal N(\mu_\phi(x_i),
    \operatorname{diag} \sigma_\phi(x_i)^2)`, pushed through ``biject_to(support)``.

    Where :class:`~freqvi.guides.LocalMeanField` gives every observation free
    parameters :math:`\lambda_i`, this guide computes them, :math:`\lambda_i =
    f_\phi(x_i)`, with one encoder shared by all observations (paper section 4):
    its cost does not grow with ``n``, new observations get a posterior in one
    pass, and the price is the amortisation gap, an ELBO no higher than the
    free guide's.

    Every latent site of the model must be continuous and sit inside the data
    plate (``with pyro.plate(data_plate, n) as i:``). On the first call the guide
    runs the model on the given data to find these sites, their shapes and
    supports. The encoder's input for observation ``i`` is row ``i`` of every
    positional data tensor whose first dimension is the plate's size ``n``,
    selected by the plate's indices (so a minibatch encodes only its rows).

    **Encoder contract.** ``encoder(*batch_data)`` takes those tensors, each of
    shape ``(batch, ...)``, in argument order, and returns a tuple ``(loc,
    scale)`` of two tensors of shape ``(batch, D)``, ``scale > 0``, on the
    unconstrained space. ``D`` is the sum over latent sites of the number of
    entries per observation; the columns hold the sites in the order the model
    samples them, each flattened row-major from its per-observation shape
    (:attr:`latent_shapes` lists both). The encoder is a submodule of the guide:
    each call registers its parameters in Pyro's parameter store (a plain
    ``nn.Module`` child of a :class:`~pyro.nn.PyroModule` goes through
    ``pyro.module``), so SVI's optimiser updates them.

    **Default encoder.** An MLP on the observation's data, flattened and
    concatenated, standardised by the mean and standard deviation of the data of
    the first call (over the observed cells; a missing cell, NaN under
    :func:`freqvi.with_missing`, enters as its column's mean); ``hidden`` layers
    with ReLU; ``loc`` from a linear head and ``scale = softplus(.) + 1e-5`` from
    another. Both heads start at zero weights, so every observation starts at
    ``loc = 0`` and ``scale = init_scale``. It is built on the first call, in the
    data's dtype.

    :param model: the model, a callable taking the same arguments as the guide.
    :param encoder: a :class:`torch.nn.Module` obeying the contract above, or
        ``None`` for the default MLP.
    :param hidden: widths of the default MLP's hidden layers (``()``: a linear encoder).
    :param data_plate: name of the model's plate over observations.
    :param init_scale: the default encoder's initial standard deviation.
    """

    def __init__(self, model: Callable, encoder: nn.Module | None = None, *,
                 hidden: Sequence[int] = (64, 64), data_plate: str = "data", init_scale: float = 1.0):
        super().__init__(name=f"AmortizedNormal_{next(_names)}")
        self._model = (model,)  # a tuple, so a PyroModule model is not registered as a child
        if encoder is not None:
            if not isinstance(encoder, nn.Module):
                raise FreqviInputError(f"encoder must be a torch.nn.Module; got {type(encoder).__name__}.")
            self.encoder = encoder
        self.hidden = tuple(check_positive_int(h, "hidden width") for h in hidden)
        self.data_plate = data_plate
        self.init_scale = check_positive_float(init_scale, "init_scale")
        self._sites: dict[str, LatentSite] | None = None
        self._shapes: dict[str, torch.Size] = {}
        self._inputs: list[int] = []
        self._data_dim = 0

    @property
    def latent_shapes(self) -> dict[str, torch.Size]:
        """Per-observation shape of each latent site on the unconstrained space, in encoder column order.

        Known after the first call.
        """
        if self._sites is None:
            raise FreqviInputError("the guide learns the latent sites on its first call; call it on data.")
        return dict(self._shapes)

    def forward(self, *args, **kwargs) -> None:
        """Samples every latent site of the model from the encoder's Gaussian for its observation."""
        if self._sites is None:
            self._setup(*args, **kwargs)
        n = args[self._inputs[0]].shape[0]
        plates = site_plates(self._sites.values(), {self.data_plate: n})
        index = plates[self.data_plate].indices
        loc, scale = self._encode([args[k][index] for k in self._inputs])
        sizes = [math.prod(shape) for shape in self._shapes.values()]
        for site, site_loc, site_scale in zip(self._sites.values(), loc.split(sizes, -1),
                                              scale.split(sizes, -1), strict=True):
            with inside_plates(site, plates):
                loc_s, scale_s = self._unflatten(site_loc, site), self._unflatten(site_scale, site)
                pyro.sample(site.name, normal_factor(loc_s, scale_s, site))

    def _setup(self, *args, **kwargs) -> None:
        sites = model_latent_sites(self._model[0], *args, **kwargs)
        frame = self._check_sites(sites)
        n = frame.full_size or frame.size
        inputs = [k for k, a in enumerate(args)
                  if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == n]
        if not inputs:
            raise FreqviInputError(
                f"the plate {self.data_plate!r} has {n} elements, but no positional data argument has "
                f"{n} rows; the encoder reads observation i from row i of such arguments."
            )
        self._shapes = {name: _observation_shape(site, frame.dim) for name, site in sites.items()}
        self._sites, self._inputs, self._data_dim = sites, inputs, frame.dim
        if "encoder" not in self._modules:
            dtype = next(iter(sites.values())).dtype
            data = [args[k] for k in inputs]
            self.encoder = _MLPEncoder(data, self._width(), self.hidden, self.init_scale, dtype)

    def _check_sites(self, sites: dict[str, LatentSite]) -> CondIndepStackFrame:
        """Checks that every latent site is continuous and local to the data plate; returns that plate."""
        if not sites:
            raise FreqviInputError("the model has no latent sites: AmortizedNormal has nothing to encode.")
        for site in sites.values():
            if site.support.is_discrete:
                raise FreqviInputError(
                    f"AmortizedNormal needs continuous latent sites; site {site.name!r} is discrete "
                    f"(support {site.support}). Use LocalMeanField (a categorical factor per observation) "
                    "or a guide that sums it out."
                )
            frames = {f.name: f for f in site.frames}
            if self.data_plate not in frames:
                raise FreqviInputError(
                    f"latent site {site.name!r} is outside the data plate {self.data_plate!r} (its plates: "
                    f"{sorted(frames)}); an encoder maps one observation's data to that observation's "
                    f"latents, so every latent site must sit inside pyro.plate({self.data_plate!r}, n). "
                    "Make a global quantity a pyro.param, or pass data_plate=... for a plate named otherwise."
                )
            subsampled = [f.name for f in site.frames
                          if f.name != self.data_plate and f.size < (f.full_size or f.size)]
            if subsampled:
                raise FreqviInputError(
                    f"latent site {site.name!r} sits in the subsampled plates {subsampled}; AmortizedNormal "
                    f"subsamples only the data plate {self.data_plate!r}."
                )
        return frames[self.data_plate]

    def _width(self) -> int:
        """``D``, the encoder's output width: the latent sites' entries per observation."""
        return sum(math.prod(shape) for shape in self._shapes.values())

    def _unflatten(self, columns: torch.Tensor, site: LatentSite) -> torch.Tensor:
        """``(batch, D_s)`` encoder columns -> the site's shape, with ``batch`` at the data plate's dim."""
        values = columns.reshape(columns.shape[0], *self._shapes[site.name])
        return values.movedim(0, len(site.batch_shape) + self._data_dim)

    def _encode(self, data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the encoder and checks that its output is ``(loc, scale)``, each ``(batch, D)``."""
        out = self.encoder(*data)
        expected = (data[0].shape[0], self._width())
        ok = isinstance(out, tuple | list) and len(out) == 2
        if not (ok and all(isinstance(t, torch.Tensor) and tuple(t.shape) == expected for t in out)):
            shapes = {name: tuple(shape) for name, shape in self._shapes.items()}
            raise FreqviInputError(
                f"the encoder must return a tuple (loc, scale) of two tensors of shape (batch, D) = "
                f"{expected}, D the latent sites' sizes per observation {shapes} added up; it returned "
                f"{_describe(out)}."
            )
        return out[0], out[1]


def _observation_shape(site: LatentSite, data_dim: int) -> torch.Size:
    """The site's shape on the unconstrained space, less the data plate's dimension ``data_dim``."""
    batch = list(site.batch_shape)
    del batch[data_dim]
    return torch.Size([*batch, *site.unconstrained_event_shape])


class _MLPEncoder(nn.Module):
    r"""``x_i -> (\mu(x_i), \sigma(x_i))``: an MLP on one observation's data, flattened and standardised.

    :param data: the plate-indexed data tensors of all ``n`` observations, for the
        standardisation and the input width.
    :param width: ``D``, the output width.
    """

    def __init__(self, data: list[torch.Tensor], width: int, hidden: tuple[int, ...], init_scale: float,
                 dtype: torch.dtype):
        super().__init__()
        flat = _flatten(data, dtype)
        shift, spread = _observed_moments(flat)
        self.register_buffer("shift", shift)
        # constant inputs (padding, an intercept column) are left unscaled
        self.register_buffer("spread", torch.where(spread > 0, spread, torch.ones_like(spread)))
        layers, size = [], flat.shape[1]
        for h in hidden:
            layers += [nn.Linear(size, h, dtype=dtype), nn.ReLU()]
            size = h
        self.body = nn.Sequential(*layers)
        self.loc = nn.Linear(size, width, dtype=dtype)
        self.scale = nn.Linear(size, width, dtype=dtype)
        with torch.no_grad():
            for head in (self.loc, self.scale):
                head.weight.zero_()
            self.loc.bias.zero_()
            self.scale.bias.fill_(_inverse_softplus(init_scale))

    def forward(self, *data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a missing cell (NaN, freqvi.with_missing) enters as its column's mean: any function of the
        # observed cells is a valid encoder
        h = self.body(((_flatten(data, self.shift.dtype) - self.shift) / self.spread).nan_to_num(0.0))
        return self.loc(h), softplus(self.scale(h)) + SCALE_FLOOR


def _observed_moments(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's mean and standard deviation (divisor ``m - 1``) over its ``m`` observed (non-NaN) cells.

    A column with no observed cell gets mean 0, one with fewer than two standard deviation 1.
    """
    seen = ~torch.isnan(flat)
    if seen.all():
        return flat.mean(0), flat.std(0) if len(flat) > 1 else torch.ones_like(flat[0])
    count = seen.sum(0)
    shift = torch.where(seen, flat, 0.0).sum(0) / count.clamp_min(1)
    squares = torch.where(seen, flat - shift, 0.0).square().sum(0)
    spread = torch.where(count > 1, squares / (count - 1).clamp_min(1), 1.0).sqrt()
    return shift, spread


def _flatten(data: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Each observation's data as one row: ``(batch, ...)`` tensors flattened and concatenated."""
    return torch.cat([x.reshape(x.shape[0], -1).to(dtype) for x in data], -1)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"one tensor of shape {tuple(out.shape)}"
    if isinstance(out, tuple | list):
        parts = [f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in out]
        return f"a {type(out).__name__} of {len(out)}: {parts}"
    return f"a {type(out).__name__}"
