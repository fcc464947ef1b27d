"""freqvi: maximum-likelihood estimation of latent variable models on Pyro.

EM, variational EM, amortised VI, VAEs and diffusion models are one method:
maximise the ELBO of a model/guide pair over the model's parameters theta,
and over the guide's as the E-step.
"""

from freqvi import estimators, guides, models
from freqvi.infer import EMResult, FitResult, LogLikelihood, em, fit, log_likelihood

__version__ = "0.1.0"

__all__ = [
    "EMResult",
    "FitResult",
    "LogLikelihood",
    "em",
    "estimators",
    "fit",
    "guides",
    "log_likelihood",
    "models",
]
