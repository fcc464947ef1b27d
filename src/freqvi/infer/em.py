"""``em``: the EM algorithm as alternating steps on one model/guide pair."""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from tqdm.auto import tqdm

from freqvi.errors import ConvergenceWarning, FitInterruptedWarning, FreqviError, FreqviInputError
from freqvi.handlers import FrozenPosterior
from freqvi.infer.batches import BatchSource, InMemoryBatches, StreamedBatches, make_batches
from freqvi.infer.checkpoint import (
    check_checkpoint_path,
    checkpoint_lock,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    stable_name,
)
from freqvi.infer.devices import move_to, on_device, resolve_device
from freqvi.infer.information import BoundaryWarning
from freqvi.infer.mean_field_cavi import MeanFieldTables, cavi_applies
from freqvi.infer.pair import Pair, resolve_pair
from freqvi.infer.run_state import deferred_interrupts
from freqvi.infer.threads import thread_policy
from freqvi.infer.vectorize import check_particles
from freqvi.models.base import ClosedFormEStep, ClosedFormMStep
from freqvi.traces import (
    check_model,
    check_pair,
    is_enumerated,
    latent_sites,
    max_plate_nesting,
    param_names,
    unconstrained_params,
)
from freqvi.validation import check_choice, check_positive_float, check_positive_int, check_seed

M_STEPS = ("auto", "closed_form", "gradient")


@dataclass
class EMResult:
    """What :func:`em` returns.

    :ivar log_likelihood: the objective after each E-step, starting at the initial
        parameters: :math:`\\mathrm{ELBO}(q_t, \\theta_t)`. With the exact posterior as
        guide this *is* the log-likelihood :math:`\\ell(\\theta_t)` (the bound is
        tight); with a variational guide it is a lower bound on it.
    :ivar num_iter: EM iterations (epochs, for online EM) taken.
    :ivar converged: whether the run stopped at a stationary point to the stated tolerances
        (see ``stop_reason``).
    :ivar stop_reason: why the run stopped: ``"tolerance"`` (the objective changed by at most
        ``tol`` nats per observation and, for a gradient M-step, the M-step converged and the
        score was at most ``score_tol`` per observation), ``"no_ascent"`` (no parameters the
        M-step found raised the objective: converged if the score was within ``score_tol``),
        ``"max_iter"`` or ``"interrupted"`` (Ctrl-C).
    :ivar score: for a gradient M-step, the largest absolute entry of the gradient of the
        objective in the unconstrained model parameters at the last parameters, in nats
        (a total over observations), when the stop rule evaluated it; else ``None``.
    :ivar wall_time: seconds spent.
    :ivar m_step: ``"closed_form"`` or ``"gradient"``, the M-step that ran.
    :ivar interrupted: whether Ctrl-C ended the run (``stop_reason == "interrupted"``).
    """

    log_likelihood: list[float] = field(default_factory=list)
    num_iter: int = 0
    converged: bool = False
    stop_reason: str = ""
    score: float | None = None
    wall_time: float = 0.0
    m_step: str = ""
    interrupted: bool = False

    def __repr__(self) -> str:
        """Two lines: iterations, M-step, time, convergence; the first and last objective."""
        state = "converged" if self.converged else "not converged"
        lines = [f"EMResult: {self.num_iter} iterations ({self.m_step} M-step) in {self.wall_time:.2f} s, "
                 f"{state} ({self.stop_reason or 'not run'})"]
        if self.log_likelihood:
            lines.append(f"  objective {self.log_likelihood[-1]:.6g} nats (from {self.log_likelihood[0]:.6g})"
                         + (f"; largest score entry {self.score:.2g}" if self.score is not None else ""))
        return "\n".join(lines)


@thread_policy
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
    score_tol: float = 1e-5,
    m_step_lr: float = 1.0,
    m_step_iters: int = 100,
    m_step_tol: float = 1e-9,
    e_step_iters: int = 50,
    e_step_lr: float = 1.0,
    num_particles: int = 128,
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

    * **M-step**: maximise :math:`Q(\theta \mid \theta') = \sum_i
      \mathbb{E}_q \log p(x_i, z_i; \theta)` with ``q`` the E-step's posterior, frozen:

      - ``"closed_form"``: the model's :class:`~freqvi.models.ClosedFormMStep`
        maps expected sufficient statistics of ``q`` to :math:`\theta`;
      - ``"gradient"``: L-BFGS (strong Wolfe line search) on the estimate of Q drawn with
        the run's common random numbers (below), an inexact M-step (generalised EM): it
        stops when its gradient is a hundred times below the last M-step's starting one
        (at least ``score_tol / 10`` per observation: the stop tests the score itself),
        when its change is below ``m_step_tol``, or after ``m_step_iters`` iterations.
        The step is accepted only if the objective rises (Dempster, Laird and Rubin 1977):
        with a variational guide a rise of the Q estimate is a rise of the objective, as
        both use the same draws; with an exact guide and drawn latents the Q estimate is
        not a minorant of :math:`\ell`, and when its maximiser lowers :math:`\ell`,
        L-BFGS ascends the objective itself from :math:`\theta'` instead (over
        :math:`\theta` and the guide's local parameters together); if that fails too the
        parameters stay and the run stops (``stop_reason="no_ascent"``). After an iteration
        that changed the objective by less than ``tol`` away from a stationary point (EM
        crawling, at the rate of the fraction of missing information) that direct ascent
        goes first: a quasi-Newton acceleration of EM (Jamshidian and Jennrich 1997).

      ``"auto"`` takes the closed form when the model offers one.
    * **E-step**: the guide is run at the new :math:`\theta` and its distributions are
      recorded without gradient, :math:`q(z) = q(z \mid x; \theta)`. A guide with free
      local parameters (variational EM) first has them fitted, :math:`\theta` held fixed,
      warm-started from the previous E-step's values: the categorical factors of a
      :class:`~freqvi.guides.LocalMeanField` by coordinate-ascent (CAVI) sweeps, one
      gradient updating every factor (the exact E-step when each observation has one
      discrete site, as in a mixture), then all local parameters by L-BFGS on the
      objective below. Both stop when the gradient is below a tenth of the last M-step's
      starting score (at least ``score_tol``) per observation, the change below
      ``m_step_tol``, or after ``e_step_iters`` iterations. When every local parameter is a
      categorical factor's logits and the model sums no latent out itself (a
      :class:`~freqvi.guides.LocalMeanField` on discrete latents), the E-step is exact block
      CAVI on the model's log-density tables (the model run once per E-step, not per sweep)
      (:mod:`freqvi.infer.mean_field_cavi`), and the gradient M-step is L-BFGS on the profile
      :math:`\max_q F(q, \theta)` over :math:`\theta`, the factors solved at every
      :math:`\theta` (its gradient is :math:`\partial F / \partial \theta` there), with the
      M-step on Q as its fallback. Exact EM with the closed-form
      M-step on data in memory, for a model whose exact E-step has a closed form
      (:class:`~freqvi.models.ClosedFormEStep`, as :class:`~freqvi.models.GaussianMixture`),
      takes the expected statistics and :math:`\log p(x_i)` from the model directly, the
      same numbers without a Pyro trace per iteration.

    The objective, recorded at the start and after each iteration, is
    :math:`F = \mathrm{ELBO}(q, \theta)`: exact over enumerated sites, and over drawn
    sites the average over ``num_particles`` draws made from the same random numbers at
    every evaluation of the run (common random numbers: seeds drawn at the start from
    torch's generator). :math:`F` is then a deterministic function of the parameters, so
    its changes are changes of the fit, not of the draws, and EM is coordinate ascent on
    it, with the ascent property. For the exact posterior :math:`F = \ell(\theta)` with
    no Monte-Carlo error (every draw gives :math:`\log p(x)`; a freqvi model's exact
    guide returns it without drawing). With a variational guide the fitted parameters
    maximise the draws' :math:`F` (a sample-average approximation), whose Monte-Carlo
    error shrinks as ``num_particles`` grows; fitted to those draws, that :math:`F` is
    biased up, so the objective recorded in the result is :math:`F` from a second set of
    fixed draws, independent of the fit: an unbiased estimate of the ELBO at each iterate,
    smooth from one iterate to the next.

    Stopping: ``"tolerance"`` when :math:`F` changed by at most ``tol`` nats per
    observation over an iteration (the convention of scikit-learn's ``GaussianMixture``,
    whose default is 1e-3) and, for a gradient M-step, the M-step converged and the score
    :math:`\max_j |\partial F / \partial \theta_j|` (unconstrained parameters, the
    guide's local parameters held fixed; :math:`\nabla \ell` for an exact guide, by
    Fisher's identity) is at most ``score_tol`` per observation: a small change alone can
    be a slow M-step rather than a maximum. The closed-form M-step maximises Q exactly and
    is judged by the change alone, as scikit-learn does.

    With ``batch_size`` (closed-form M-step only) this is online EM (Cappe and
    Moulines 2009): each minibatch's statistics are blended into running ones,
    :math:`s_t = (1 - \gamma_t) s_{t-1} + \gamma_t \hat s_t`, with
    :math:`\gamma_1 = 1` and :math:`\gamma_t = t^{-\kappa}` for ``step_size=kappa``
    (or ``step_size(t)``, in (0, 1], if callable), ``0.5 < kappa <= 1``; one iteration is one pass over
    the data.
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
    :param tol: the stop's largest change of the objective, in nats per observation.
    :param score_tol: the stop's largest score entry, in nats per observation (gradient M-step).
    :param m_step_lr: L-BFGS's step length in the gradient M-step (1: the quasi-Newton step).
    :param m_step_iters: most L-BFGS iterations per M-step.
    :param m_step_tol: an L-BFGS run (M-step or E-step) stops when the objective changes by at
        most this many nats or no parameter moves by more than this (unconstrained units), or
        by what the dtype resolves. A coarse value stops L-BFGS before the score test can be
        met: with 1e-6 a mean-field HMM crawled for 33 EM iterations, with 1e-9 it took 17.
    :param e_step_iters: most CAVI sweeps, and most L-BFGS iterations, on the local
        parameters per E-step (variational EM).
    :param e_step_lr: L-BFGS's step length there.
    :param num_particles: draws per observation in the estimates of Q and of the objective, for
        non-enumerated sites. Local parameters fitted to fixed draws fit their noise, by about
        (local parameters per observation) / (2 ``num_particles``) nats per observation: on 500
        Poisson log-normal counts (float32) the ELBO at the end was 43 nats below its optimum
        (about -1102.7: the quadrature maximum less a 4.6-nat mean-field gap) with 16 draws
        and 1 nat with 128, the default, at the same cost (22 iterations, 1.4 CPU s).
    :param seed: seeds Python's, NumPy's and torch's generators first.
    :param checkpoint: a file to write the run's state to every ``checkpoint_every``
        iterations, at the end and on Ctrl-C or SIGTERM (see below), atomically; the path
        is checked and locked as :func:`~freqvi.fit`'s is.
    :param resume: a checkpoint to continue from, with the model built as for the
        run that wrote it; the result equals an uninterrupted run's, bit for bit on CPU.

    An iteration that fails (its objective not finite, an error in the model or guide, a
    singular matrix) is undone (the parameters go back to the previous iteration's) before
    a :class:`~freqvi.errors.FreqviError` is raised.

    :returns: the :class:`EMResult`, also after Ctrl-C: the iteration under way finishes, the
        checkpoint (if any) is written, and the result comes back with ``interrupted=True``
        (``stop_reason="interrupted"``), the parameters those of the last finished iteration,
        and a :class:`~freqvi.errors.FitInterruptedWarning`; a second Ctrl-C stops at once,
        with the parameters of the last finished iteration. SIGTERM (a scheduler ending the
        job) instead raises ``KeyboardInterrupt`` after the checkpoint, so that the process ends.
    :raises FreqviInputError: for an unknown ``m_step``, a non-positive count or tolerance,
        online EM without a closed-form M-step, or a guide with free local parameters and
        a drawn site that is not reparameterisable (fixed draws cannot follow its
        parameters; enumerate it with ``infer={"enumerate": "parallel"}``).
    """
    check_choice(m_step, "m_step", M_STEPS)
    seed = check_seed(seed)
    max_iter = check_positive_int(max_iter, "max_iter")
    checkpoint_every = check_positive_int(checkpoint_every, "checkpoint_every")
    check_checkpoint_path(checkpoint)
    tol = check_positive_float(tol, "tol", allow_zero=True)
    score_tol = check_positive_float(score_tol, "score_tol", allow_zero=True)
    settings = _Settings(
        m_lr=check_positive_float(m_step_lr, "m_step_lr"),
        m_iters=check_positive_int(m_step_iters, "m_step_iters"),
        change_tol=check_positive_float(m_step_tol, "m_step_tol", allow_zero=True),
        e_lr=check_positive_float(e_step_lr, "e_step_lr"),
        e_iters=check_positive_int(e_step_iters, "e_step_iters"),
        num_particles=check_positive_int(num_particles, "num_particles"))
    step_size = _check_step_size(step_size)
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
        if _closed_e_step(pair, m_step, batches):  # the guide is the model's own: the model checks the data
            model_trace = guide_trace = check_model(pair.model, batches.first())
        else:
            model_trace, guide_trace = check_pair(pair.model, pair.guide, batches.first())
    batches.check_plate(model_trace, pair.guide)
    step = _EMStep(pair, batches, m_step, model_trace, guide_trace, settings)
    if not step.exact or m_step == "gradient":  # Q and the objective draw particles at once
        with on_device(device):
            check_particles(pair.model, pair.guide, batches.first(), step.elbo.num_particles,
                            max_plate_nesting(model_trace, guide_trace), "em")
    tol, score_tol = tol * batches.n, score_tol * batches.n  # per observation -> total
    settings.grad_tol = score_tol

    result = EMResult(m_step=m_step, stop_reason="max_iter")
    start = time.perf_counter()
    # Distribution arguments were validated by check_pair; re-checking them each iteration
    # (Pyro's default) costs a third of an EM iteration on a mixture.
    with pyro.validation_enabled(False), deferred_interrupts() as interrupted, on_device(device), \
            checkpoint_lock(checkpoint):
        # exact, or with common random numbers: a smooth function of the parameters, shown as it is
        objective_name = ("log-likelihood" if step.exact
                          else "ELBO (common draws)" if step.drawn else "ELBO")
        if resume is None:
            with _restoring(step, step.snapshot(), "the first E-step"):
                posterior, value = step.evaluate()
            _refuse_infinite_start(value, objective_name, batches.first())
            result.log_likelihood.append(value)
        else:
            step.restore(resume, result)
            with torch.random.fork_rng():  # the recorded distributions, without drawing on the generators
                posterior = None if online else step.posterior()
        first = result.num_iter + 1
        bar = tqdm(range(first, max_iter + 1), initial=first - 1, total=max_iter, disable=not progress,
                   desc="em", unit="iter")
        for it in bar:
            previous = step.fitted
            with _restoring(step, step.snapshot(), f"iteration {it}"):
                if online:
                    step.online_epoch(step_size)
                    posterior, value = step.evaluate()
                    m_converged, ascended = True, True
                else:
                    posterior, value, m_converged, ascended = step.iterate(posterior)
                if not (math.isfinite(value) and math.isfinite(step.fitted)):
                    raise FreqviError(f"iteration {it}: the objective is {value}; the fit diverged.")
            result.log_likelihood.append(value)
            result.num_iter = it
            bar.set_postfix_str(f"{objective_name} {value:.6g}", refresh=False)
            _judge(result, step, step.fitted - previous, m_converged, ascended, tol, score_tol)
            signum = interrupted()  # read once: the checkpoint and the stop agree
            if signum:  # Ctrl-C ends the run here, converged or not, as fit's does
                result.stop_reason, result.interrupted = "interrupted", True
            stop = result.stop_reason != "max_iter"
            if checkpoint is not None and (it % checkpoint_every == 0 or stop or it == max_iter):
                step.save(checkpoint, result)
            if signum == signal.SIGTERM:
                raise KeyboardInterrupt(f"em terminated after iteration {it}"
                                        + (f"; checkpoint in {str(checkpoint)!r}" if checkpoint else ""))
            if stop:
                break
    bar.close()
    result.wall_time = time.perf_counter() - start
    if result.interrupted:
        resumes = f" and the checkpoint {str(checkpoint)!r} resumes the run" if checkpoint else ""
        warnings.warn(FitInterruptedWarning(
            f"em interrupted after iteration {result.num_iter} of {max_iter}: the result holds the "
            f"iterations taken{resumes}."), stacklevel=2)
    elif not result.converged:
        warnings.warn(_not_converged_message(result, max_iter, tol / batches.n, score_tol / batches.n),
                      ConvergenceWarning, stacklevel=2)
    _warn_on_floor(pair)
    return result


def _warn_on_floor(pair: Pair) -> None:
    """Warns if the fit ended with a variance on the model's floor (``on_boundary()``, e.g. a mixture's
    ``reg_covar``): degenerate data, where only the floor bounds the likelihood."""
    floored = getattr(pair.owner, "on_boundary", None)
    where = floored() if floored is not None else []
    if where:
        warnings.warn(
            f"em ended on the floor of the variances: {where}. The data are degenerate there (a constant "
            "column, or identical rows in a component): without the floor the likelihood has no maximum "
            "(maximize_likelihood refuses such data), so those variances are the floor, not estimates. "
            "Drop the constant columns, or fit fewer components.",
            BoundaryWarning, stacklevel=3)


def _judge(result: EMResult, step: _EMStep, change: float, m_converged: bool, ascended: bool,
           tol: float, score_tol: float) -> None:
    """Sets ``stop_reason``, ``converged`` and ``score`` after an iteration (``"max_iter"`` to go on)."""
    if ascended and not (m_converged and abs(change) <= tol):
        return
    if step.kind == "closed_form":  # Q maximised exactly: the change alone, as scikit-learn
        result.stop_reason, result.converged = "tolerance", True
        return
    result.score = step.score()  # only here: a backward pass of the objective
    # A score whose ascent would gain less than F's rounding cannot be resolved: float32
    # stops at a score of about sqrt(eps) |F| (0.35 nats on F = -1000), float64 is unaffected.
    stationary = result.score <= max(score_tol, math.sqrt(step.eps) * abs(step.fitted))
    if ascended and not stationary:
        step.slow = True  # a small change away from a stationary point: EM's slow crawl, not a maximum
        return
    result.stop_reason = "tolerance" if ascended else "no_ascent"
    result.converged = stationary


def _not_converged_message(result: EMResult, max_iter: int, tol: float, score_tol: float) -> str:
    score = "" if result.score is None else f"the largest score entry was {result.score:.3g} nats"
    if result.stop_reason == "no_ascent":
        return (f"EM stopped after {result.num_iter} iterations: the M-step found no parameters that raise "
                f"the objective, but {score}, above score_tol={score_tol:g} per observation: the "
                "Monte-Carlo Q cannot resolve the rest; raise num_particles.")
    message = f"EM stopped at max_iter={max_iter} before the change per observation fell below tol={tol:g}"
    if score:
        message += (f" and every score entry below score_tol={score_tol:g} per observation ({score} "
                    "when last checked)")
    return message + "; raise max_iter or tol."


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


@dataclass
class _Settings:
    """The optimisers' settings of one :func:`em` run."""

    m_lr: float
    m_iters: int
    change_tol: float
    e_lr: float
    e_iters: int
    num_particles: int
    grad_tol: float = 0.0  # the stop's score tolerance in total nats, set once n is known


def _exact_guide(pair: Pair) -> bool:
    """Whether the guide is a freqvi model's own exact posterior (returning ``log p(x_i)``)."""
    owner = pair.owner
    return owner is not None and pair.guide == owner.guide and owner.exact_guide


def _closed_e_step(pair: Pair, m_step: str, batches: BatchSource) -> bool:
    """Exact EM on data in memory with the model's E-step in closed form: no Pyro trace per iteration,
    and the guide, the model's own, needs no run before the fit (it matches the model by construction)."""
    return (_exact_guide(pair) and m_step == "closed_form" and isinstance(pair.owner, ClosedFormEStep)
            and isinstance(batches, InMemoryBatches))


class _EMStep:
    """The E-step, M-step and objective of one :func:`em` run."""

    def __init__(self, pair: Pair, batches: BatchSource, m_step: str, model_trace, guide_trace,
                 settings: _Settings):
        self.pair, self.batches, self.kind, self.settings = pair, batches, m_step, settings
        plate_nesting = max_plate_nesting(model_trace, guide_trace)
        drawn = [site for site in latent_sites(guide_trace).values() if not is_enumerated(site)]
        # Q is computed exactly by enumeration when nothing is drawn: more draws would repeat it.
        self.elbo = TraceEnum_ELBO(
            num_particles=settings.num_particles if drawn else 1, vectorize_particles=True,
            max_plate_nesting=plate_nesting, strict_enumeration_warning=False)
        # The guide's latent sites marked for enumeration are recorded with their support
        # rather than a draw: the E-step needs their distributions, not samples.
        self.enum = poutine.enum(first_available_dim=-1 - plate_nesting)
        self.exact = _exact_guide(pair)
        self.closed_e_step = _closed_e_step(pair, m_step, batches)
        model_names = param_names(model_trace)
        local_names = param_names(guide_trace) - model_names
        if local_names:
            _check_reparameterized(drawn)
        self.names = sorted(model_names | local_names, key=stable_name)
        self.params = unconstrained_params(self.names)
        self.local = unconstrained_params(local_names)
        logits = getattr(pair.guide, "categorical_logits", None)  # LocalMeanField's discrete factors
        self.logits = logits() if callable(logits) else []
        self.theta = unconstrained_params(model_names)
        # Every local parameter a categorical factor's logits, every latent enumerated: exact CAVI on
        # the model's log-density tables (mean_field_cavi), and L-BFGS on theta with the factors profiled.
        self.cavi = (cavi_applies(model_trace, guide_trace, self.logits, self.local)
                     and isinstance(batches, InMemoryBatches) and batches.batch_size is None)
        self.plate_nesting = plate_nesting
        self.eps = torch.finfo(self.params[0].dtype).eps
        self.statistics = None
        self.t = 0
        self.slow = False
        # The seeds of the common random numbers: every estimate of the run draws the same
        # standard variates, so the objective is a deterministic function of the parameters.
        # The steps fit the parameters to the first seed's draws, whose F is therefore biased
        # up (the local parameters fit the draws: about (local parameters per observation) /
        # (2 num_particles) nats per observation; with 16 draws on 500 Poisson log-normal
        # counts it ended 38 nats above the best ELBO, 34 above the log-likelihood);
        # the recorded objective uses the second seed's, independent of the fit, so it is an
        # unbiased estimate of the ELBO at each iterate.
        self.drawn = bool(drawn) and not self.exact
        self.fit_seed, self.record_seed = (int(s) for s in torch.randint(2**62, (2,)))
        self.fitted = -math.inf  # F from the fit's draws at the current parameters
        self.m_grad = 0.0  # the last M-step's largest starting score entry (total nats)
        self.devices = sorted({str(t.device) for t in batches.first() if t.device.type == "cuda"})

    def common_draws(self, seed: int | None = None):
        """A context in which torch's generators give the run's common random numbers (the fit's
        unless ``seed`` says otherwise), restored after."""
        return _seeded(self.fit_seed if seed is None else seed, self.devices)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load_snapshot(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values, strict=True):
                p.copy_(v)

    def save(self, path, result: EMResult) -> None:
        """Writes the parameters, online statistics, history, common-draws seed and generators."""
        state = {"params": dict(zip(map(stable_name, self.names), self.snapshot(), strict=True)),
                 "statistics": self.statistics or {}, "t": self.t, "rng": rng_state(),
                 "seeds": [self.fit_seed, self.record_seed], "fitted": self.fitted,
                 "batches": self.batches.state(),
                 "history": {"log_likelihood": list(result.log_likelihood), "num_iter": result.num_iter}}
        save_checkpoint(path, state, {"kind": "em", "m_step": self.kind,
                                      "params": [stable_name(n) for n in self.names]})

    def restore(self, path, result: EMResult) -> None:
        # L-BFGS steps keep no state between iterations: there is no optimiser state to restore
        state, metadata = load_checkpoint(path, "em", dict(zip(self.names, self.params, strict=True)), {})
        names = [stable_name(n) for n in self.names]
        if metadata.get("kind") != "em" or metadata.get("m_step") != self.kind or metadata["params"] != names:
            raise FreqviInputError(
                f"checkpoint {str(path)!r} was written by a different run ({metadata.get('kind')}, "
                f"m_step {metadata.get('m_step')!r}, parameters {metadata.get('params')}); this one has "
                f"m_step {self.kind!r} and parameters {names}."
            )
        if "seeds" not in state:
            raise FreqviInputError(f"checkpoint {str(path)!r} was written by an earlier em without common "
                                   "random numbers (no 'seeds' in it); it cannot be continued: start afresh.")
        self.load_snapshot([state["params"][n] for n in names])
        self.statistics, self.t = state["statistics"] or None, state["t"]
        self.fit_seed, self.record_seed = (int(s) for s in state["seeds"])
        self.fitted = float(state["fitted"])
        self.batches.load(state["batches"])
        result.log_likelihood[:] = state["history"]["log_likelihood"]
        result.num_iter = state["history"]["num_iter"]
        set_rng_state(state["rng"])

    def e_step(self, data, handler=None, fit_local: bool = True):
        """Records the guide's distributions on ``data`` at theta (local parameters fitted first)."""
        handler = handler or nullcontext()
        if self.local and fit_local:
            def loss():
                with handler:
                    return self.negative_objective(self.pair.guide, data)

            # While theta moves, a precise E-step is wasted: its gradient tolerance follows the
            # last M-step's starting score, down to score_tol near the end.
            s = self.settings
            grad_tol = max(s.grad_tol, 0.1 * self.m_grad) / self.batches.n
            if self.cavi:  # exact coordinate ascent, no run of the model per sweep
                self.tables(data).ascend(s.e_iters, grad_tol)
            else:
                if self.logits:
                    _mean_field_sweeps(loss, self.logits, s.e_iters, grad_tol)
                _lbfgs(loss, self.local, s.e_lr, s.e_iters, s.change_tol, grad_tol, self.scale())
        with torch.no_grad(), poutine.block(), handler:
            return poutine.trace(self.enum(self.pair.guide)).get_trace(*data)

    def evaluate(self) -> tuple:
        """The E-step and the recorded objective over every observation; sets ``fitted``.

        The objective is summed over the parts of the data's evaluation pass (one part,
        all rows, for data in memory); the posterior returned is the last part's: the guide's
        trace, or the expected statistics where the model gives its exact E-step in closed form.
        """
        if self.closed_e_step:
            with torch.no_grad():
                statistics, log_evidence = self.pair.owner.posterior_statistics(*self.batches.first())
            self.fitted = float(log_evidence.double().sum())
            return statistics, self.fitted
        fitted = recorded = 0.0
        for data in self.batches.evaluation_pass():
            posterior = self.e_step(data)
            value = self.objective(posterior, data, self.fit_seed)
            fitted += value
            recorded += self.objective(posterior, data, self.record_seed) if self.drawn else value
        self.fitted = fitted
        return posterior, recorded

    def tables(self, data, differentiable: bool = False) -> MeanFieldTables:
        """The model's log-density tables at theta for the mean-field CAVI (``differentiable``: in theta)."""
        return MeanFieldTables(self.pair.model, self.pair.guide, data, self.plate_nesting, self.logits,
                               differentiable)

    def posterior(self):
        """What the next M-step reads at the current parameters (after a resume): the guide's
        distributions recorded on the data in memory, local parameters as they are, or the
        expected statistics of the model's closed-form E-step."""
        if self.closed_e_step:
            with torch.no_grad():
                return self.pair.owner.posterior_statistics(*self.batches.first())[0]
        return self.e_step(self.batches.first(), fit_local=False)

    def negative_objective(self, guide, data) -> torch.Tensor:
        """-ELBO(guide, theta) from the common draws, differentiable."""
        with self.common_draws():
            return self.elbo.differentiable_loss(self.pair.model, guide, *data)

    def objective(self, posterior, data, seed: int) -> float:
        """ELBO(q, theta) with q the recorded posterior: log-likelihood when q is exact.

        When the guide is a freqvi model's own exact posterior, the bound is tight and
        equals the posterior's normaliser, which that guide returns: no second pass.
        """
        if self.exact:
            return float(posterior.nodes["_RETURN"]["value"].double().sum())
        with torch.no_grad(), self.common_draws(seed):
            return -self.elbo.loss(self.pair.model, FrozenPosterior(posterior)(self.pair.guide), *data)

    def score(self) -> float:
        """max_j |dF/dtheta_j| at the current parameters, local ones held fixed (data in memory)."""
        grads = torch.autograd.grad(self.live_objective(self.batches.first()), self.theta, allow_unused=True)
        return max((float(g.abs().max()) for g in grads if g is not None), default=0.0)

    def iterate(self, posterior) -> tuple:
        """One M-step and E-step; returns the posterior, the recorded objective, whether the
        M-step converged and whether F rose (else the parameters are left as they were)."""
        data, previous = self.batches.first(), self.fitted
        if self.kind == "closed_form":
            owner = self.pair.owner
            owner.maximize(posterior if self.closed_e_step else owner.expected_statistics(posterior, *data))
            return *self.evaluate(), True, True
        start = self.snapshot()
        frozen = FrozenPosterior(posterior)(self.pair.guide)

        def q_step():  # -ELBO(q frozen, theta) = -Q(theta | theta') - H(q): H does not move with theta
            return self.negative_objective(frozen, data)

        def direct_step():
            return -self.live_objective(data)

        def profile_step():  # -max_q F(q, theta): the factors solved by CAVI at each theta
            tables = self.tables(data, differentiable=True)
            tables.ascend(self.settings.e_iters, self.settings.grad_tol / self.batches.n)
            return -tables.objective(tables.probabilities())

        # After a step that changed F by less than tol away from a stationary point, EM crawls
        # (its rate is the fraction of missing information): L-BFGS on F itself goes first then,
        # over theta and the local parameters together, a quasi-Newton acceleration of EM
        # (Jamshidian and Jennrich 1997) that keeps the ascent. With exact CAVI on the factors,
        # L-BFGS on the profile max_q F(q, theta) over theta always goes first: its gradient is
        # dF/dtheta at the optimal q (the envelope theorem), as the exact guide's is Fisher's.
        steps = [(q_step, self.theta, False), (direct_step, self.theta + self.local, True)]
        if self.cavi:
            steps = [(profile_step, self.theta, True), steps[0]]
        elif self.slow:
            steps.reverse()
        self.slow = False
        for loss, params, finish in steps:
            converged = self._maximize(loss, params, finish)
            new_posterior, value = self.evaluate()
            if self.fitted >= previous or not math.isfinite(self.fitted):
                return new_posterior, value, converged, True
            # The Q estimate rose and the objective fell: an exact guide with drawn latents,
            # whose Q estimate is not a minorant of l. The other step from theta' next.
            self.load_snapshot(start)
        posterior, value = self.evaluate()
        return posterior, value, True, False

    def live_objective(self, data) -> torch.Tensor:
        """F at the current parameters, differentiable in theta through model and guide.

        For a freqvi model's exact guide, the normaliser it returns, l(theta).
        """
        if self.exact:
            with poutine.block():
                trace = poutine.trace(self.enum(self.pair.guide)).get_trace(*data)
            return trace.nodes["_RETURN"]["value"].sum()
        return -self.negative_objective(self.pair.guide, data)

    def _maximize(self, loss, params: list[torch.Tensor], finish: bool) -> bool:
        # An inexact M-step (generalised EM): the score a hundred times below the last M-step's
        # start, down to a tenth of the stop's tolerance; the stop checks the score itself.
        # The direct ascent of F is there to finish: it goes down to that tenth at once.
        s = self.settings
        grad_tol = s.grad_tol / 10 if finish else max(s.grad_tol / 10, 0.01 * self.m_grad)
        converged, self.m_grad = _lbfgs(loss, params, s.m_lr, s.m_iters, s.change_tol, grad_tol, self.scale())
        return converged

    def scale(self) -> float:
        """The size of F, for the resolution of L-BFGS's tolerances (0 before the first evaluation)."""
        return abs(self.fitted) if math.isfinite(self.fitted) else 0.0

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


def _refuse_infinite_start(value: float, objective: str, data: tuple[torch.Tensor, ...]) -> None:
    """Refuses a start at which the objective is not finite: some observation has no positive density
    under the starting parameters, and no step of EM can be judged from there."""
    if math.isfinite(value):
        return
    raise FreqviInputError(
        f"the {objective} at the starting parameters is {value}: some observation has zero or undefined "
        "density under the model before any step, so EM has nothing finite to increase."
        f"{_overflow_note(data)} Check the data against the model's support, or start from other parameters."
    )


def _overflow_note(data: tuple[torch.Tensor, ...]) -> str:
    """Names an array whose largest absolute entry squares past its dtype's largest number (Gaussian
    densities square the data), or is empty."""
    for i, x in enumerate(data):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            largest, limit = float(x.detach().abs().max()), torch.finfo(x.dtype).max
            if largest**2 > limit:
                return (f" data[{i}]'s largest absolute entry, {largest:.3g}, squares past {x.dtype}'s "
                        f"largest number ({limit:.3g}): rescale the data, or pass it as float64.")
    return ""


@contextmanager
def _restoring(step: _EMStep, good: list[torch.Tensor], what: str):
    """Puts the parameters back to ``good`` if the block fails, whatever the failure; one that is not
    freqvi's own (a singular matrix, a shape error in a user's model), or an input error met mid-run (a
    refusal, :class:`~freqvi.errors.FreqviInputError`, would have the driver's boundary undo the whole
    run), becomes a
    :class:`~freqvi.errors.FreqviError`."""
    kept = "the parameters are back at their values before it"
    try:
        yield
    except FreqviInputError as exc:  # mid-run, not a refusal at the boundary, which would undo the run
        step.load_snapshot(good)
        raise FreqviError(f"{what} failed: {exc} ({kept}).") from exc
    except FreqviError as exc:
        step.load_snapshot(good)
        exc.args = (f"{exc.args[0]} ({kept})" if exc.args else kept, *exc.args[1:])
        raise
    except (RuntimeError, ValueError, ArithmeticError) as exc:
        step.load_snapshot(good)
        raise FreqviError(f"{what} failed: {type(exc).__name__}: {exc} ({kept}).") from exc
    except BaseException:  # Ctrl-C twice, or anything else: nothing half-updated stays
        step.load_snapshot(good)
        raise


def _check_reparameterized(drawn_sites) -> None:
    """The E-step follows fixed draws through the local parameters: they must be reparameterised."""
    bad = [site["name"] for site in drawn_sites if not site["fn"].has_rsample]
    if bad:
        raise FreqviInputError(
            f"em fits the guide's local parameters on fixed (common) draws, which needs reparameterised "
            f"latent sites; {bad} are drawn without rsample. Mark discrete ones "
            "infer={'enumerate': 'parallel'} or give them a reparameterised distribution.")


@contextmanager
def _seeded(seed: int, devices: list[str]):
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _mean_field_sweeps(loss, logits: list[torch.Tensor], max_sweeps: int, tol: float) -> None:
    r"""Coordinate ascent (CAVI) on mean-field categorical factors, all at once, kept only if F rises.

    For a factor :math:`q(z) = \pi` in a mean-field ELBO :math:`F`, the optimum given the
    others is :math:`\log \pi^*_k = \mathbb E_{q_{-z}}[\log p \mid z = k] + c`, and
    :math:`\partial F / \partial \mathrm{logit}_k = \pi_k (g_k - \bar g)` with
    :math:`g_k = \mathbb E_{q_{-z}}[\log p \mid z = k] - \log \pi_k - 1`, so one gradient
    gives every factor's update, :math:`\mathrm{logits} + \nabla F / \pi` (Bishop 2006,
    section 10.1.1). For one discrete site per observation (a mixture) the first sweep is
    the exact E-step; for coupled sites (an HMM's chain) the simultaneous update is halved
    (up to twice) until F rises, else the sweeps stop. ``loss`` is :math:`-F`; stops when no
    logit moves by more than ``tol`` or after ``max_sweeps``.
    """
    value = loss()
    for _ in range(max_sweeps):
        grads = torch.autograd.grad(value, logits)
        steps = [-g / x.detach().softmax(-1).clamp_min(torch.finfo(x.dtype).tiny)
                 for x, g in zip(logits, grads, strict=True)]
        steps = [d - d.mean(-1, keepdim=True) for d in steps]  # logits are defined up to a row constant
        if max(float(d.abs().max()) for d in steps) <= tol:
            return
        start = [x.detach().clone() for x in logits]
        for alpha in (1.0, 0.5, 0.25):
            with torch.no_grad():
                for x, x0, d in zip(logits, start, steps, strict=True):
                    x.copy_(x0 + alpha * d)
            new = loss()
            if new < value:
                value = new
                break
        else:
            with torch.no_grad():
                for x, x0 in zip(logits, start, strict=True):
                    x.copy_(x0)
            return


def _lbfgs(loss, params: list[torch.Tensor], lr: float, max_iter: int, change_tol: float,
           grad_tol: float, scale: float) -> tuple[bool, float]:
    """Minimises ``loss()`` over ``params`` by L-BFGS with a strong Wolfe line search.

    Stops when every gradient entry is at most ``grad_tol``, when the loss or the largest
    entry of the step changes by at most ``change_tol`` or by what the dtype resolves on a
    loss of size ``scale`` (torch's one tolerance for both), or after ``max_iter``
    iterations, and leaves the parameters at the lowest loss it saw (float32 curvature
    pairs can make a step overflow). Returns whether it stopped before ``max_iter`` and
    the largest gradient entry at the start.
    """
    best = {"loss": math.inf, "params": None}
    first_grad = []

    def closure() -> torch.Tensor:
        value = loss()
        grads = torch.autograd.grad(value, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        if not first_grad:
            first_grad.append(max(float(p.grad.abs().max()) for p in params))
        value = value.detach()
        if value < best["loss"]:
            best["loss"], best["params"] = float(value), [p.detach().clone() for p in params]
        return value

    resolution = 4 * torch.finfo(params[0].dtype).eps * scale
    optimizer = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, tolerance_grad=grad_tol,
                                  tolerance_change=max(change_tol, resolution), line_search_fn="strong_wolfe")
    try:
        optimizer.step(closure)
    except RuntimeError:  # a step overflowed: keep the best point seen
        pass
    if best["params"] is not None:
        with torch.no_grad():
            for p, b in zip(params, best["params"], strict=True):
                p.copy_(b)
    converged = optimizer.state[optimizer._params[0]].get("n_iter", max_iter) < max_iter
    return converged, first_grad[0] if first_grad else math.inf


def _blend_linearly(old: dict, new: dict, gamma: float) -> dict:
    return {k: (1 - gamma) * old[k] + gamma * new[k] for k in new}


def _check_step_size(step_size):
    r"""``step_size`` as given if callable, else checked: Cappe and Moulines' (2009) conditions on
    :math:`\gamma_t = t^{-\kappa}`, :math:`\sum_t \gamma_t = \infty` and
    :math:`\sum_t \gamma_t^2 < \infty`, hold for :math:`0.5 < \kappa \le 1`."""
    if callable(step_size):
        return step_size
    number = isinstance(step_size, int | float) and not isinstance(step_size, bool)
    if not (number and 0.5 < step_size <= 1):
        raise FreqviInputError(f"step_size must be a number kappa with 0.5 < kappa <= 1 (the online EM step "
                               f"t ** -kappa) or a callable t -> gamma_t; got {step_size!r}.")
    return float(step_size)


def _gamma(step_size, t: int) -> float:
    """The blend weight of iteration ``t``; a callable's value must lie in (0, 1]."""
    if not callable(step_size):
        return t ** -step_size
    gamma = step_size(t)
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma <= 1:
        raise FreqviInputError(f"step_size({t}) must be a number in (0, 1] (the weight of the new "
                               f"statistics); got {gamma!r}.")
    return float(gamma)
