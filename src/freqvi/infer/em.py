"""``em``: the EM algorithm as alternating steps on one model/guide pair."""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from tqdm.auto import tqdm

from freqvi.errors import ConvergenceWarning, FreqviError, FreqviInputError
from freqvi.estimators import QFunctionELBO
from freqvi.handlers import FrozenPosterior
from freqvi.infer.batches import BatchSource, StreamedBatches, make_batches
from freqvi.infer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, stable_name
from freqvi.infer.devices import move_to, on_device, resolve_device
from freqvi.infer.pair import Pair, resolve_pair
from freqvi.infer.run_state import deferred_interrupts
from freqvi.infer.vectorize import check_particles
from freqvi.models.base import ClosedFormMStep
from freqvi.traces import (
    check_pair,
    is_enumerated,
    latent_sites,
    max_plate_nesting,
    param_names,
    unconstrained_params,
)
from freqvi.validation import check_choice, check_positive_float, check_positive_int

M_STEPS = ("auto", "closed_form", "gradient")


@dataclass
class EMResult:
    """What :func:`em` returns.

    :ivar log_likelihood: the objective after each E-step, starting at the initial
        parameters: :math:`\\mathrm{ELBO}(q_t, \\theta_t)`. With the exact posterior as
        guide this *is* the log-likelihood :math:`\\ell(\\theta_t)` (the bound is
        tight); with a variational guide it is a lower bound on it.
    :ivar num_iter: EM iterations (epochs, for online EM) taken.
    :ivar converged: whether the tolerance was met before ``max_iter``.
    :ivar wall_time: seconds spent.
    :ivar m_step: ``"closed_form"`` or ``"gradient"``, the M-step that ran.
    """

    log_likelihood: list[float] = field(default_factory=list)
    num_iter: int = 0
    converged: bool = False
    wall_time: float = 0.0
    m_step: str = ""


def em(
    model,
    data,
    guide=None,
    *,
    m_step: str = "auto",
    max_iter: int = 1000,
    tol: float = 1e-5,
    batch_size: int | None = None,
    step_size: float | Callable[[int], float] = 0.6,
    m_step_lr: float = 0.05,
    m_step_iters: int = 100,
    m_step_tol: float = 1e-7,
    e_step_iters: int = 50,
    e_step_lr: float | None = None,
    num_particles: int = 16,
    data_plate_name: str = "data",
    seed: int | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: str | os.PathLike | None = None,
    num_observations: int | None = None,
    device: str | torch.device | None = None,
) -> EMResult:
    r"""Expectation-maximisation driven by a model/guide pair.

    Each iteration:

    * **E-step**: the guide is run at the current :math:`\theta'` and its
      distributions are recorded without gradient, :math:`q(z) = q(z \mid x;
      \theta')`. A guide with free local parameters (variational EM) first has
      them fitted for ``e_step_iters`` Adam steps on the ELBO, :math:`\theta`
      held fixed.
    * **M-step**: maximise :math:`Q(\theta \mid \theta') = \sum_i
      \mathbb{E}_q \log p(x_i, z_i; \theta)` with ``q`` frozen:

      - ``"closed_form"``: the model's :class:`~freqvi.models.ClosedFormMStep`
        maps expected sufficient statistics of ``q`` to :math:`\theta`;
      - ``"gradient"``: Adam on :class:`~freqvi.estimators.QFunctionELBO` until
        the relative change of Q is below ``m_step_tol`` or ``m_step_iters``;
        the best parameters seen are kept, so Q does not decrease
        (generalised EM).

      ``"auto"`` takes the closed form when the model offers one.

    The objective recorded after each E-step is :math:`\mathrm{ELBO}(q, \theta')`,
    exact over enumerated sites and a one-draw estimate over others; for the
    exact posterior it equals :math:`\ell(\theta')` with no Monte-Carlo error
    (a freqvi model's exact guide returns it), and EM's ascent property makes it
    non-decreasing. Iteration stops when it changes by less than ``tol`` nats per
    observation, the convention of scikit-learn's ``GaussianMixture`` (whose
    default is 1e-3): a change far below the sampling error of
    :math:`\hat\ell / n`, which is of order :math:`n^{-1/2}`.

    With ``batch_size`` (closed-form M-step only) this is online EM (Cappe and
    Moulines 2009): each minibatch's statistics are blended into running ones,
    :math:`s_t = (1 - \gamma_t) s_{t-1} + \gamma_t \hat s_t`, with
    :math:`\gamma_1 = 1` and :math:`\gamma_t = t^{-\kappa}` for ``step_size=kappa``
    (or ``step_size(t)`` if callable); one iteration is one pass over the data.
    Data larger than memory come as an iterable of batches (a ``DataLoader``,
    :class:`freqvi.datasets.NpyBatches`): online EM over them, one pass an iteration, the
    recorded objective summed over a second pass at the iteration's parameters.

    :param model: a freqvi model, a ``(model, guide)`` tuple, or a model callable
        with ``guide=...``. User-written pairs work: the guide is the E-step.
    :param data: one array or a tuple of arrays passed to model and guide, or an
        iterable of batches (then the model is initialised from the first batch).
    :param num_observations: with batches, the number of observations behind them
        (default ``data.num_observations`` or ``len(data.dataset)``).
    :param device: ``"cpu"``, ``"cuda"`` or a :class:`torch.device` to run on.
    :param e_step_iters: Adam steps on the local parameters per E-step (variational EM).
    :param e_step_lr: their learning rate. By default 0.1 when the guide's latent sites are all
        enumerated (the E-step's gradient is then exact) and 0.01 when any is drawn: a
        one-draw gradient keeps the local parameters jittering by about the learning rate,
        and with 0.1 a Poisson log-normal model (500 counts, the README's) stalled 50 nats
        below the bound that 0.01 reached in 50 iterations, while categorical factors of a
        mixture on iris need 0.1 (-184.5 after 30 iterations, -322.7 with 0.01).
    :param num_particles: draws per estimate of Q (gradient M-step) and of the recorded
        objective, for non-enumerated sites.
    :param seed: seeds Python's, NumPy's and torch's generators first.
    :param checkpoint: a file to write the run's state to every ``checkpoint_every``
        iterations, at the end and on Ctrl-C or SIGTERM (the iteration finishes,
        the checkpoint is written, then ``KeyboardInterrupt`` is raised), atomically.
    :param resume: a checkpoint to continue from, with the model built as for the
        run that wrote it; the result equals an uninterrupted run's, bit for bit on CPU.

    An iteration whose objective is not finite is undone (the parameters go back
    to the previous iteration's) before the error is raised.
    """
    check_choice(m_step, "m_step", M_STEPS)
    max_iter = check_positive_int(max_iter, "max_iter")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    tol = check_positive_float(tol, "tol", allow_zero=True)
    device = resolve_device(device)
    batches = make_batches(data, batch_size, data_plate_name, num_observations, device)
    pair = resolve_pair(model, guide)
    m_step = _choose_m_step(m_step, pair)
    online = batch_size is not None or isinstance(batches, StreamedBatches)
    if online:
        _check_online(m_step)
    if checkpoint is not None or resume is not None:
        _check_resumable(batches)
    move_to(device, pair.model, pair.guide)
    if seed is not None:
        pyro.set_rng_seed(seed)
    with on_device(device):
        model_trace, guide_trace = check_pair(pair.model, pair.guide, batches.first())
    if online:
        batches.check_plate(model_trace, pair.guide)
    enumerated = all(is_enumerated(site) for site in latent_sites(guide_trace).values())
    if enumerated:
        num_particles = 1  # Q is computed exactly by enumeration: more draws would repeat it
    if e_step_lr is None:
        e_step_lr = 0.1 if enumerated else 0.01
    e_step_lr = check_positive_float(e_step_lr, "e_step_lr")
    step = _EMStep(pair, batches, m_step, model_trace, guide_trace,
                   m_step_lr, m_step_iters, m_step_tol, e_step_iters, e_step_lr, num_particles)
    if not step.exact or m_step == "gradient":  # Q and the objective draw particles at once
        with on_device(device):
            check_particles(pair.model, pair.guide, batches.first(), num_particles,
                            max_plate_nesting(model_trace, guide_trace), "em")
    tol = tol * batches.n  # per observation -> total

    result = EMResult(m_step=m_step)
    start = time.perf_counter()
    # Distribution arguments were validated by check_pair; re-checking them each iteration
    # (Pyro's default) costs a third of an EM iteration on a mixture.
    with pyro.validation_enabled(False), deferred_interrupts() as interrupted, on_device(device):
        if resume is None:
            posterior, value = step.evaluate()
            result.log_likelihood.append(value)
        else:
            step.restore(resume, result)
            with torch.random.fork_rng():  # the recorded distributions, without drawing on the generators
                posterior = None if online else step.e_step(batches.first(), draw_local=False)
        first = result.num_iter + 1
        bar = tqdm(range(first, max_iter + 1), initial=first - 1, total=max_iter, disable=not progress,
                   desc="em", unit="iter")
        for it in bar:
            good = step.snapshot()
            if online:
                step.online_epoch(step_size)
            else:
                step.m_step(posterior, batches.first())
            posterior, value = step.evaluate()
            if not math.isfinite(value):
                step.load_snapshot(good)
                raise FreqviError(f"iteration {it}: the objective is {value}; the fit diverged. The "
                                  "parameters are those of the previous iteration.")
            previous = result.log_likelihood[-1]
            result.log_likelihood.append(value)
            result.num_iter = it
            bar.set_postfix(loglik=f"{value:.6g}")
            result.converged = abs(value - previous) <= tol
            if checkpoint is not None and (it % checkpoint_every == 0 or result.converged
                                           or it == max_iter or interrupted()):
                step.save(checkpoint, result)
            if interrupted():
                raise KeyboardInterrupt(f"em interrupted after iteration {it}"
                                        + (f"; checkpoint in {str(checkpoint)!r}" if checkpoint else ""))
            if result.converged:
                break
    bar.close()
    result.wall_time = time.perf_counter() - start
    if not result.converged:
        warnings.warn(
            f"EM stopped at max_iter={max_iter} before the change per observation fell below "
            f"tol={tol / batches.n:g}; "
            "raise max_iter or tol.",
            ConvergenceWarning,
            stacklevel=2,
        )
    return result


def _choose_m_step(m_step: str, pair: Pair) -> str:
    closed = isinstance(pair.owner, ClosedFormMStep)
    if m_step == "closed_form" and not closed:
        raise FreqviInputError(
            "m_step='closed_form' needs a model with expected_statistics() and maximize() "
            "(see freqvi.models.ClosedFormMStep); use m_step='gradient' for this model."
        )
    if m_step == "auto":
        return "closed_form" if closed else "gradient"
    return m_step


def _check_online(m_step: str) -> None:
    if m_step != "closed_form":
        raise FreqviInputError(
            "batch_size or batched data (online EM) need a closed-form M-step; for minibatch gradient "
            "fitting use freqvi.fit(model, guide, data, batch_size=...)."
        )


def _check_resumable(batches: BatchSource) -> None:
    reason = batches.resumable()
    if reason is not None:
        raise FreqviInputError(f"checkpoint/resume: {reason}.")


class _EMStep:
    """The E-step, M-step and objective of one :func:`em` run."""

    def __init__(self, pair: Pair, batches: BatchSource, m_step, model_trace, guide_trace, m_lr, m_iters,
                 m_tol, e_iters, e_lr, num_particles):
        self.pair, self.batches, self.kind = pair, batches, m_step
        plate_nesting = max_plate_nesting(model_trace, guide_trace)
        self.elbo = TraceEnum_ELBO(max_plate_nesting=plate_nesting, strict_enumeration_warning=False)
        # The recorded objective averages num_particles draws over non-enumerated sites, so that
        # its Monte-Carlo noise does not swamp the tolerance; the E-step's gradients take one.
        self.objective_elbo = TraceEnum_ELBO(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=plate_nesting,
            strict_enumeration_warning=False)
        # The guide's latent sites marked for enumeration are recorded with their support
        # rather than a draw: the E-step needs their distributions, not samples.
        self.enum = poutine.enum(first_available_dim=-1 - plate_nesting)
        owner = pair.owner
        self.exact = owner is not None and pair.guide == owner.guide and owner.exact_guide
        model_names = param_names(model_trace)
        local_names = param_names(guide_trace) - model_names
        self.names = sorted(model_names | local_names, key=stable_name)
        self.params = unconstrained_params(self.names)
        self.local = unconstrained_params(local_names)
        self.e_optim = torch.optim.Adam(self.local, lr=e_lr) if self.local else None
        self.e_iters = e_iters
        self.m_iters, self.m_tol = m_iters, m_tol
        self.statistics = None
        self.t = 0
        if m_step == "gradient":
            self.theta = unconstrained_params(model_names)
            self.m_lr = m_lr
            self.q = QFunctionELBO(num_particles=num_particles, max_plate_nesting=plate_nesting)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load_snapshot(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)

    def save(self, path, result: EMResult) -> None:
        """Writes the parameters, local optimiser, online statistics, history and generators."""
        state = {"params": dict(zip(map(stable_name, self.names), self.snapshot(), strict=True)),
                 "e_optim": self.e_optim.state_dict() if self.e_optim else {},
                 "statistics": self.statistics or {}, "t": self.t, "rng": rng_state(),
                 "batches": self.batches.state(),
                 "history": {"log_likelihood": list(result.log_likelihood), "num_iter": result.num_iter}}
        save_checkpoint(path, state, {"kind": "em", "m_step": self.kind,
                                      "params": [stable_name(n) for n in self.names]})

    def restore(self, path, result: EMResult) -> None:
        state, metadata = load_checkpoint(path)
        names = [stable_name(n) for n in self.names]
        if metadata.get("kind") != "em" or metadata.get("m_step") != self.kind or metadata["params"] != names:
            raise FreqviInputError(
                f"checkpoint {str(path)!r} was written by a different run ({metadata.get('kind')}, "
                f"m_step {metadata.get('m_step')!r}, parameters {metadata.get('params')}); this one has "
                f"m_step {self.kind!r} and parameters {names}."
            )
        self.load_snapshot([state["params"][n] for n in names])
        if self.e_optim:
            self.e_optim.load_state_dict(state["e_optim"])
        self.statistics, self.t = state["statistics"] or None, state["t"]
        self.batches.load(state["batches"])
        result.log_likelihood[:] = state["history"]["log_likelihood"]
        result.num_iter = state["history"]["num_iter"]
        set_rng_state(state["rng"])

    def e_step(self, data, handler=None, draw_local: bool = True):
        """Records the guide's distributions on ``data`` at theta (local parameters fitted first)."""
        handler = handler or nullcontext()
        if self.local and draw_local:
            for _ in range(self.e_iters):
                with handler:
                    loss = self.elbo.differentiable_loss(self.pair.model, self.pair.guide, *data)
                _descend(self.e_optim, self.local, loss)
        with torch.no_grad(), poutine.block(), handler:
            return poutine.trace(self.enum(self.pair.guide)).get_trace(*data)

    def evaluate(self) -> tuple:
        """The E-step and the objective over every observation.

        The objective is summed over the parts of the data's evaluation pass (one part,
        all rows, for data in memory); the posterior returned is the last part's.
        """
        total = 0.0
        for data in self.batches.evaluation_pass():
            posterior = self.e_step(data)
            total += self.objective(posterior, data)
        return posterior, total

    def objective(self, posterior, data) -> float:
        """ELBO(q, theta) with q the recorded posterior: log-likelihood when q is exact.

        When the guide is a freqvi model's own exact posterior, the bound is tight and
        equals the posterior's normaliser, which that guide returns: no second pass.
        """
        if self.exact:
            return float(posterior.nodes["_RETURN"]["value"].double().sum())
        frozen = FrozenPosterior(posterior)(self.pair.guide)
        with torch.no_grad():
            return -self.objective_elbo.loss(self.pair.model, frozen, *data)

    def m_step(self, posterior, data) -> None:
        if self.kind == "closed_form":
            self.pair.owner.maximize(self.pair.owner.expected_statistics(posterior, *data))
            return
        frozen = FrozenPosterior(posterior)(self.pair.guide)
        optimizer = torch.optim.Adam(self.theta, lr=self.m_lr)
        best, best_theta, previous = float("inf"), None, None
        for _ in range(self.m_iters):
            loss = self.q.differentiable_loss(self.pair.model, frozen, *data)
            value = loss.item()
            if value < best:  # -Q at the parameters before this step
                best, best_theta = value, [p.detach().clone() for p in self.theta]
            if previous is not None and abs(previous - value) <= self.m_tol * abs(value):
                break
            previous = value
            _descend(optimizer, self.theta, loss)
        # Keep the best parameters seen, so Q never decreases (generalised EM's ascent).
        with torch.no_grad():
            for p, b in zip(self.theta, best_theta, strict=True):
                p.copy_(b)

    def online_epoch(self, step_size) -> None:
        """One pass of online EM over the batches (a random permutation of data in memory)."""
        owner = self.pair.owner
        for batch in self.batches.epoch():
            stats = owner.expected_statistics(self.e_step(batch.data, batch.handler), *batch.data)
            self.t += 1
            gamma = 1.0 if self.t == 1 else _gamma(step_size, self.t)
            if self.statistics is None:
                self.statistics = stats
            else:  # a model whose statistics are not all plain averages says how to blend them
                blend = getattr(owner, "blend_statistics", _blend_linearly)
                self.statistics = blend(self.statistics, stats, gamma)
            owner.maximize(self.statistics)


def _blend_linearly(old: dict, new: dict, gamma: float) -> dict:
    return {k: (1 - gamma) * old[k] + gamma * new[k] for k in new}


def _gamma(step_size, t: int) -> float:
    return float(step_size(t)) if callable(step_size) else t ** -float(step_size)


def _descend(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], loss) -> None:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
