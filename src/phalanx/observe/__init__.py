"""Observability: the per-worker `Recorder` (timeline events, step metrics) and the Chrome-trace
timeline. Below `comm` in the layer picture: it imports nothing else from phalanx."""

from .recorder import PHASES, Recorder
from .timeline import merge

__all__ = ["PHASES", "Recorder", "merge"]
