"""Guides that freqvi builds for any model: the q in the ELBO."""

from freqvi.guides.amortized import AmortizedNormal
from freqvi.guides.local_mean_field import LocalMeanField

__all__ = ["AmortizedNormal", "LocalMeanField"]
