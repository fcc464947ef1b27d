"""A diffusion model's training step: freqvi.fit against a plain PyTorch DDPM loop, same network, same start.

What it measures. Two configurations, T = 1000 (linear schedule), Adam ``lr=1e-3``,
minibatches of 256 (epochs of a random permutation):

* ``moons``: :func:`freqvi.datasets.load_moons` (2,000 x 2), the default
  :class:`~freqvi.models.TimeMLP` (hidden 128, 128, 128): a tiny network where fixed
  per-step overheads show most (target: ratio at most 1.5);
* ``digits``: :func:`freqvi.datasets.load_digits` scaled to ``[-1, 1]`` (1,500 x 64), hidden
  512, 512, 512 (target: at most 1.15).

Every row starts from the same initial weights (each builds its model after
``torch.manual_seed(0)``). Rows:

* ``torch``: a DDPM loop written here (Ho et al. 2020, algorithm 1): ``t ~ U{1..T}``,
  ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, loss ``mean ||eps - eps_theta(x_t, t)||^2``,
  one ``torch.optim.Adam`` over the denoiser's parameters;
* ``freqvi``: ``freqvi.fit(model, None, x, loss="time_subsampled", batch_size=256)``, the
  time-subsampled ELBO (one denoiser call per row, analytic KL, decoder and prior terms);
* ``freqvi-simple``: ``loss="simple"``, the same loss as the torch loop, through freqvi.

Seconds per step count the loop only (``FitResult.wall_time``; :func:`time.perf_counter`
around the torch loop), after a few untimed warm-up steps of the torch loop (fit's check of the
pair, which runs the whole chain once on one minibatch, warms freqvi's up). The ratio is freqvi's
step time over the torch loop's. The rows run interleaved, ``--repeats`` times, and the
median of each row's times is reported, as the machine is shared. Then the full-chain
:class:`~pyro.infer.Trace_ELBO` step (the literal hierarchical VAE, 2T sample sites) on moons
at T = 10 and T = 100, to show its cost growing with T.

Threads: ``--threads`` (default 1) sets torch's intra-op threads (see vae_vs_torch.py).

Run ``python benchmarks/diffusion_vs_torch.py`` (a few minutes), or ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

import freqvi
from freqvi.datasets import load_digits, load_moons
from freqvi.models import GaussianDiffusion

NUM_STEPS = 1000
BATCH_SIZE = 256
LR = 1e-3
WARMUP_STEPS = 5
CONFIGS = {"moons": ((128, 128, 128), 1.5), "digits": ((512, 512, 512), 1.15)}


def data(name: str) -> torch.Tensor:
    return load_moons() if name == "moons" else 2 * load_digits() - 1


def new_model(dim: int, hidden, num_steps: int = NUM_STEPS) -> GaussianDiffusion:
    """The benchmark's model, always with the same initial weights (and a fresh Pyro name)."""
    torch.manual_seed(0)
    return GaussianDiffusion(dim, num_steps, hidden=hidden)


def torch_loop(model: GaussianDiffusion, x: torch.Tensor, num_steps: int) -> float:
    """Trains ``model.denoiser`` in place by the DDPM loss; returns seconds per step."""
    net = model.denoiser
    abar = model.schedule.table(x.dtype).alphas_cumprod
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)

    def step(rows: torch.Tensor) -> None:
        x0 = x[rows]
        t = torch.randint(1, NUM_STEPS + 1, (len(rows),))
        eps = torch.randn_like(x0)
        a = abar[t].unsqueeze(-1)
        loss = (eps - net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    batches = epochs(len(x))
    for _ in range(WARMUP_STEPS):
        step(next(batches))
    start = time.perf_counter()
    for _ in range(num_steps):
        step(next(batches))
    return (time.perf_counter() - start) / num_steps


def epochs(n: int):
    while True:
        order = torch.randperm(n)
        for start in range(0, n - BATCH_SIZE + 1, BATCH_SIZE):
            yield order[start:start + BATCH_SIZE]


def freqvi_fit(model: GaussianDiffusion, x: torch.Tensor, num_steps: int, loss) -> float:
    """Trains ``model`` with :func:`freqvi.fit`; returns seconds per step of the loop.

    No separate warm-up: before its loop, fit checks the pair by running the whole chain once
    (T denoiser calls on all rows; untimed, and on digits with T = 1000 about 35 s of CPU).
    """
    options = {"lr": LR, "batch_size": BATCH_SIZE, "progress": False, "loss": loss}
    return freqvi.fit(model, x, num_steps=num_steps, **options).wall_time / num_steps


def compare(name: str, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each row on configuration ``name``."""
    hidden, _ = CONFIGS[name]
    x = data(name)
    rows = {"torch": lambda m: torch_loop(m, x, steps),
            "freqvi": lambda m: freqvi_fit(m, x, steps, "time_subsampled"),
            "freqvi-simple": lambda m: freqvi_fit(m, x, steps, "simple")}
    times: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(repeats):
        for row, train in rows.items():
            pyro.clear_param_store()
            times[row].append(train(new_model(x.shape[1], hidden)))
    return {row: statistics.median(t) for row, t in times.items()}


def full_chain_step(num_steps: int, steps: int) -> float:
    """Seconds per :class:`~pyro.infer.Trace_ELBO` step on moons with a T-step chain."""
    pyro.clear_param_store()
    x = load_moons()
    model = new_model(2, CONFIGS["moons"][0], num_steps)
    options = {"lr": LR, "batch_size": BATCH_SIZE, "progress": False, "loss": "trace"}
    freqvi.fit(model, x, num_steps=2, **options)
    return freqvi.fit(model, x, num_steps=steps, **options).wall_time / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed training steps per row and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="30 steps, one repeat: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, repeats = (30, 1) if args.quick else (args.steps, args.repeats)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), pyro {pyro.__version__}; "
          f"T = {NUM_STEPS}, batch {BATCH_SIZE}, Adam lr {LR}, {steps} steps x {repeats} repeats")
    header = f"{'data':<8} {'method':<14} {'ms/step':>9} {'ratio':>7}"
    print(header + "\n" + "-" * len(header))
    verdicts = []
    for name, (_, target) in CONFIGS.items():
        rows = compare(name, steps, repeats)
        for row, seconds in rows.items():
            print(f"{name:<8} {row:<14} {1e3 * seconds:>9.3f} {seconds / rows['torch']:>7.2f}")
        ratio = rows["freqvi"] / rows["torch"]
        verdicts.append(f"{name}: freqvi step <= {target} x torch step: "
                        f"{'PASS' if ratio <= target else 'FAIL'} ({ratio:.2f})")
    print("\n" + "\n".join(verdicts))
    print("\nfull-chain Trace_ELBO step on moons (2T sample sites, T denoiser calls):")
    for num_steps in (10, 100):
        seconds = full_chain_step(num_steps, max(3, steps // 10))
        print(f"  T = {num_steps:<4} {1e3 * seconds:9.2f} ms/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
