"""Paired comparisons over seeds: every evaluation compares encoders run with the same seeds (the same glyphs, the same
split and initialisation of everything else), so the difference per seed is the unit, and its mean gets a t interval."""
import math

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its CONFIDENCE t interval over seeds ((nan, nan) bounds for one seed)."""
    count, mean = len(differences), float(np.mean(differences))
    if count < 2:
        return mean, float("nan"), float("nan")
    half_width = scipy.stats.t.ppf((1 + CONFIDENCE) / 2, count - 1) * np.std(differences, ddof=1) / math.sqrt(count)
    return mean, mean - half_width, mean + half_width


def describe_interval(low: float, high: float) -> str:
    return "–" if math.isnan(low) else f"{low:+.3f} to {high:+.3f}"
