"""Paired comparisons over seeds: every evaluation compares encoders run with the same seeds (the same glyphs, the same
split and initialisation of everything else), so the difference per seed is the unit. Its mean gets a t interval (a
description), and a claim is decided by the paired sign-flip (permutation) test with Holm's step-down across the
comparisons made: runs take off or stay at chance, so differences are bimodal and a t interval's coverage is not
what it says, while the sign-flip test is exact for any distribution symmetric under no difference."""
import functools
import math

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
EXACT_FLIPS_UP_TO = 12  # seeds: every sign pattern (2^12 = 4096); more seeds draw SAMPLED_FLIPS patterns instead
SAMPLED_FLIPS = 4095


def paired_interval(differences: list[float]) -> tuple[float, float, float]:
    """Mean of paired differences and its CONFIDENCE t interval over seeds ((nan, nan) bounds for one seed)."""
    count, mean = len(differences), float(np.mean(differences))
    if count < 2:
        return mean, float("nan"), float("nan")
    half_width = scipy.stats.t.ppf((1 + CONFIDENCE) / 2, count - 1) * np.std(differences, ddof=1) / math.sqrt(count)
    return mean, mean - half_width, mean + half_width


def describe_interval(low: float, high: float) -> str:
    return "–" if math.isnan(low) else f"{low:+.3f} to {high:+.3f}"


@functools.cache
def sign_patterns(count: int) -> np.ndarray:
    """(F, count) ±1: every sign pattern of `count` seeds, or beyond EXACT_FLIPS_UP_TO the identity and
    SAMPLED_FLIPS fixed random ones (a seeded draw, so a p-value is the same on every rerun)."""
    if count <= EXACT_FLIPS_UP_TO:
        return 1 - 2 * ((np.arange(2**count)[:, None] >> np.arange(count)) & 1)
    drawn = np.random.default_rng(count).choice([-1, 1], size=(SAMPLED_FLIPS, count))
    return np.concatenate([np.ones((1, count), int), drawn])


def sign_flip_p(differences: list[float], margin: float = 0.0, alternative: str = "greater") -> float:
    """One-sided p-value of the paired sign-flip test on signed ranks (Wilcoxon's statistic): that the differences
    lie above `margin` ("greater") or below it ("less"). Under no difference each seed's sign is a coin flip; the
    p-value is the share of sign patterns (the observed one among them) whose statistic is at least the observed."""
    return float(sign_flip_p_many(np.asarray(differences, np.float64)[None, :], margin, alternative)[0])


def sign_flip_p_many(differences_en: np.ndarray, margin: float = 0.0, alternative: str = "greater") -> np.ndarray:
    """(E,) `sign_flip_p` of each row of (E, N) paired differences at once."""
    centred_en = np.asarray(differences_en, np.float64) - margin
    if alternative == "less":
        centred_en = -centred_en
    elif alternative != "greater":
        raise ValueError(f"alternative {alternative!r} is neither 'greater' nor 'less'")
    ranks_en = signed_ranks(centred_en)
    flipped_ef = np.abs(ranks_en) @ sign_patterns(centred_en.shape[1]).T  # (E, F) the statistic under each pattern
    observed_e = ranks_en.sum(axis=1)
    return np.mean(flipped_ef >= observed_e[:, None] - 1e-9, axis=1)  # ranks are multiples of 0.5: no rounding doubt


def holm(p_values: list[float], alpha: float) -> list[bool]:
    """Holm's step-down: which hypotheses are rejected with family-wise error at most `alpha`."""
    rejected = [False] * len(p_values)
    for rank, index in enumerate(sorted(range(len(p_values)), key=lambda index: p_values[index])):
        if p_values[index] > alpha / (len(p_values) - rank):
            break
        rejected[index] = True
    return rejected


def signed_ranks(centred_en: np.ndarray) -> np.ndarray:
    """(E, N) the signed ranks of each row's absolute values (ties averaged, exact zeros rank 0): the Wilcoxon
    statistic's terms, which a run that took off (or did not) moves by one rank, not by its whole F0.5."""
    ranks_en = scipy.stats.rankdata(np.abs(centred_en), axis=1)
    return np.where(centred_en == 0, 0.0, np.sign(centred_en) * ranks_en)
