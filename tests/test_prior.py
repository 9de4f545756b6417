"""Ink with no human label: a prior map of the segment becomes the first round's labels (its confident pixels by
rank, specks dropped), human labels win over it, the rounds then refine it, and a run killed inside a round resumes
to the same weights. A prior that is not a greyscale map of the segment is one error line."""
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from finetune import data
from pretrain.data.segment import open_segment
from pretrain.utils import run_log
from tests.conftest import FINETUNE_TINY, REPO_ROOT
from tests.synthetic import write_png
from tests.kill_at import kill_and_resume_training

UNKNOWN = data.UNKNOWN


def test_the_prior_ranks_become_labels_and_human_labels_win():
    prior = np.arange(20, dtype=np.float32).reshape(4, 5) / 19  # every value distinct, rising row by row
    region = np.ones((4, 5), bool)
    region[0, 0] = False  # outside the region: unknown, and not counted in the ranks
    labels = data.prior_labels(prior, region, ink_fraction=0.2, not_ink_fraction=0.5, min_ink_pixels=0)
    # 19 pixels in the region: the top 20 % (values at or above the 0.8 quantile) are ink, the bottom half not ink.
    ink_at, not_ink_at = np.quantile(prior[region], [0.8, 0.5])
    expected = np.where(prior >= ink_at, 1, np.where(prior <= not_ink_at, 0, UNKNOWN)).astype(np.uint8)
    expected[0, 0] = UNKNOWN
    assert np.array_equal(labels, expected)
    assert (labels == 1).sum() == 4 and (labels == 0).sum() == 10
    # Ranks, not values: any increasing transform of the prior gives the same labels.
    assert np.array_equal(data.prior_labels(prior ** 3 * 0.01, region, 0.2, 0.5, 0), labels)
    # A flat prior has no confident ink: ties go to not ink.
    assert not (data.prior_labels(np.full((4, 5), 0.5, np.float32), region, 0.2, 0.5, 0) == 1).any()
    # Human labels win wherever they say something.
    human_ink = np.zeros((4, 5), np.uint8)
    human_ink[0, 1] = 1  # the prior calls it not ink
    human_negatives = np.zeros((4, 5), np.uint8)
    human_negatives[3, 4] = 255  # the prior's most confident ink
    merged = data.with_human_labels(labels, human_ink, human_negatives)
    assert merged[0, 1] == 1 and merged[3, 4] == 0
    assert np.array_equal(merged[1:3], labels[1:3])


def test_ink_specks_under_the_minimum_become_unknown():
    labels = np.zeros((8, 8), np.uint8)
    labels[1:4, 1:4] = 1  # a stroke of 9 pixels
    labels[6, 6] = 1  # a lone speck
    labels[5, 0] = UNKNOWN
    cleaned = data.without_specks(labels, min_ink_pixels=4)
    assert cleaned[6, 6] == UNKNOWN and (cleaned[1:4, 1:4] == 1).all() and cleaned[5, 0] == UNKNOWN
    assert ((cleaned == labels) | ((labels == 1) & (cleaned == UNKNOWN))).all()
    assert np.array_equal(data.without_specks(labels, 0), labels)
    # Self-training rounds drop specks from their pseudo-labels the same way, before the human labels win.
    probabilities = labels.astype(np.float32) * 0.9
    human_ink = np.zeros((8, 8), np.uint8)
    pseudo = data.pseudo_labels(probabilities, np.ones((8, 8), bool), human_ink, None, 0.8, 0.2, min_ink_pixels=4)
    assert pseudo[6, 6] == UNKNOWN and (pseudo[1:4, 1:4] == 1).all()


def read_png(path: pathlib.Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def smooth_prior(labelled_segment_path: pathlib.Path) -> np.ndarray:
    """uint8 (Y, X): a prior with some skill and some error: the segment's ink labels blurred, plus smooth noise."""
    labels = read_png(labelled_segment_path / "inklabels.png").astype(np.float32) / 255
    noise = cv2.GaussianBlur(np.random.default_rng(3).standard_normal(labels.shape).astype(np.float32), (0, 0), 3)
    prior = cv2.GaussianBlur(labels, (0, 0), 2) + 0.3 * noise
    return np.clip((prior - prior.min()) / (prior.max() - prior.min()) * 255, 0, 255).astype(np.uint8)


def run_train(arguments: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune" / "train.py"), *FINETUNE_TINY, *arguments],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_prior_alone_trains_rounds_and_resumes_inside_one(labelled_segment_path, tmp_path):
    prior = smooth_prior(labelled_segment_path)
    write_png(tmp_path / "prior.png", prior)
    arguments = ["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path), "--scheme", "iterative",
                 "--PRIOR_PATH", str(tmp_path / "prior.png"), "--PRIOR_INK_FRACTION", "0.05",
                 "--PSEUDO_MIN_INK_PIXELS", "8", "--SELF_TRAINING_ROUNDS", "1", "--PSEUDO_INK_THRESHOLD", "0.5",
                 "--PSEUDO_NOT_INK_THRESHOLD", "0.3", "--MIN_TILES_PER_EPOCH", "24"]
    straight = run_train([*arguments, "--exp_name", "straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    segment = open_segment(labelled_segment_path)
    expected = data.prior_labels(prior.astype(np.float32) / 255, segment.mask, 0.05, 0.5, 8)
    first = tmp_path / "straight" / "round_01"
    # Round 1 trained on the prior's labels, and nothing else: the segment's own labels only score it.
    assert np.array_equal(read_png(first / "inklabels.png") > 0, expected == 1)
    assert np.array_equal(read_png(first / "negatives.png") > 0, expected == 0)
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["labels"].startswith(f"prior {tmp_path / 'prior.png'}") and "no human labels" in metrics["labels"]
    assert "unlabelled_area_f05" in metrics and "labelled_tiles_f05" not in metrics
    assert (tmp_path / "straight" / "round_02" / "prediction.png").is_file()

    # kill -9 inside round 2 (the self-training round), in its second epoch, then the same command again: the same
    # weights.
    # Each round counts its steps from 0; the kill counts the process's optimizer steps.
    round_one, round_two = (run_log.epochs(tmp_path / "straight", round_number=number) for number in (1, 2))
    kill_step = round_one[-1]["global_step"] + round_two[0]["global_step"] + 1
    resumed = kill_and_resume_training([*FINETUNE_TINY, *arguments], kill_step, tmp_path,
                                       {**os.environ, "OMP_NUM_THREADS": "1"})
    assert "round 2, epoch 1 of 2 done" in resumed


def test_human_labels_win_over_the_prior(labelled_segment_path, tmp_path):
    two_letters = read_png(labelled_segment_path / "two_letters.png") > 0
    prior = smooth_prior(labelled_segment_path)
    prior[two_letters] = 0  # the prior calls the labelled letters the least likely ink
    write_png(tmp_path / "prior.png", prior)
    result = run_train(["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path), "--exp_name", "run",
                        "--scheme", "iterative", "--inklabel_path", "two_letters.png",
                        "--PRIOR_PATH", str(tmp_path / "prior.png"), "--PRIOR_INK_FRACTION", "0.05"])
    assert result.returncode == 0, result.stderr[-3000:]
    ink = read_png(tmp_path / "run" / "round_01" / "inklabels.png") > 0
    not_ink = read_png(tmp_path / "run" / "round_01" / "negatives.png") > 0
    assert (ink >= two_letters).all() and (ink & ~two_letters).any() and not (not_ink & two_letters).any()
    metrics = json.loads((tmp_path / "run" / "round_01" / "metrics.json").read_text())
    assert "labelled_tiles_f05" in metrics  # scored against the human labels, where they chose the tiles


@pytest.mark.parametrize("name, make, message", [
    ("wrong_size.png", lambda prior: prior.T.copy(), "is 192 × 128 pixels, not the segment's 128 × 192"),
    ("colour.png", lambda prior: np.dstack([prior, prior // 2, prior]), "is a colour image"),
    ("not_an_image.png", None, "is not a readable image"),
])
def test_a_prior_that_is_not_a_greyscale_map_of_the_segment_is_one_error_line(labelled_segment_path, tmp_path, name,
                                                                               make, message):
    prior = smooth_prior(labelled_segment_path)
    if make is None:
        (tmp_path / name).write_bytes(b"not a png")
    else:
        write_png(tmp_path / name, make(prior))
    result = run_train(["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path / "out"),
                        "--scheme", "iterative", "--PRIOR_PATH", str(tmp_path / name)], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: PRIOR_PATH {tmp_path / name} ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_grey_priors_of_8_and_16_bits_and_grey_rgb_read_alike(labelled_segment_path, tmp_path):
    segment = open_segment(labelled_segment_path)
    prior = smooth_prior(labelled_segment_path)
    write_png(tmp_path / "grey8.png", prior)
    cv2.imwrite(str(tmp_path / "grey16.png"), prior.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "grey_rgb.png"), np.dstack([prior] * 3))
    read = [data.read_prior(tmp_path / name, segment) for name in ("grey8.png", "grey16.png", "grey_rgb.png")]
    assert read[0].dtype == np.float32 and read[0].max() <= 1
    assert np.allclose(read[0], read[1]) and np.array_equal(read[0], read[2])


def test_a_prior_needs_scheme_iterative_and_sensible_fractions(labelled_segment_path, tmp_path):
    write_png(tmp_path / "prior.png", smooth_prior(labelled_segment_path))
    result = run_train(["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path / "out"),
                        "--PRIOR_PATH", str(tmp_path / "prior.png"), "--PRIOR_INK_FRACTION", "0.6"], timeout=120)
    assert result.returncode == 2
    assert "PRIOR_PATH needs scheme 'iterative'" in result.stderr
    assert "need PRIOR_INK_FRACTION and PRIOR_NOT_INK_FRACTION above 0, together at most 1 (got 0.6, 0.5)" in result.stderr
    assert not (tmp_path / "out").exists()
