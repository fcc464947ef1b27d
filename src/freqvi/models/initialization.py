"""Default starting values computed from data."""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, num_iters: int = 10) -> torch.Tensor:
    """Hard cluster labels from k-means++ seeding followed by Lloyd iterations.

    Seeding (Arthur and Vassilvitskii 2007) draws the first centre uniformly and
    each next one with probability proportional to the squared distance to the
    nearest centre chosen so far; draws use torch's global generator, so
    ``pyro.set_rng_seed`` makes them reproducible.

    :param x: data of shape ``(n, d)``.
    :param k: number of clusters, ``1 <= k <= n``.
    :returns: labels of shape ``(n,)`` with values in ``0..k-1``.
    """
    n = x.shape[0]
    centres = x[torch.randint(n, ())].unsqueeze(0).clone()  # a 0-d index gives a view; Lloyd writes here
    d2 = torch.cdist(x, centres).squeeze(-1).square()
    for _ in range(1, k):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        new = x[torch.multinomial(weights, 1)]
        centres = torch.cat([centres, new])
        d2 = torch.minimum(d2, torch.cdist(x, new).squeeze(-1).square())
    labels = torch.cdist(x, centres).argmin(-1)
    for _ in range(num_iters):
        one_hot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        counts = one_hot.sum(0)
        filled = counts > 0
        centres[filled] = (one_hot.T @ x)[filled] / counts[filled, None]
        new_labels = torch.cdist(x, centres).argmin(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels
