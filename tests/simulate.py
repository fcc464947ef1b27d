"""Data simulated from known parameters, shared by the tests."""

import torch


def mixture_data(n=600, dtype=torch.float64, seed=1):
    """Three well-separated 2-D Gaussian clusters with full covariances."""
    g = torch.Generator().manual_seed(seed)
    locs = torch.tensor([[0.0, 0.0], [4.0, 1.0], [1.0, 5.0]])
    trils = torch.tensor([[[1.0, 0.0], [0.5, 0.8]], [[0.7, 0.0], [-0.3, 1.2]], [[1.1, 0.0], [0.0, 0.5]]])
    z = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g)
    eps = torch.randn(n, 2, generator=g)
    x = locs[z] + (trils[z] @ eps.unsqueeze(-1)).squeeze(-1)
    return x.to(dtype)


def factor_data(n=500, d=5, q=2, dtype=torch.float64, seed=2, isotropic=False):
    """Observations from x = mu + W z + eps with known W, psi."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, q, generator=g)
    mu = torch.randn(d, generator=g)
    psi = torch.full((d,), 0.3) if isotropic else 0.2 + torch.rand(d, generator=g)
    z = torch.randn(n, q, generator=g)
    x = mu + z @ w.T + psi.sqrt() * torch.randn(n, d, generator=g)
    return x.to(dtype)


def grouped_logistic_data(m=200, n=10, beta=(-0.5, 1.0), sigma=1.0, ragged=False, dtype=torch.float64,
                          seed=4):
    """Flat ``(X, y, groups)`` from the random-intercept logistic model.

    ``X`` is an intercept column then standard normal covariates; ``m`` groups of
    ``n`` observations, or of sizes drawn uniformly from ``1..2n-1`` if ``ragged``.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 2 * n, (m,), generator=g) if ragged else torch.full((m,), n)
    groups = torch.repeat_interleave(torch.arange(m), sizes)
    covariates = torch.randn(len(groups), len(beta) - 1, generator=g, dtype=torch.float64)
    X = torch.cat([torch.ones(len(groups), 1, dtype=torch.float64), covariates], 1)
    u = sigma * torch.randn(m, generator=g, dtype=torch.float64)
    logits = X @ torch.tensor(beta, dtype=torch.float64) + u[groups]
    y = torch.bernoulli(torch.sigmoid(logits), generator=g)
    return X.to(dtype), y.to(dtype), groups
