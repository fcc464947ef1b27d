"""Built-in models, each a :class:`~pyro.nn.PyroModule` with ``model`` and guides."""

from freqvi.models.base import ClosedFormEStep, ClosedFormMStep, LatentVariableModel
from freqvi.models.diffusion import ForwardNoising, GaussianDiffusion, TimeMLP
from freqvi.models.factor_analysis import FactorAnalysis
from freqvi.models.gaussian_mixture import GaussianMixture
from freqvi.models.noise_schedule import NoiseSchedule
from freqvi.models.random_intercept_logistic import RandomInterceptLogistic
from freqvi.models.vae import VAE, GaussianEncoder, mlp

__all__ = ["VAE", "ClosedFormEStep", "ClosedFormMStep", "FactorAnalysis", "ForwardNoising",
           "GaussianDiffusion", "GaussianEncoder", "GaussianMixture", "LatentVariableModel", "NoiseSchedule",
           "RandomInterceptLogistic", "TimeMLP", "mlp"]
