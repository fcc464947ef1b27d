"""Pictures of a fitted VAE, written to PNG files.

Figures are built with :class:`matplotlib.figure.Figure` and saved by its Agg
canvas: no display is needed and pyplot's global state (and backend) is untouched.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from freqvi.errors import FreqviInputError


def image_grid(images: torch.Tensor, path: str | Path, *, image_shape: tuple[int, int] = (8, 8),
               columns: int = 10, title: str | None = None) -> Path:
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


def reconstructions(model, x: torch.Tensor, path: str | Path, *, num_images: int = 10,
                    image_shape: tuple[int, int] = (8, 8)) -> Path:
    """Pairs of rows: ``num_images`` observations above the model's reconstructions of them.

    ``model`` needs ``reconstruct(x)`` (e.g. :meth:`freqvi.models.VAE.reconstruct`).
    """
    x = x[:num_images]
    grid = torch.cat([x, model.reconstruct(x).to(x.dtype)])
    return image_grid(grid, path, image_shape=image_shape, columns=len(x),
                      title="data (top) and reconstructions (bottom)")


def samples(model, path: str | Path, *, num_images: int = 50, image_shape: tuple[int, int] = (8, 8)) -> Path:
    """``num_images`` images from the model: the means of :math:`p(x \\mid z)`, :math:`z \\sim p(z)`."""
    return image_grid(model.sample(num_images), path, image_shape=image_shape, columns=10,
                      title="samples from the model (decoder means)")


def latent_scatter(model, x: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
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


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path
