"""`python finetune/train.py` on several segments: two demo segments train while a third validates, a band of each
segment held out with per-segment label files, each segment's prediction and metrics beside the pooled ones, and
one error line (writing nothing) for each misuse of the segment settings."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from finetune import train
from finetune.config import ConfigError, apply_overrides
from finetune.metrics import ink_metrics
from finetune.outputs import labels_vs_prediction
from pretrain.data.segment import open_segment
from tests.conftest import DEMO_FAMILY_SHAPE, REPO_ROOT
from tests.conftest import FINETUNE_TINY as TINY


def run_train(arguments, cache, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune" / "train.py"), *TINY, *arguments],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "SEGMENT_CACHE_DIR": str(cache)})


def read_log(experiment):
    return [json.loads(line) for line in (experiment / "log.jsonl").read_text().splitlines()]


def read_png(path):
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


@pytest.fixture(scope="module")
def held_out_segment_run(demo_family_cache, tmp_path_factory):
    """demo:1 and demo:2 train, demo:3 validates; returns (experiment folder, the process)."""
    output = tmp_path_factory.mktemp("segments")
    result = run_train(["--segment_id", "demo:1", "demo:2", "--VALIDATION_SEGMENTS", "demo:3", "--OUTPUT_DIR",
                        str(output), "--exp_name", "unseen"], demo_family_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "unseen", result


def test_two_segments_train_while_a_third_validates(held_out_segment_run, demo_family_cache, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    experiment, result = held_out_segment_run
    records = read_log(experiment)
    segments = records[0]["segments"]
    assert [(item["segment"], item["name"], item["trains"]) for item in segments] == [
        ("demo:1", "demo_1", True), ("demo:2", "demo_2", True), ("demo:3", "demo_3", False)]
    assert segments[0]["training_tiles"] > 0 and segments[1]["training_tiles"] > 0
    assert segments[2]["training_tiles"] == 0  # never trained on
    assert segments[0]["held_out"] is None and segments[1]["held_out"] is None  # no band: they train whole
    assert segments[2]["held_out"] == {"y0": 0, "y1": DEMO_FAMILY_SHAPE[1], "x0": 0, "x1": DEMO_FAMILY_SHAPE[2]}
    # Every epoch validates on demo:3 alone: its metrics, and the pooled ones, which over one segment are its own.
    epochs = [record for record in records if record["event"] == "epoch"]
    assert [record["epoch"] for record in epochs] == [1, 2]
    for record in epochs:
        assert list(record["validation_segments"]) == ["demo_3"]
        assert {key: record[f"validation_{key}"] for key in record["validation_segments"]["demo_3"]} == record["validation_segments"]["demo_3"]
    assert "; demo_3: F0.5" in result.stdout
    # A prediction per segment, named by it; demo:3's scored on the whole segment, recomputed from its PNG.
    for name in ("demo_1", "demo_2", "demo_3"):
        prediction = read_png(experiment / "predictions" / f"{name}.png")
        assert prediction.shape == DEMO_FAMILY_SHAPE[1:] and prediction.dtype == np.uint8
        # Its comparison image's caption names it (the caption depends only on its texts and the image width).
        comparison = read_png(experiment / "predictions" / f"{name}_labels_vs_prediction.png")
        height, width = DEMO_FAMILY_SHAPE[1:]
        expected = labels_vs_prediction(np.zeros((height, width), np.uint8), np.zeros((height, width)),
                                        np.ones((height, width), bool), segment=name.replace("_", ":"))
        assert np.array_equal(comparison[:-height], expected[:-height])
    assert not (experiment / "prediction.png").exists() and not (experiment / "labels_vs_prediction.png").exists()
    predictions = {record["segment"]: record for record in records if record["event"] == "prediction"}
    assert list(predictions) == ["demo:1", "demo:2", "demo:3"]
    assert "validation_f05" not in predictions["demo:1"] and "labelled_tiles_f05" in predictions["demo:1"]
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(demo_family_cache))
    unseen = open_segment("demo:3")
    rescored = ink_metrics(read_png(experiment / "predictions" / "demo_3.png")[unseen.mask] / 255.0,
                           unseen.inklabels[unseen.mask])
    assert predictions["demo:3"]["validation_pixels"] == rescored.pixels == np.count_nonzero(unseen.mask)
    assert abs(predictions["demo:3"]["validation_f05"] - rescored.f05) < 0.02
    assert abs(predictions["demo:3"]["validation_auc"] - rescored.auc) < 0.01
    pooled = records[-1]
    assert pooled["event"] == "pooled_prediction" and pooled["segments"] == ["demo_3"]
    assert pooled["validation_f05"] == predictions["demo:3"]["validation_f05"]
    assert pooled["validation_auc"] == predictions["demo:3"]["validation_auc"]
    events = EventAccumulator(str(experiment / "tensorboard_logs")).Reload()
    assert {"validation/f05", "validation/auc", "validation/loss", "validation_demo_3/f05", "validation_demo_3/auc"} <= set(events.Tags()["scalars"])
    assert {"validation/demo_3", "prediction/demo_1", "prediction/demo_3"} <= set(events.Tags()["images"])


def test_a_band_of_each_segment_is_held_out_and_pooled(demo_family_cache, labelled_segment_path, tmp_path, monkeypatch):
    """A demo segment with its own labels and a zarr with a label file given for it: each holds out a band, and the
    pooled metrics are those of both bands' pixels together."""
    result = run_train(["--segment_id", "demo:1", str(labelled_segment_path), "--inklabel_path", "None",
                        "inklabels.png", "--SEGMENT_SAMPLING", "equal", "--OUTPUT_DIR", str(tmp_path), "--exp_name",
                        "bands"], demo_family_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / "bands"
    records = read_log(experiment)
    segments = records[0]["segments"]
    assert [item["name"] for item in segments] == ["demo_1", "tiny"] and all(item["trains"] for item in segments)
    assert str(labelled_segment_path / "inklabels.png") in segments[1]["labels"]
    assert "demo:1's own ink labels" in segments[0]["labels"]
    for record in (record for record in records if record["event"] == "epoch"):
        per_segment = record["validation_segments"]
        assert record["validation_pixels"] == per_segment["demo_1"]["pixels"] + per_segment["tiny"]["pixels"]
        losses = [per_segment[name]["loss"] for name in per_segment]
        assert min(losses) <= record["validation_loss"] <= max(losses)  # the mean over both bands' tiles
    # The pooled prediction metrics, recomputed from both PNGs over both bands.
    probabilities, is_ink = [], []
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(demo_family_cache))
    for item in segments:
        segment = open_segment(item["segment"])
        band = item["held_out"]
        band_yx = np.zeros(segment.mask.shape, bool)
        band_yx[band["y0"]:band["y1"], band["x0"]:band["x1"]] = True
        band_yx &= segment.mask
        probabilities.append(read_png(experiment / "predictions" / f"{item['name']}.png")[band_yx] / 255.0)
        is_ink.append(segment.inklabels[band_yx] > 0)
    pooled = records[-1]
    rescored = ink_metrics(np.concatenate(probabilities), np.concatenate(is_ink))
    assert pooled["event"] == "pooled_prediction" and pooled["segments"] == ["demo_1", "tiny"]
    assert pooled["validation_pixels"] == rescored.pixels
    assert abs(pooled["validation_f05"] - rescored.f05) < 0.02 and abs(pooled["validation_auc"] - rescored.auc) < 0.01
    assert "pooled over the held-out pixels of demo_1, tiny" in result.stdout


def test_a_band_is_held_out_only_of_the_segments_given_a_fraction(demo_family_cache, monkeypatch):
    """VALIDATION_FRACTION one per segment (evaluate/transfer.py's question (a)): demo:1 trains whole, as a segment
    does beside VALIDATION_SEGMENTS, while demo:2 holds out the band that one fraction for all would give it."""
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(demo_family_cache))

    def run_segments(arguments):
        config = apply_overrides(train.DEFAULTS, [*TINY, *arguments], source_file=train.__file__)
        settings = train.encoder_and_input(config)[1]
        train.check_settings(config, settings)
        return train.open_run_segments(config, settings)

    whole, banded = run_segments(["--segment_id", "demo:1", "demo:2", "--VALIDATION_FRACTION", "0", "0.3"])
    band_of_each = run_segments(["--segment_id", "demo:1", "demo:2", "--VALIDATION_FRACTION", "0.3"])
    beside_a_validation_segment = run_segments(["--segment_id", "demo:1", "demo:2", "--VALIDATION_SEGMENTS", "demo:3"])
    assert whole.held_out is None and band_of_each[0].held_out is not None
    np.testing.assert_array_equal(whole.train_origins, beside_a_validation_segment[0].train_origins)
    assert banded.held_out == band_of_each[1].held_out and banded.held_out.x1 - banded.held_out.x0 == 64  # 0.3 × 192
    np.testing.assert_array_equal(banded.train_origins, band_of_each[1].train_origins)


@pytest.mark.parametrize("extra, message", [
    (["--segment_id", "demo:1", "demo:2", "--inklabel_path", "inklabels.png"],
     r"inklabel_path gives 1 file\(s\) for 2 segments: give one per segment"),
    (["--segment_id", "demo:1", "--VALIDATION_SEGMENTS", "demo:2", "--negatives_path", "a.png", "b.png", "c.png"],
     r"negatives_path gives 3 file\(s\) for 2 segments"),
    (["--segment_id", "demo:1", "demo:2", "--VALIDATION_SEGMENTS", "demo:2"],
     "segment demo:2 is in both segment_id and VALIDATION_SEGMENTS"),
    (["--segment_id", "demo:1", "demo:2", "--scheme", "iterative"], "scheme 'iterative' labels one segment at a time"),
    (["--segment_id", "demo:1", "demo:2", "demo:1"], "segment demo:1 is given twice"),
    (["--segment_id", "demo:1", "--VALIDATION_SEGMENTS", "demo:2", "--save_path", "prediction.png"],
     "save_path names one prediction PNG"),
    (["--SEGMENT_SAMPLING", "most"], "SEGMENT_SAMPLING 'most' is not one of area, equal"),
    (["--segment_id", "demo:1", "demo:2", "--VALIDATION_FRACTION", "0", "0.3", "0.3"],
     "VALIDATION_FRACTION gives 3 values for 2 segments of segment_id"),
    (["--segment_id", "demo:1", "demo:2", "--VALIDATION_FRACTION", "0", "0"], "one above 0, or nothing is held out"),
    (["--segment_id", "demo:1", "demo:2", "--VALIDATION_SEGMENTS", "demo:3", "--VALIDATION_FRACTION", "0", "0.3"],
     "VALIDATION_SEGMENTS whole segments instead: give one or the other"),
], ids=["too-few-label-files", "too-many-label-files", "trained-and-validated", "iterative", "twice", "save-path",
        "sampling", "fractions-count", "no-band", "bands-and-validation-segments"])
def test_segment_setting_errors_name_the_problem_and_write_nothing(demo_family_cache, tmp_path, monkeypatch, extra,
                                                                   message):
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(demo_family_cache))
    with pytest.raises(ConfigError, match=message):
        train.main([*TINY, "--OUTPUT_DIR", str(tmp_path / "runs"), *extra])
    assert not (tmp_path / "runs").exists()


def test_a_segment_error_is_one_line_with_exit_status_2(demo_family_cache, tmp_path):
    result = run_train(["--segment_id", "demo:1", "demo:2", "--inklabel_path", "inklabels.png", "--OUTPUT_DIR",
                        str(tmp_path)], demo_family_cache, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: inklabel_path gives 1 file")
    assert not list(tmp_path.iterdir())
