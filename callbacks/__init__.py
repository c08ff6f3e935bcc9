"""Lightning callbacks of HarmoFL-Lightning."""

from callbacks.harmonization import PRESETS, AmplitudeHarmonization
from callbacks.progress import RoundProgressBar

__all__ = ["PRESETS", "AmplitudeHarmonization", "RoundProgressBar"]
