"""The bootstrap: refits on resampled or simulated data, in parallel processes."""

from __future__ import annotations

import ast
import inspect
import multiprocessing
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine

from freqvi.errors import ConvergenceWarning, FreqviError, FreqviInputError
from freqvi.infer.em import em
from freqvi.infer.pair import resolve_pair
from freqvi.infer.threads import intra_op_threads, thread_policy
from freqvi.traces import check_model, check_pair, param_names
from freqvi.validation import as_data, check_choice, check_positive_int, check_probability, check_seed

KINDS = ("nonparametric", "parametric")


@dataclass
class Bootstrap:
    """What :func:`bootstrap` returns.

    :ivar estimate: the fitted model's estimates under their statistical names.
    :ivar draws: each estimate refitted on every replicate, shape ``(R, *estimate.shape)``.
    :ivar converged: whether each replicate's fit met its tolerance, shape ``(R,)``.
    :ivar kind: ``"nonparametric"`` or ``"parametric"``.
    """

    estimate: dict[str, np.ndarray]
    draws: dict[str, np.ndarray]
    converged: np.ndarray
    kind: str

    def __repr__(self) -> str:
        """One line a parameter: its estimate's size and the bootstrap standard error's range."""
        replicates = len(self.converged)
        lines = [f"Bootstrap ({self.kind}): {replicates} replicates, {int(self.converged.sum())} converged"]
        for name, se in self.standard_errors().items():
            lines.append(f"  {name}: shape {tuple(self.estimate[name].shape)}, standard errors "
                         f"{np.min(se):.3g} to {np.max(se):.3g}")
        return "\n".join(lines)

    def standard_errors(self) -> dict[str, np.ndarray]:
        """The replicates' standard deviations."""
        return {name: draws.std(0, ddof=1) for name, draws in self.draws.items()}

    def percentile_interval(self, level: float = 0.95) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Efron's percentile interval: the replicates' ``(1 -+ level) / 2`` quantiles.

        :raises FreqviInputError: unless ``0 < level < 1``.
        """
        tail = (1 - check_probability(level, "level")) / 2
        return {name: (np.quantile(d, tail, axis=0), np.quantile(d, 1 - tail, axis=0))
                for name, d in self.draws.items()}

    def summary(self, level: float = 0.95):
        """A ``pandas.DataFrame``: estimate, bootstrap standard error and percentile interval per entry.

        A symmetric matrix (a covariance: symmetric in the estimate and in every replicate) lists
        its lower triangle only, as :meth:`freqvi.Information.summary` does.
        """
        level = check_probability(level, "level")
        import pandas as pd  # ArviZ's dependency; imported when a table is asked for

        errors, (lower, upper) = self.standard_errors(), zip(*self.percentile_interval(level).values(),
                                                           strict=True)
        rows = []
        for (name, est), low, high in zip(self.estimate.items(), lower, upper, strict=True):
            symmetric = _is_symmetric(est, self.draws[name])
            for index in np.ndindex(est.shape):
                if symmetric and index[-2] < index[-1]:
                    continue
                label = name + (str(list(index)) if index else "")
                rows.append({"parameter": label, "estimate": est[index], "std_err": errors[name][index],
                             f"[{(1 - level) / 2:g}": low[index], f"{(1 + level) / 2:g}]": high[index]})
        return pd.DataFrame(rows).set_index("parameter")

    def to_inference_data(self):
        """The replicates as an :class:`arviz.InferenceData`, one chain of ``R`` draws.

        They sit in the ``posterior`` group, the one ``arviz.summary`` and ArviZ's
        plots read; they are bootstrap replicates of the estimator, not a posterior.
        """
        import arviz as az  # deferred: importing ArviZ is slow

        return az.from_dict(posterior={name: d[None] for name, d in self.draws.items()})


def _is_symmetric(estimate: np.ndarray, draws: np.ndarray) -> bool:
    """Whether the estimate and every replicate are stacks of symmetric matrices."""
    return (estimate.ndim >= 2 and estimate.shape[-1] == estimate.shape[-2]
            and np.array_equal(estimate, np.swapaxes(estimate, -1, -2))
            and np.array_equal(draws, np.swapaxes(draws, -1, -2)))


@thread_policy
def bootstrap(model, data, guide=None, *, num_replicates: int = 200, kind: str = "nonparametric",
              fit: Callable = em, num_workers: int | None = None, seed: int = 0, **fit_options) -> Bootstrap:
    r"""Refits a fitted model on ``num_replicates`` bootstrap data sets.

    * nonparametric: the observations (rows of the data plate) drawn with replacement;
    * parametric: data simulated from the fitted model, its observed sites sampled.

    The estimate :math:`\hat\theta` is the model's parameters now: a freqvi model's
    ``estimates()``, or every ``pyro.param`` site a user's model reads (constrained values,
    under their site names). Each replicate starts from :math:`\hat\theta` (warm start, so
    it converges fast and keeps the estimate's labelling of mixture components in all but
    rare cases; a user's pair also gets the guide's fitted parameters) and is fitted by
    ``fit(model, guide=guide, data=replicate, progress=False, **fit_options)``
    (:func:`~freqvi.em` by default; ``guide`` and ``progress`` passed only where given and
    accepted). Replicates run in ``num_workers`` processes (default: one per CPU), each on one
    torch thread, started by the ``spawn`` method (forking a process whose OpenMP threads have
    run can deadlock); replicate ``r`` draws its data from its own seed, so the result does not
    depend on the number of workers. The caller's parameters are untouched.

    Spawned workers import the script that calls ``bootstrap`` and pickle ``model``, ``guide``
    and ``fit`` by their import path: define them at the top level of a module (not as
    lambdas, closures or in a notebook cell), and call ``bootstrap`` from under
    ``if __name__ == "__main__":`` in a script.

    :param model: a fitted freqvi model, a fitted model callable, or a ``(model, guide)`` pair.
    :param data: the data it was fitted to; arrays whose first dimension is the
        number of observations are resampled together.
    :param guide: the guide to refit with (default: a freqvi model's own; none for a
        callable, for fits that need none, such as :func:`~freqvi.maximize_likelihood`).
    :param fit: the driver refitting each replicate: :func:`~freqvi.em`, :func:`~freqvi.fit`,
        :func:`~freqvi.maximize_likelihood` or any callable taking those keywords.
    :raises FreqviInputError: before any worker starts, for a bad option, an option ``fit``
        does not take, a pair that does not run on ``data``, a model without parameters,
        something workers cannot receive, or a call from a script's top level outside an
        ``if __name__ == "__main__":`` guard; :class:`~freqvi.errors.FreqviError` if the
        workers die anyway, with the likely cause.
    """
    check_choice(kind, "kind", KINDS)
    num_replicates = check_positive_int(num_replicates, "num_replicates", minimum=2)
    if num_workers is not None:  # None: one per CPU; 0 is refused, not read as the default
        num_workers = check_positive_int(num_workers, "num_workers")
    num_workers = num_workers or os.cpu_count() or 1
    seed = check_seed(seed)
    data = as_data(data)
    pair = resolve_pair(model, guide, require_guide=False)
    user_guide = guide if pair.owner is not None else pair.guide
    target = pair.owner if pair.owner is not None else pair.model
    options = _fit_options(fit, user_guide, fit_options)
    estimate = _estimates(pair, data)
    if not estimate:
        raise FreqviInputError("bootstrap: the model reads no pyro.param, so there is no estimate to "
                               "refit; its parameters must be pyro.param sites (or PyroParam attributes).")
    seeds = np.random.SeedSequence(seed).generate_state(num_replicates)
    state = None if pair.owner is not None else pyro.get_param_store().get_state()
    work = _pickled(_Work(target, user_guide, state, tuple(estimate), data, kind, fit, options))
    jobs = [(work, int(s)) for s in seeds]
    _check_main_guard()
    # Always in worker processes, each single-threaded, so results do not depend on the number
    # of workers and the caller's parameter store is untouched.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_single_threaded) as pool:
            results = list(pool.map(_replicate, jobs))
    except BrokenProcessPool as exc:
        raise FreqviError(
            "bootstrap: the worker processes died before returning (BrokenProcessPool). Spawned workers "
            "import the calling script: call bootstrap from under 'if __name__ == \"__main__\":', and "
            "define the model, guide and fit at the top level of an importable module; the workers' "
            "own error, if any, is printed above."
        ) from exc
    estimate = {name: value.numpy() for name, value in estimate.items()}
    draws = {name: np.stack([r[0][name] for r in results]) for name in estimate}
    return Bootstrap(estimate, draws, np.array([r[1] for r in results]), kind)


@dataclass(frozen=True)
class _Work:
    """What every replicate needs: ``model`` a freqvi model or a model callable; for a callable,
    ``param_state`` is the caller's parameter store (``None`` for a freqvi model); ``names`` the
    estimate's parameters."""

    model: object
    guide: Callable | None
    param_state: dict | None
    names: tuple[str, ...]
    data: tuple[torch.Tensor, ...]
    kind: str
    fit: Callable
    fit_options: dict


def _fit_options(fit: Callable, guide, fit_options: dict) -> dict:
    """The keywords each replicate's ``fit`` gets, checked against its signature here."""
    if not callable(fit):
        raise FreqviInputError(f"bootstrap: fit must be a callable driver such as freqvi.em; got {fit!r}.")
    options = dict(fit_options)
    try:
        parameters = inspect.signature(fit).parameters
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return {**options, **({"guide": guide} if guide is not None else {})}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if guide is not None:
        if "guide" not in parameters and not takes_any:
            raise FreqviInputError(f"bootstrap: fit={_name(fit)} takes no guide, but one was given.")
        options["guide"] = guide
    if "progress" in parameters or takes_any:
        options.setdefault("progress", False)
    unknown = sorted(k for k in options if k not in parameters) if not takes_any else []
    if unknown or "data" not in parameters:
        raise FreqviInputError(
            f"bootstrap: fit={_name(fit)} must take the keywords data= and those given ({sorted(options)}); "
            f"it takes {list(parameters)}" + (f", not {unknown}" if unknown else "") + "."
        )
    return options


def _name(fit: Callable) -> str:
    return getattr(fit, "__name__", repr(fit))


def _estimates(pair, data: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """The estimate: a freqvi model's ``estimates()``, else the model's ``pyro.param`` sites, constrained."""
    if pair.owner is not None:
        return pair.owner.estimates()
    with torch.no_grad():
        model_trace = check_pair(pair.model, pair.guide, data)[0] if pair.guide \
            else check_model(pair.model, data)
    names = sorted(param_names(model_trace))
    return {name: model_trace.nodes[name]["value"].detach().clone() for name in names}


def _pickled(work: _Work) -> bytes:
    """``work`` as plain pickle bytes, or an error saying why it cannot reach a spawned worker.

    Plain bytes, not the pool's own pickling: that puts tensors in shared memory, so a worker's
    fit would update the caller's parameters (and the next replicate's start) in place.
    """
    try:
        payload = pickle.dumps(work)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise FreqviInputError(
            "bootstrap: the model, guide, fit or options cannot be sent to the worker processes "
            f"({type(exc).__name__}: {exc}); define functions at the top level of a module, not as "
            "lambdas or inside other functions, and keep a Pyro handler's decorated function under "
            "another name than the original (model = config_enumerate(raw_model)), or mark the site "
            "instead (infer={'enumerate': 'parallel'})."
        ) from None
    interactive = not hasattr(sys.modules["__main__"], "__file__")
    for part in (work.model, work.guide, work.fit):
        if interactive and getattr(part, "__module__", None) == "__main__":
            raise FreqviInputError(
                f"bootstrap: {getattr(part, '__qualname__', part)!r} is defined in an interactive session "
                "(a notebook or the REPL), which spawned workers cannot import; put it in a .py module "
                "and import it from there."
            )
    return payload


def _check_main_guard() -> None:
    """Raises if ``bootstrap`` is called from a script's top level outside ``if __name__ == "__main__":``.

    A spawned worker imports the script that started the program; without the guard that import
    calls ``bootstrap`` again, the worker dies and the pool breaks. The call's line in the script
    is looked up in its syntax tree; without a readable source nothing is checked.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is vars(main)):
        frame = frame.f_back
    if frame is None or path is None or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return
    if not _guarded(tree.body, frame.f_lineno):
        raise FreqviInputError(
            f"bootstrap is called at line {frame.f_lineno} of the script {path} outside an "
            "'if __name__ == \"__main__\":' block: its worker processes (started by spawn) import the "
            "script and would run that line again. Put the script's work under the guard."
        )


def _guarded(statements: list[ast.stmt], line: int) -> bool:
    """Whether ``line`` sits inside an ``if __name__ == "__main__":`` among ``statements`` (top level)."""
    for statement in statements:
        if not statement.lineno <= line <= (statement.end_lineno or statement.lineno):
            continue
        if isinstance(statement, ast.If) and _is_main_test(statement.test):
            return any(s.lineno <= line <= (s.end_lineno or s.lineno) for s in statement.body)
        return False
    return False


def _is_main_test(test: ast.expr) -> bool:
    names = {"__name__", "__main__"}
    return (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and {_text(test.left), _text(test.comparators[0])} == names)


def _text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _single_threaded() -> None:
    torch.set_num_threads(1)


def _replicate(job: tuple[bytes, int]) -> tuple[dict[str, np.ndarray], bool]:
    """Fits a fresh copy of the model, warm-started at the estimate, to one bootstrap data set."""
    payload, seed = job
    work: _Work = pickle.loads(payload)
    pyro.clear_param_store()  # each replicate starts from the estimate, not a previous replicate's fit
    if work.param_state is not None:
        pyro.get_param_store().set_state(work.param_state)
    pyro.set_rng_seed(seed)
    model = work.model
    simulate_from = model.model if work.param_state is None else model
    resampled = _resample(work.data) if work.kind == "nonparametric" else _simulate(simulate_from, work.data)
    with warnings.catch_warnings(), intra_op_threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per replicate instead
        result = work.fit(model, data=resampled, **work.fit_options)
    converged = bool(getattr(result, "converged", True))
    if work.param_state is None:
        estimate = model.estimates()
    else:
        estimate = {name: pyro.param(name) for name in work.names}
    return {name: value.detach().numpy() for name, value in estimate.items()}, converged


def _resample(data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    n = data[0].shape[0]
    index = torch.randint(n, (n,))
    return tuple(x[index] if x.dim() and x.shape[0] == n else x for x in data)


def _simulate(model: Callable, data: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The data with each observed array replaced by a draw from the fitted model.

    An observed site is matched to the data array it observes (``obs=x[i]`` over
    the full plate equals ``x``); that array is replaced by the site's draw.
    """
    with torch.no_grad(), poutine.block():
        observed = poutine.trace(model).get_trace(*data)
        simulated = poutine.trace(poutine.uncondition(model)).get_trace(*data)
    out = list(data)
    for name, site in observed.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        value = site["value"]
        match = [j for j, x in enumerate(data) if x.shape == value.shape and torch.equal(x, value)]
        if not match:
            raise FreqviInputError(
                f"parametric bootstrap: the observed site {name!r} does not observe one of the data "
                "arrays whole; use kind='nonparametric' for this model."
            )
        out[match[0]] = simulated.nodes[name]["value"].to(data[match[0]].dtype)
    return tuple(out)
