"""Few-label fine-tuning curves: glyph choice is reproducible and never near the scoring region; a tiny run of the
command writes the table, CSV, plot and each run's prediction, and a rerun reuses every finished run."""
import csv
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch

from evaluate import label_efficiency
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.data.segment import open_segment
from pretrain.models import build_encoder
from tests.conftest import FINETUNE_TINY, REPO_ROOT


def test_glyph_sets_are_reproducible_nested_and_far_from_the_scoring_region(labelled_segment_path):
    segment = open_segment(labelled_segment_path)
    regions = label_efficiency.regions(segment, label_part=0.4, score_part=0.4)
    found = label_efficiency.glyphs(segment.inklabels, regions.label_yx, min_pixels=100)
    assert len(found) == 6  # the 16 × 10 blocks wholly left of x = 76: two columns of three
    for seed in (0, 1):
        sets = [label_efficiency.glyph_labels(found, segment.shape[1:], seed, count) > 0 for count in (1, 2, 4)]
        again = label_efficiency.glyph_labels(found, segment.shape[1:], seed, 4) > 0
        assert np.array_equal(sets[2], again)
        assert [scipy.ndimage.label(labels)[1] for labels in sets] == [1, 2, 4]
        assert (sets[0] <= sets[1]).all() and (sets[1] <= sets[2]).all()  # each seed's sets grow with k
        assert (sets[2] <= segment.inklabels.astype(bool)).all() and (sets[2] <= regions.label_yx).all()
        # Every scored pixel lies at least the gap (1 - 0.4 - 0.4 of the width) away from every labelled one.
        distance_yx = scipy.ndimage.distance_transform_edt(~sets[2])
        assert distance_yx[regions.score_yx].min() >= 0.2 * 192 - 1
    assert not np.array_equal(label_efficiency.glyph_labels(found, segment.shape[1:], 0, 2),
                              label_efficiency.glyph_labels(found, segment.shape[1:], 1, 2))
    assert regions.score_yx.any() and not (regions.score_yx & ~segment.mask).any()
    # Chance is F0.5 of calling every scored pixel ink: precision = its ink fraction q, recall = 1.
    q = segment.inklabels[regions.score_yx].astype(bool).mean()
    assert 0 < q < 1 and regions.chance_f05 == pytest.approx(1.25 * q / (0.25 * q + 1))


def test_curves_are_written_and_a_rerun_reuses_every_run(labelled_segment_path, tmp_path):
    torch.manual_seed(4)
    checkpoint.save(tmp_path / "pretrained.pth", "encoder", build_encoder("resnet18_3d_tiny").state_dict(),
                    InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32))
    pairs = list(zip(FINETUNE_TINY[::2], FINETUNE_TINY[1::2]))
    finetune = [item for name, value in pairs if name not in ("--MODEL", "--DEPTH", "--TILE_SIZE") for item in (name, value)]
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--encoders", "scratch",
               str(tmp_path / "pretrained.pth"), "--names", "scratch", "pretrained", "--segment",
               str(labelled_segment_path), "--glyphs", "1", "2", "--seeds", "1", "--label_part", "0.4", "--score_part",
               "0.4", "--min_glyph_pixels", "100", "--output", str(tmp_path / "curves"), "--", *finetune]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    curves = tmp_path / "curves"
    runs = list(csv.DictReader(open(curves / "runs.csv")))
    assert sorted((row["encoder"], row["glyphs"]) for row in runs) == [
        ("pretrained", "1"), ("pretrained", "2"), ("scratch", "1"), ("scratch", "2")]
    segment = open_segment(labelled_segment_path)
    scoring = label_efficiency.regions(segment, 0.4, 0.4).score_yx
    for row in runs:  # each run's score is the score of its own prediction PNG on the scoring region
        prediction = cv2.imread(str(curves / "runs" / row["name"] / "prediction.png"), cv2.IMREAD_UNCHANGED) / 255.0
        expected = label_efficiency.ink_metrics(prediction[scoring], segment.inklabels[scoring])
        assert float(row["f05"]) == expected.f05 and float(row["auc"]) == expected.auc
        assert int(row["scored_pixels"]) == scoring.sum() and int(row["labelled_pixels"]) == 160 * int(row["glyphs"])
    summary = list(csv.DictReader(open(curves / "label_efficiency.csv")))
    assert len(summary) == 4 and all(row["f05_min"] == row["f05_max"] == row["f05_mean"] for row in summary)  # one seed
    table = (curves / "label_efficiency.md").read_text()
    assert "| scratch | full |" in table and "| pretrained | full |" in table and "Does a pretrained encoder" in table
    assert (curves / "label_efficiency.png").read_bytes().startswith(b"\x89PNG")

    log = curves / "runs" / "scratch_full_k1_seed0" / "train.log"
    before = log.stat().st_mtime_ns
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log.stat().st_mtime_ns == before and list(csv.DictReader(open(curves / "runs.csv"))) == runs


def test_simulated_negatives_surround_the_glyphs_and_never_touch_ink(labelled_segment_path):
    segment = open_segment(labelled_segment_path)
    found = label_efficiency.glyphs(segment.inklabels, label_efficiency.regions(segment, 0.4, 0.4).label_yx, 100)
    glyphs_yx = label_efficiency.glyph_labels(found, segment.shape[1:], 0, 1) > 0
    negatives_yx = label_efficiency.painted_negatives(glyphs_yx.astype(np.uint8) * 255, segment.inklabels, segment.mask) > 0
    distance_to_ink = scipy.ndimage.distance_transform_edt(segment.inklabels == 0)
    distance_to_glyph = scipy.ndimage.distance_transform_edt(~glyphs_yx)
    assert negatives_yx.any() and (distance_to_ink[negatives_yx] > label_efficiency.NEGATIVES_CLEARANCE).all()
    assert (distance_to_glyph[negatives_yx] <= label_efficiency.NEGATIVES_REACH * 2 ** 0.5).all()
    assert not (negatives_yx & ~segment.mask).any()
    assert label_efficiency.arm("full", True, 2) == "full, negatives, round 2" and label_efficiency.arm("lpft", False, None) == "lpft"
