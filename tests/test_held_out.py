"""Held out means held out: no threshold is chosen on a scored pixel (the curves' scores, the no-skill band), the
calibration strip keeps a training tile away from every label and off the scored region, probes score their last
epoch (tests/test_evaluate_encoders.py), and a NaN prediction is an error naming the run, never a map of zeros."""
import types

import numpy as np
import pytest

from evaluate import label_efficiency
from finetune import metrics, outputs
from pretrain.data.segment import open_segment


def test_the_curves_threshold_comes_from_the_calibration_strip_never_the_scored_pixels():
    # Left half calibrates, right half is scored; ink in every other column. The strip's best threshold (its ink at
    # 0.5, the rest at 0.2) is 0.25; the scored region's own (ink 0.9, the rest 0.6) is 0.65, where it scores 1.
    ink_yx = np.zeros((8, 16), np.uint8)
    ink_yx[:, ::2] = 1
    calibration_yx, score_yx = np.zeros((8, 16), bool), np.zeros((8, 16), bool)
    calibration_yx[:, :8], score_yx[:, 8:] = True, True
    probabilities_yx = np.where(ink_yx > 0, 0.5, 0.2)
    probabilities_yx[:, 8:] += 0.4
    scoring = label_efficiency.Regions(np.zeros_like(score_yx), calibration_yx, score_yx, None, "")
    result = label_efficiency.scores(probabilities_yx, types.SimpleNamespace(inklabels=ink_yx), scoring)
    assert result["threshold"] == 0.25 and result["threshold_oracle"] == 0.65
    assert result["f05"] == pytest.approx(metrics.all_ink_f05(0.5)) and result["f05_oracle"] == 1.0


def test_the_no_skill_band_chooses_its_thresholds_off_the_scored_pixels():
    # Half the calibration strip is ink, a twentieth of the scored region: a threshold calibrated on the strip calls
    # far too much ink there, so skill-less maps score less at it than at the scored region's own best threshold.
    rng = np.random.default_rng(0)
    labels_yx = np.zeros((64, 128), np.uint8)
    labels_yx[:, :64] = rng.random((64, 64)) < 0.5
    labels_yx[:, 64:] = rng.random((64, 64)) < 0.05
    calibration_yx, scored_yx = np.zeros((64, 128), bool), np.zeros((64, 128), bool)
    calibration_yx[:, :64], scored_yx[:, 64:] = True, True
    band = metrics.no_skill_band(labels_yx, calibration_yx, scored_yx)
    assert band.blind_mean < band.oracle_mean - 0.003 and band.blind_p95 < band.oracle_p95


def test_the_calibration_strip_keeps_a_tile_from_every_label_and_off_the_scored_region(labelled_segment_path):
    segment = open_segment(labelled_segment_path)
    regions = label_efficiency.regions(segment, 0.4, 0.4, tile_size=32)
    assert regions.calibration_yx.any() and not (regions.calibration_yx & regions.score_yx).any()
    # The labelling part ends at x = 76; a 32-pixel tile holding x = 75 reaches x = 106; the strip starts after it.
    columns = np.flatnonzero(regions.calibration_yx.any(axis=0))
    assert columns.min() == 107 and columns.max() == 114 and np.flatnonzero(regions.score_yx.any(axis=0)).min() == 115
    # The guard: labels whose tiles reach the strip, or a strip that overlaps the scored region, are refused.
    near_yx = np.zeros(segment.shape[1:], np.uint8)
    near_yx[10, 76] = 1  # a pixel just past the labelling part (negatives are painted inside it: run_one)
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="would cover pixels"):
        label_efficiency.check_held_out([near_yx], regions, 32, "run x")
    label_efficiency.check_held_out([near_yx], regions, 31, "run x")  # a smaller tile stops short of the strip
    overlapping = label_efficiency.Regions(regions.label_yx, regions.calibration_yx | regions.score_yx,
                                           regions.score_yx, None, "")
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="overlap"):
        label_efficiency.check_held_out([], overlapping, 32, "run x")
    # A gap narrower than a tile leaves no pixel to choose thresholds on: one error line naming the options.
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="more than a training tile"):
        label_efficiency.regions(segment, 0.45, 0.45, tile_size=32)


def test_painted_negatives_stay_in_the_labelling_part():
    glyph_yx = np.zeros((40, 120), np.uint8)
    glyph_yx[18:22, 55:60] = 255  # near the labelling part's end at x = 60
    allowed_yx = np.zeros((40, 120), bool)
    allowed_yx[:, :60] = True
    painted_yx = label_efficiency.painted_negatives(glyph_yx, glyph_yx, allowed_yx)
    assert painted_yx.any() and not painted_yx[:, 60:].any()


def test_a_nan_prediction_is_an_error_naming_the_run_not_a_map_of_zeros():
    probabilities_yx = np.full((4, 6), 0.3)
    probabilities_yx[1, 2], probabilities_yx[3, 5] = np.nan, np.inf
    with pytest.raises(outputs.NonFinitePredictionError, match="run experiments/spark_k1 holds 2 NaN or infinite"):
        outputs.probability_image(probabilities_yx, "the prediction of run experiments/spark_k1")
    assert outputs.probability_image(np.full((2, 2), 0.5)).tolist() == [[128, 128], [128, 128]]
