"""Errors and warnings that freqvi raises.

Every check at a public entry point raises :class:`FreqviInputError` (a
``ValueError``) naming what was expected and what was found, before any
fitting starts.
"""


class FreqviError(Exception):
    """Base class of every error freqvi raises on purpose."""


class FreqviInputError(FreqviError, ValueError):
    """The data, a model, a guide or an option given to freqvi is not usable."""


class CheckpointError(FreqviError, OSError):
    """A checkpoint cannot be written: a full disk, a lost permission, another run writing it."""


class FreqviWarning(UserWarning):
    """Base class of freqvi's warnings."""


class ConvergenceWarning(FreqviWarning):
    """An iterative fit stopped at its iteration limit before its tolerance."""


class ImportanceSamplingWarning(FreqviWarning):
    """An importance-sampling estimate is not vouched for: its weights are heavy-tailed (PSIS k-hat > 0.7)."""


class UnestimableParetoKWarning(ImportanceSamplingWarning):
    """PSIS k-hat cannot be estimated (too few draws, or tied weights): the tails are not diagnosed."""


class DegenerateDataWarning(FreqviWarning):
    """The data are degenerate for the model (a constant column): only a floor on a variance bounds the
    likelihood there, so the estimate at that place is the floor, not a value the data chose."""


class FitInterruptedWarning(FreqviWarning):
    """A :func:`~freqvi.fit` or :func:`~freqvi.em` run was interrupted (Ctrl-C) and returned the result of
    the steps or iterations it had taken."""
