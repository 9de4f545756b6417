"""Pixel metrics of an ink probability map: F0.5 with a threshold sweep, AUC, average precision, IoU, and
the no-skill band of a scoring region.

F0.5 weighs precision twice as much as recall: a papyrologist is misled more by false ink than by
missing ink (the Kaggle ink-detection metric). `ink_metrics` reports the best F0.5 over a threshold sweep
and its threshold: an *oracle* when the sweep looks at the pixels it scores, since even a map without skill
gains from the choice. A claim is therefore scored at a threshold chosen elsewhere (`best_threshold` on
calibration pixels, then `f05_at`), beside the threshold-free AUC and average precision. The sweep starts at
0, where every pixel is called ink (chance), so the oracle never scores below chance. Counts come from sorted
scores, so one pass serves every threshold, and AUC is the exact rank statistic (ties averaged), equal to
scikit-learn's.
"""
import dataclasses

import numpy as np
import scipy.ndimage
import scipy.stats
import sklearn.metrics

THRESHOLDS = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
BETA = 0.5
# Skill-less maps for a scoring region's no-skill band: smooth noise, blob-sized like a prediction's strokes.
NO_SKILL_MAPS = 20
NO_SKILL_SMOOTHING_PX = 8.0


@dataclasses.dataclass
class InkMetrics:
    f05: float  # best F0.5 over THRESHOLDS (an oracle: chosen on these pixels)
    threshold: float  # the threshold that gives it (ink = probability ≥ threshold)
    precision: float  # at that threshold
    recall: float
    iou: float  # ink IoU at that threshold
    auc: float  # ROC AUC (nan when the labels hold only one class)
    ink_fraction: float  # of the labelled pixels
    pixels: int

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}{key}": value for key, value in dataclasses.asdict(self).items()}


def all_ink_f05(ink_fraction: float) -> float:
    """F0.5 of calling every pixel ink, the chance level: precision = the ink fraction, recall = 1."""
    return (1 + BETA**2) * ink_fraction / (BETA**2 * ink_fraction + 1)


def roc_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic; nan without both classes."""
    is_ink = labels.astype(bool).ravel()
    positives, negatives = int(is_ink.sum()), int((~is_ink).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(probabilities.ravel())  # ties get their average rank
    return float((ranks[is_ink].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def threshold_counts(probabilities: np.ndarray, labels: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """(4, T) pixel counts at each threshold (ink = probability ≥ threshold): true positives, false positives, false
    negatives and true negatives. The counts of several sets of pixels add up to those of all of them together, so
    one threshold can be chosen over several segments' calibration pixels without keeping them (`best_threshold_of`)."""
    if probabilities.shape != labels.shape:
        raise ValueError(f"probabilities {probabilities.shape} and labels {labels.shape} differ in shape")
    is_ink = labels.astype(bool).ravel()
    ink_scores = np.sort(probabilities.ravel()[is_ink])  # (P,)
    other_scores = np.sort(probabilities.ravel()[~is_ink])  # (N,)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    # Pixels at or above each threshold, per class: counts for every threshold at once.
    true_positives = len(ink_scores) - np.searchsorted(ink_scores, thresholds, side="left")  # (T,)
    false_positives = len(other_scores) - np.searchsorted(other_scores, thresholds, side="left")
    return np.stack([true_positives, false_positives, len(ink_scores) - true_positives,
                     len(other_scores) - false_positives])


def _f05_of(counts: np.ndarray) -> np.ndarray:
    """(T,) F0.5 of (4, T) threshold_counts."""
    true_positives, false_positives, false_negatives, _ = counts
    weighted = (1 + BETA**2) * true_positives
    denominators = weighted + BETA**2 * false_negatives + false_positives
    return np.divide(weighted, denominators, out=np.zeros(counts.shape[1]), where=denominators > 0)


def ink_metrics(probabilities: np.ndarray, labels: np.ndarray, thresholds=THRESHOLDS) -> InkMetrics:
    """Metrics of `probabilities` in [0, 1] against binary `labels`, both of the same shape (any); F0.5 at the
    threshold that is best on these very pixels (see the module doc)."""
    counts = threshold_counts(probabilities, labels, thresholds)
    f_scores = _f05_of(counts)
    is_ink = labels.astype(bool).ravel()
    best = int(np.argmax(f_scores))
    tp, fp, fn = (int(count) for count in counts[:3, best])
    return InkMetrics(
        f05=float(f_scores[best]),
        threshold=float(np.asarray(thresholds)[best]),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        iou=tp / (tp + fp + fn) if tp + fp + fn else 0.0,
        auc=roc_auc(probabilities, labels),
        ink_fraction=float(is_ink.mean()) if is_ink.size else float("nan"),
        pixels=int(is_ink.size),
    )


def best_threshold(probabilities: np.ndarray, labels: np.ndarray, thresholds=THRESHOLDS) -> float:
    """The threshold of the sweep with the highest F0.5 on these (calibration) pixels; the lowest on a tie."""
    return best_threshold_of(threshold_counts(probabilities, labels, thresholds), thresholds)


def best_threshold_of(counts: np.ndarray, thresholds=THRESHOLDS) -> float:
    """The threshold of the sweep with the highest F0.5 of (4, T) `counts` (threshold_counts, or a sum of them over
    several sets of pixels); the lowest on a tie."""
    return float(np.asarray(thresholds)[int(np.argmax(_f05_of(counts)))])


def f05_at(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """F0.5 with ink = probability ≥ `threshold`."""
    return float(_f05_of(threshold_counts(probabilities, labels, [threshold]))[0])


def average_precision(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (scikit-learn's step-wise sum); nan without ink pixels. Threshold-free,
    and unlike AUC it weighs the confident end of the map, where a labeler looks first."""
    is_ink = labels.astype(bool).ravel()
    if not is_ink.any():
        return float("nan")
    return float(sklearn.metrics.average_precision_score(is_ink, probabilities.ravel()))


@dataclasses.dataclass(frozen=True)
class NoSkillBand:
    """What maps without skill score on a region: the mean and the 95th percentile over NO_SKILL_MAPS smooth random
    maps, of F0.5 at a threshold chosen on the calibration pixels (`blind`) and at the region's own best threshold
    (`oracle`). A score inside the band is not evidence of skill."""

    chance_f05: float  # calling every scored pixel ink
    blind_mean: float
    blind_p95: float
    oracle_mean: float
    oracle_p95: float

    def describe(self) -> str:
        return (f"smooth random maps score F0.5 {self.blind_mean:.3f} (95th percentile "
                f"{self.blind_p95:.3f}) at a calibrated threshold, {self.oracle_mean:.3f} ({self.oracle_p95:.3f}) at "
                f"the oracle one; calling every pixel ink scores {self.chance_f05:.3f}")


def no_skill_band(labels_yx: np.ndarray, calibration_yx: np.ndarray, scored_yx: np.ndarray, seed: int = 0) -> NoSkillBand:
    """The no-skill band of the `scored_yx` pixels of binary `labels_yx` (Y, X), thresholds calibrated on
    `calibration_yx`, as every run is scored."""
    rng = np.random.default_rng(seed)
    blind, oracle = [], []
    for _ in range(NO_SKILL_MAPS):
        noise_yx = scipy.ndimage.gaussian_filter(rng.random(labels_yx.shape, dtype=np.float32), NO_SKILL_SMOOTHING_PX)
        map_yx = (noise_yx - noise_yx.min()) / max(float(noise_yx.max() - noise_yx.min()), 1e-12)
        threshold = best_threshold(map_yx[calibration_yx], labels_yx[calibration_yx])
        blind.append(f05_at(map_yx[scored_yx], labels_yx[scored_yx], threshold))
        oracle.append(float(_f05_of(threshold_counts(map_yx[scored_yx], labels_yx[scored_yx])).max()))  # no AUC needed
    return NoSkillBand(chance_f05=all_ink_f05(float(labels_yx[scored_yx].astype(bool).mean())),
                       blind_mean=float(np.mean(blind)), blind_p95=float(np.percentile(blind, 95)),
                       oracle_mean=float(np.mean(oracle)), oracle_p95=float(np.percentile(oracle, 95)))
