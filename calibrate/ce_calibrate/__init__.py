"""Calibration statistics and Expert / Layer / Block Drop for ce_export checkpoints."""

from ce_calibrate.data import BUILTIN, CORPUS, byte_tokens, prepare
from ce_calibrate.stats import HEATMAP_FILE, STATS_FILE, activation_ranges, calibrate, collect, perplexity
from ce_calibrate.trim import TrimError, trim

__all__ = ["BUILTIN", "CORPUS", "HEATMAP_FILE", "STATS_FILE", "TrimError", "activation_ranges", "byte_tokens",
           "calibrate", "collect", "perplexity", "prepare", "trim"]
