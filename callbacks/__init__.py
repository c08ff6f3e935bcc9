"""Lightning callbacks of HarmoFL-Lightning."""

from callbacks.harmonization import PRESETS, AmplitudeHarmonization
from callbacks.progress import RoundProgressBar
from callbacks.scaffold import Scaffold

__all__ = ["PRESETS", "AmplitudeHarmonization", "RoundProgressBar", "Scaffold"]
