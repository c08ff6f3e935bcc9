"""Lightning callbacks of HarmoFL-Lightning."""

from callbacks.feature_augmentation import FeatureAugmentation
from callbacks.frequency_interpolation import AmplitudeExchange
from callbacks.harmonization import PRESETS, AmplitudeHarmonization
from callbacks.progress import RoundProgressBar
from callbacks.random_normalization import RandomDomainNormalization
from callbacks.scaffold import Scaffold

__all__ = [
    "PRESETS",
    "AmplitudeExchange",
    "AmplitudeHarmonization",
    "FeatureAugmentation",
    "RandomDomainNormalization",
    "RoundProgressBar",
    "Scaffold",
]
