r"""Training recipes: the settings of :func:`~freqvi.fit` that one kind of model is trained with.

A recipe names the choices a fit makes besides the model and the data: the estimator and its
options (for a diffusion model, how the time step :math:`t` is drawn), the parameter average
kept and left in the model (:mod:`freqvi.infer.averaging`), Adam's learning rate, the
minibatch size and the number of steps. ``freqvi diffusion``, the tour's diffusion stage and
tutorial 7 all fit with :data:`DIFFUSION`, so that they cannot drift apart: the command's
defaults are the recipe's fields, and a caller changes one field with
:func:`dataclasses.replace` (or ``recipe.fit(..., lr=...)``) rather than restating the rest.

Why here, in the drivers' layer: a recipe is a set of options of the fit driver and names no
network, so it sits beside :func:`~freqvi.fit`; the models stay free of training choices, and the
faces (the command, the tour, the tutorials) import the recipe from below as they import ``fit``.

The numbers behind each recipe are measured by ``benchmarks/diffusion_seeds.py`` (diffusion) and
``benchmarks/vae_averaging.py`` (VAE); each constant's docstring says what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from freqvi.infer.averaging import EMA, Polyak
from freqvi.infer.fit import FitResult, fit


@dataclass(frozen=True)
class Recipe:
    """The options of :func:`~freqvi.fit` one kind of model is trained with.

    :param loss: the estimator's name (:data:`freqvi.estimators.ESTIMATORS`).
    :param lr: Adam's learning rate.
    :param batch_size: observations per step (a data set with fewer rows is used whole at every step).
    :param num_steps: training steps.
    :param average: the parameter average kept beside the raw parameters, evaluated and left in the
        model at the end (:class:`~freqvi.EMA`, :class:`~freqvi.Polyak`), or ``None`` for the last
        iterate.
    :param loss_options: the estimator's keyword options as ``(name, value)`` pairs (e.g.
        ``(("time_sampling", "importance"),)``).
    """

    loss: str
    lr: float
    batch_size: int
    num_steps: int
    average: EMA | Polyak | None
    loss_options: tuple[tuple[str, Any], ...] = ()

    def options(self, num_rows: int | None = None) -> dict[str, Any]:
        """The keyword arguments of :func:`~freqvi.fit` this recipe stands for.

        :param num_rows: the data's number of rows, to cap ``batch_size`` by.
        """
        batch = self.batch_size if num_rows is None else min(self.batch_size, num_rows)
        return {"loss": self.loss, "lr": self.lr, "batch_size": batch, "num_steps": self.num_steps,
                "average": self.average, **dict(self.loss_options)}

    def fit(self, model, data, guide=None, **options) -> FitResult:
        """:func:`~freqvi.fit` with this recipe's options; ``options`` add to or override them.

        :param data: an array or a tuple of arrays in memory, as for :func:`~freqvi.fit`; the batch
            size is capped at its number of rows.
        :returns: the :class:`~freqvi.FitResult`; the model holds the recipe's average at the end.
        :raises ~freqvi.errors.FreqviInputError: as :func:`~freqvi.fit`, before any step.
        """
        rows = len(data[0] if isinstance(data, tuple) else data)
        return fit(model, data, guide, **{**self.options(rows), **options})


#: The diffusion recipe of ``freqvi diffusion``, the tour and tutorial 7: the time-subsampled ELBO
#: (:class:`~freqvi.estimators.TimeSubsampledELBO`) with the learned importance law of ``t``, Adam at
#: ``2e-3``, batches of 512, 5,000 steps, and :class:`~freqvi.EMA` with decay 0.9999 and warm-up left in
#: the model. Batches of 512 rather than a DDPM loop's 256: a fit's step has a fixed cost besides the
#: network's (Pyro's bookkeeping, the checks of :class:`~freqvi.infer.step.GuardedStep`, the average), so
#: at a given CPU time the larger batch sees more data per second. Measured by
#: ``benchmarks/diffusion_seeds.py`` (moons and eight Gaussians on a ring, five seeds, 30 CPU s each), the
#: average against the last iterate of the same run: the held-out bound lower in all ten runs (medians
#: 0.934 against 0.966 nats per dimension on moons, 0.593 against 0.641 on the ring), the energy distance
#: over its floor lower in seven (medians 1.58 against 3.14 and 0.97 against 2.42, worst 2.82 against 4.87
#: and 1.64 against 2.62); against the same loop, batches of 256 had given the ring a median energy
#: distance 1.33 times the loop's, batches of 512 0.89 times. Uniform ``t``, which the tour used before,
#: gave it a held-out bound of 1.003 nats per dimension against the command's 0.982 with importance ``t``.
#: With warm-up the decay is :math:`\min(0.9999, (1 + k)/(10 + k))`: the average spans about the last
#: tenth of the run up to 90,000 steps, where a decay of 0.999 stops growing at 1,000 steps.
DIFFUSION = Recipe(loss="time_subsampled", lr=2e-3, batch_size=512, num_steps=5000, average=EMA(0.9999),
                   loss_options=(("time_sampling", "importance"),))


#: The VAE recipe of ``freqvi vae`` (its defaults; the command adds early stopping on held-out data): the
#: mean-field ELBO (analytic KL), Adam at ``2e-3``, batches of 128, 3,000 steps, and no average. Measured
#: (``benchmarks/vae_averaging.py``, digits, five seeds, 3,000 steps, paired): an EMA (decay 0.999, warm-up)
#: raises the held-out ELBO by 0.089 nats per image (s.e. 0.018) but not the held-out log-likelihood
#: (-0.008, s.e. 0.007): it tightens the encoder, not the model, so it is not the default
#: (``freqvi vae --ema-decay 0.999`` turns it on); a Polyak average from the middle step lowers the
#: log-likelihood by 0.103 (s.e. 0.012).
VAE = Recipe(loss="mean_field", lr=2e-3, batch_size=128, num_steps=3000, average=None)
