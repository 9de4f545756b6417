"""F0.5 (threshold sweep), AUC and IoU agree with scikit-learn."""
import numpy as np
import pytest
import sklearn.metrics

from finetune.metrics import THRESHOLDS, ink_metrics, roc_auc


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
    nothing_predicted = ink_metrics(np.zeros((4, 4), np.float32), labels)
    assert nothing_predicted.f05 == 0.0
    assert np.isnan(roc_auc(np.random.default_rng(0).random(10), np.zeros(10)))  # one class: undefined
    with pytest.raises(ValueError, match="differ in shape"):
        ink_metrics(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.uint8))
