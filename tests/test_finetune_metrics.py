"""F0.5 (threshold sweep, and at a calibrated threshold), AUC, average precision and IoU agree with scikit-learn;
the no-skill band holds what skill-less maps score."""
import numpy as np
import pytest
import sklearn.metrics

from finetune.metrics import (THRESHOLDS, all_ink_f05, average_precision, best_threshold, best_threshold_of, f05_at,
                              ink_metrics, no_skill_band, roc_auc, threshold_counts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.15
    # Informative but noisy scores, rounded so that ties occur (as uint8 predictions have).
    probabilities = np.round(np.clip(0.3 * labels + rng.normal(0.3, 0.2, labels.shape), 0, 1), 2).astype(np.float32)
    result = ink_metrics(probabilities, labels)
    f_scores = [sklearn.metrics.fbeta_score(labels, probabilities.astype(np.float64) >= threshold, beta=0.5, zero_division=0.0)
                for threshold in THRESHOLDS]
    assert result.f05 == pytest.approx(max(f_scores), abs=1e-12)
    assert result.threshold == THRESHOLDS[int(np.argmax(f_scores))]
    predicted = probabilities.astype(np.float64) >= result.threshold  # compared in float64, as the sweep
    assert result.precision == pytest.approx(sklearn.metrics.precision_score(labels, predicted), abs=1e-12)
    assert result.recall == pytest.approx(sklearn.metrics.recall_score(labels, predicted), abs=1e-12)
    assert result.iou == pytest.approx(sklearn.metrics.jaccard_score(labels, predicted), abs=1e-12)
    assert result.auc == pytest.approx(sklearn.metrics.roc_auc_score(labels, probabilities), abs=1e-12)
    assert result.pixels == 5000 and result.ink_fraction == pytest.approx(labels.mean())


def test_two_dimensional_maps_and_edge_cases():
    labels = np.zeros((4, 4), np.uint8)
    labels[1:3, 1:3] = 1
    perfect = ink_metrics(labels.astype(np.float32), labels)
    assert perfect.f05 == 1.0 and perfect.iou == 1.0 and perfect.auc == 1.0
    # The sweep starts at 0, where every pixel is ink: a map without skill is never scored below chance.
    nothing_predicted = ink_metrics(np.zeros((4, 4), np.float32), labels)
    assert nothing_predicted.f05 == pytest.approx(all_ink_f05(0.25)) and nothing_predicted.threshold == 0.0
    assert np.isnan(roc_auc(np.random.default_rng(0).random(10), np.zeros(10)))  # one class: undefined
    with pytest.raises(ValueError, match="differ in shape"):
        ink_metrics(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8))


def test_calibrated_threshold_and_average_precision():
    rng = np.random.default_rng(4)
    labels = rng.random(4000) < 0.2
    probabilities = np.round(np.clip(0.4 * labels + rng.normal(0.3, 0.2, labels.shape), 0, 1), 2)
    threshold = best_threshold(probabilities, labels)
    assert threshold == ink_metrics(probabilities, labels).threshold
    assert f05_at(probabilities, labels, threshold) == pytest.approx(ink_metrics(probabilities, labels).f05)
    expected = sklearn.metrics.fbeta_score(labels, probabilities >= 0.35, beta=0.5)
    assert f05_at(probabilities, labels, 0.35) == pytest.approx(expected, abs=1e-12)
    assert average_precision(probabilities, labels) == pytest.approx(
        sklearn.metrics.average_precision_score(labels, probabilities), abs=1e-12)
    assert np.isnan(average_precision(probabilities, np.zeros_like(labels)))


def test_no_skill_band_holds_skill_less_maps_and_not_a_good_one():
    rng = np.random.default_rng(1)
    labels_yx = np.zeros((200, 300), bool)
    for _ in range(40):  # strokes
        y, x = rng.integers(0, 190), rng.integers(0, 280)
        labels_yx[y:y + 6, x:x + 20] = True
    calibration_yx, scored_yx = np.zeros_like(labels_yx), np.zeros_like(labels_yx)
    calibration_yx[:, :100], scored_yx[:, 150:] = True, True
    band = no_skill_band(labels_yx, calibration_yx, scored_yx)
    assert band.chance_f05 == pytest.approx(all_ink_f05(labels_yx[scored_yx].mean()))
    # The oracle threshold lifts skill-less maps to chance or above; the band says how far.
    assert band.oracle_mean >= band.chance_f05 - 1e-9 and band.oracle_p95 >= band.oracle_mean
    assert band.blind_p95 < 0.6
    good_yx = np.clip(labels_yx * 0.7 + rng.random(labels_yx.shape) * 0.3, 0, 1)
    threshold = best_threshold(good_yx[calibration_yx], labels_yx[calibration_yx])
    assert f05_at(good_yx[scored_yx], labels_yx[scored_yx], threshold) > band.blind_p95 + 0.3


def test_held_out_band_is_scored_at_the_threshold_of_the_labelled_tiles():
    from finetune.data import Box
    from finetune.evaluation import prediction_metrics

    rng = np.random.default_rng(2)
    labels_yx = (rng.random((64, 96)) < 0.2).astype(np.uint8)
    # Training tiles predict ink at 0.6, the band at 0.9: the band's own best threshold would be 0.9.
    probabilities_yx = np.where(labels_yx == 1, 0.6, 0.3).astype(np.float32)
    band = Box(0, 64, 64, 96)
    probabilities_yx[:, 64:] = np.where(labels_yx[:, 64:] == 1, 0.9, 0.5)
    metrics = prediction_metrics(probabilities_yx, labels_yx, np.ones_like(labels_yx, bool), band,
                                 np.array([[0, 0], [0, 32], [32, 0], [32, 32]]), 32, None)
    assert metrics["validation_calibrated_threshold"] == pytest.approx(0.35)  # 0.3 < t ≤ 0.6, the lowest such
    band_labels = labels_yx[:, 64:] == 1
    assert metrics["validation_calibrated_f05"] == pytest.approx(f05_at(probabilities_yx[:, 64:], band_labels, 0.35))
    assert metrics["validation_calibrated_f05"] < metrics["validation_f05"] == 1.0
    assert metrics["validation_average_precision"] == pytest.approx(1.0)


def test_a_threshold_chosen_over_several_segments_from_their_summed_counts():
    """A run on several segments chooses one threshold over all their calibration pixels from counts, without
    keeping the pixels: the sum of each part's counts chooses what the parts put together would."""
    from finetune.evaluation import validation_metrics

    rng = np.random.default_rng(3)
    parts = []
    for shift in (0.1, 0.3):  # two segments whose ink scores differ: neither alone chooses the pooled threshold
        labels = rng.random(3000) < 0.2
        parts.append((np.round(np.clip(0.3 * labels + rng.normal(shift, 0.15, labels.shape), 0, 1), 2), labels))
    counts = sum(threshold_counts(probabilities, labels) for probabilities, labels in parts)
    together = [np.concatenate(column) for column in zip(*parts)]
    assert best_threshold_of(counts) == best_threshold(*together)
    assert (counts.sum(axis=0) == 6000).all()  # every pixel counted once at each threshold
    held_out = np.round(rng.random(500), 2), rng.random(500) < 0.2
    metrics = validation_metrics(*held_out, counts)
    assert metrics["validation_calibrated_threshold"] == best_threshold(*together)
    assert metrics["validation_calibrated_f05"] == f05_at(*held_out, best_threshold(*together))
    one_class = threshold_counts(parts[0][0], np.zeros(3000, bool))  # nothing to choose between: no calibrated F0.5
    assert "validation_calibrated_f05" not in validation_metrics(*held_out, one_class)
