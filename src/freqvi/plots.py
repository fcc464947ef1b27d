"""Pictures of fitted models (a VAE, a diffusion model): PNG files, or figures to show.

Each function writes a PNG file to ``path`` and returns the path, or, without ``path``,
returns the :class:`matplotlib.figure.Figure` (a notebook shows it; ``fig.axes`` can be
restyled). Figures are built without pyplot and saved by the Agg canvas: no display is
needed and pyplot's global state (and backend) is untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from freqvi.errors import FreqviInputError


def image_grid(images: torch.Tensor, path: str | Path | None = None, *,
               image_shape: tuple[int, int] = (8, 8), columns: int = 10,
               title: str | None = None) -> Path | Figure:
    """Draws ``images`` ``(n, h * w)`` as a grid of ``h x w`` grey images, ``columns`` per row.

    Intensities are shown on ``[0, 1]`` (clipped), white for 0 as on paper.
    """
    images = torch.as_tensor(images).detach().cpu().float()
    h, w = image_shape
    if images.dim() != 2 or images.shape[1] != h * w:
        raise FreqviInputError(f"images must have shape (n, {h * w}) for {h}x{w} images; "
                               f"got {tuple(images.shape)}.")
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(columns * 0.8, rows * 0.8 + (0.4 if title else 0)))
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k < len(images):
            ax.imshow(images[k].reshape(h, w).clamp(0, 1).numpy(), cmap="Greys", vmin=0, vmax=1)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def reconstructions(model, x: torch.Tensor, path: str | Path | None = None, *, num_images: int = 10,
                    image_shape: tuple[int, int] = (8, 8)) -> Path | Figure:
    """Pairs of rows: ``num_images`` observations above the model's reconstructions of them.

    ``model`` needs ``reconstruct(x)`` (e.g. :meth:`freqvi.models.VAE.reconstruct`).
    """
    x = x[:num_images]
    grid = torch.cat([x, model.reconstruct(x).to(x.dtype)])
    return image_grid(grid, path, image_shape=image_shape, columns=len(x),
                      title="data (top) and reconstructions (bottom)")


def samples(model, path: str | Path | None = None, *, num_images: int = 50,
            image_shape: tuple[int, int] = (8, 8)) -> Path | Figure:
    """``num_images`` images from the model: the means of :math:`p(x \\mid z)`, :math:`z \\sim p(z)`."""
    return image_grid(model.sample(num_images), path, image_shape=image_shape, columns=10,
                      title="samples from the model (decoder means)")


def latent_scatter(model, x: torch.Tensor, path: str | Path | None = None,
                   labels: torch.Tensor | None = None) -> Path | Figure:
    """The encoder's means :math:`\\mu_\\phi(x_i)` in a 2-D latent space, coloured by ``labels``."""
    loc, _ = model.encode(x)
    if loc.shape[1] != 2:
        raise FreqviInputError(f"the latent scatter needs latent_dim = 2; this model has {loc.shape[1]}.")
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    points = ax.scatter(loc[:, 0].numpy(), loc[:, 1].numpy(), s=8, cmap="tab10",
                        c=None if labels is None else torch.as_tensor(labels).numpy())
    if labels is not None:
        fig.colorbar(points, ax=ax, label="label")
    ax.set(xlabel="$z_1$", ylabel="$z_2$", title="encoder means of the data")
    return _save(fig, path)


NOISING_STEPS = (0, 10, 50, 100, 250, 500, 1000)


def forward_noising(model, x: torch.Tensor, path: str | Path | None = None, *,
                    steps: tuple[int, ...] = NOISING_STEPS, image_shape: tuple[int, int] = (8, 8),
                    seed: int = 0) -> Path | Figure:
    r"""The forward chain on a batch: :math:`x_t \sim q(x_t \mid x_0)` at each of ``steps`` (those <= T).

    2-D data: one scatter per ``t``, on common square axes that hold every point. Images (``h * w``
    columns, values in ``[-1, 1]``): one row of up to 10 images per ``t``. ``model`` needs
    ``q_sample(x0, t, eps)`` and ``num_steps`` (:class:`~freqvi.models.GaussianDiffusion`); one noise
    draw ``eps`` serves every ``t``.
    """
    steps = [t for t in steps if t <= model.num_steps] or [model.num_steps]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    noised = [model.q_sample(x, t, eps) for t in steps]
    if x.shape[1] != 2:
        grid = torch.cat([(n[:10] + 1) / 2 for n in noised])
        return image_grid(grid, path, image_shape=image_shape, columns=min(10, len(x)),
                          title=f"forward noising, one row per t in {steps}")
    # one square frame for every panel, wide enough that no point (nor its marker) falls outside it
    reach = 1.05 * max(float(points.abs().max()) for points in noised)
    fig = Figure(figsize=(2.4 * len(steps), 2.9))
    axes = fig.subplots(1, len(steps), squeeze=False, sharex=True, sharey=True)[0]
    for ax, t, points in zip(axes, steps, noised, strict=True):
        ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=2)
        ax.set(title=f"t = {t}", xlim=(-reach, reach), ylim=(-reach, reach), aspect="equal", xlabel="$x_1$")
    axes[0].set_ylabel("$x_2$")
    return _save(fig, path)


def samples_vs_data(samples: torch.Tensor, data: torch.Tensor,
                    path: str | Path | None = None) -> Path | Figure:
    """Model draws and data points side by side, 2-D scatters on common axes."""
    samples, data = torch.as_tensor(samples).detach().cpu(), torch.as_tensor(data).detach().cpu()
    if samples.dim() != 2 or samples.shape[1] != 2 or data.dim() != 2 or data.shape[1] != 2:
        raise FreqviInputError(f"the scatter needs 2-D points; got {tuple(samples.shape)} and "
                               f"{tuple(data.shape)}.")
    fig = Figure(figsize=(9, 4.5))
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    for ax, points, title in ((axes[0], data, "held-out data"), (axes[1], samples, "model samples")):
        ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=3)
        ax.set(title=f"{title} (n = {len(points)})", aspect="equal", xlabel="$x_1$")
    axes[0].set_ylabel("$x_2$")
    return _save(fig, path)


def _save(fig: Figure, path: str | Path | None) -> Path | Figure:
    """``fig`` written to ``path`` (the path returned), or ``fig`` itself without a path."""
    if path is None:
        return fig
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
