"""Calibration statistics and Expert / Layer / Block Drop for ce_export checkpoints."""

from ce_calibrate.stats import HEATMAP_FILE, STATS_FILE, calibrate, collect, perplexity
from ce_calibrate.trim import TrimError, trim

__all__ = ["HEATMAP_FILE", "STATS_FILE", "TrimError", "calibrate", "collect", "perplexity", "trim"]
