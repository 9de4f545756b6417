"""`python finetune/train.py` end to end on a tiny model and segment: every output file, iterative rounds,
resume, and one clear error line (overwriting nothing) for each user mistake."""
import dataclasses
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from finetune import data, train
from finetune.config import ConfigError
from finetune.metrics import ink_metrics
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.data.segment import SegmentError, open_segment
from pretrain.models import build_encoder
from tests.conftest import FINETUNE_SHAPE as SHAPE
from tests.conftest import FINETUNE_TINY as TINY
from tests.conftest import REPO_ROOT

def run_train(arguments, timeout=240, settings=TINY) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune" / "train.py"), *settings, *arguments],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def scored_from_png(prediction_png: np.ndarray, labels_yx: np.ndarray, where_yx: np.ndarray):
    """The metrics of a written uint8 prediction, recomputed from the PNG."""
    return ink_metrics(prediction_png[where_yx] / 255.0, labels_yx[where_yx])


@pytest.fixture(scope="module")
def finished_run(labelled_segment_path, tmp_path_factory):
    """A straight two-epoch "validation" run with the default DataLoader worker; returns (experiment folder,
    save_path, the process)."""
    output = tmp_path_factory.mktemp("runs")
    save_path = output / "elsewhere" / "prediction_for_editing.png"
    default_workers = [item for item in TINY if item not in ("--NUM_WORKERS", "0")]
    result = run_train(["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(output), "--exp_name", "straight",
                        "--save_path", str(save_path)], settings=default_workers)
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "straight", save_path, result


def test_validation_run_writes_every_output(finished_run, labelled_segment_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    experiment, save_path, _ = finished_run
    for name in ("last.pth", "best.pth", "prediction.png", "labels_vs_prediction.png", "log.jsonl"):
        assert (experiment / name).is_file(), name
    prediction = cv2.imread(str(save_path), cv2.IMREAD_UNCHANGED)
    assert prediction.shape == SHAPE[1:] and prediction.dtype == np.uint8
    assert np.array_equal(prediction, cv2.imread(str(experiment / "prediction.png"), cv2.IMREAD_UNCHANGED))
    comparison = cv2.imread(str(experiment / "labels_vs_prediction.png"))
    assert comparison.shape[1] == 2 * SHAPE[2] + 4 and comparison.shape[0] > SHAPE[1]  # a caption above the panels
    last = checkpoint.read(experiment / "last.pth")
    assert last["kind"] == "finetune" and last["config"]["NUM_EPOCHS"] == 2
    assert checkpoint.input_settings(last) == InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32)
    assert last["state"]["epoch"] == 2 and {"model", "optimizer", "commit"} <= set(last)
    records = [json.loads(line) for line in (experiment / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record["event"] == "epoch"]
    assert [record["epoch"] for record in epochs] == [1, 2]
    # best.pth is the epoch with the lowest validation loss, tracked across epochs.
    best_epoch = min(epochs, key=lambda record: record["validation_loss"])["epoch"]
    assert checkpoint.read(experiment / "best.pth")["state"]["epoch"] == best_epoch
    assert [record["best"] for record in epochs] == [True, epochs[1]["validation_loss"] < epochs[0]["validation_loss"]]
    # The reported metrics are those of the written prediction on the held-out band (up to the PNG's 8 bits).
    assert records[-1]["event"] == "prediction"
    band = records[0]["held_out"]
    band_yx = np.zeros(SHAPE[1:], bool)
    band_yx[band["y0"]:band["y1"], band["x0"]:band["x1"]] = True
    mask_yx = cv2.imread(str(labelled_segment_path / "mask.png"), cv2.IMREAD_UNCHANGED) > 0
    labels_yx = cv2.imread(str(labelled_segment_path / "inklabels.png"), cv2.IMREAD_UNCHANGED) > 0
    rescored = scored_from_png(prediction, labels_yx, band_yx & mask_yx)
    assert abs(rescored.f05 - records[-1]["validation_f05"]) < 0.02
    assert abs(rescored.auc - records[-1]["validation_auc"]) < 0.01
    events = EventAccumulator(str(experiment / "tensorboard_logs")).Reload()
    assert {"train/loss", "hp/lr", "validation/loss", "validation/f05", "validation/threshold", "validation/auc", "validation/iou"} <= set(events.Tags()["scalars"])
    assert {"prediction/labels_vs_prediction", "validation/labels_vs_prediction"} <= set(events.Tags()["images"])
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"])
    assert not list(experiment.glob(".*.tmp"))


def test_resume_continues_to_the_same_weights(finished_run, labelled_segment_path, tmp_path):
    arguments = ["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path), "--exp_name", "straight"]
    first = run_train([*arguments, "--STOP_AFTER_EPOCHS", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after epoch 1 of 2" in first.stdout and not (tmp_path / "straight" / "prediction.png").exists()
    second = run_train(arguments)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "epoch 1 of 2 done" in second.stdout
    expected = checkpoint.read(finished_run[0] / "last.pth")["model"]
    resumed = checkpoint.read(tmp_path / "straight" / "last.pth")["model"]
    for key in expected:
        assert torch.allclose(expected[key].float(), resumed[key].float(), atol=1e-6), key


def test_torchrun_two_processes_share_the_work(labelled_segment_path, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "finetune" / "train.py"), *TINY, "--segment_id", str(labelled_segment_path),
               "--OUTPUT_DIR", str(tmp_path), "--exp_name", "ddp"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout and result.stdout.count("epoch 2:") == 1  # rank 0 reports
    saved = checkpoint.read(tmp_path / "ddp" / "last.pth")
    assert not any(key.startswith("module.") for key in saved["model"])  # the unwrapped model is saved
    prediction = cv2.imread(str(tmp_path / "ddp" / "prediction.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(labelled_segment_path / "mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert prediction.shape == SHAPE[1:] and (prediction[mask] > 0).all()  # both processes' tiles were summed


def test_iterative_runs_record_one_round_per_label_file(labelled_segment_path, tmp_path):
    arguments = ["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path), "--exp_name", "letters",
                 "--scheme", "iterative"]
    first = run_train([*arguments, "--inklabel_path", "two_letters.png"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_train([*arguments, "--inklabel_path", str(labelled_segment_path / "three_letters.png")])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "round 2 starts" in second.stdout
    for round_number, label_file in ((1, "two_letters.png"), (2, "three_letters.png")):
        folder = tmp_path / "letters" / f"round_{round_number:02d}"
        used = cv2.imread(str(folder / "inklabels.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(used, cv2.imread(str(labelled_segment_path / label_file), cv2.IMREAD_UNCHANGED))
        assert cv2.imread(str(folder / "prediction.png"), cv2.IMREAD_UNCHANGED).shape == SHAPE[1:]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["round"] == round_number and label_file in metrics["labels"]
        # Scored against the segment's full labels where training saw none (the letters nobody labelled), and
        # against the labels trained on where training saw them: recomputed here from the written PNG.
        segment = open_segment(labelled_segment_path)
        labelled = dataclasses.replace(segment, inklabels=(used > 0).astype(np.uint8))
        seen_yx = data.tiles_region(data.training_origins(labelled, 32, 32, None, 0.01), 32, SHAPE[1:]) & segment.mask
        prediction = cv2.imread(str(folder / "prediction.png"), cv2.IMREAD_UNCHANGED)
        unlabelled = scored_from_png(prediction, segment.inklabels, segment.mask & ~seen_yx)
        assert metrics["unlabelled_area_pixels"] == unlabelled.pixels
        assert abs(metrics["unlabelled_area_f05"] - unlabelled.f05) < 0.02
        assert abs(metrics["labelled_tiles_f05"] - scored_from_png(prediction, used > 0, seen_yx).f05) < 0.02


def in_process_arguments(labelled_segment_path, tmp_path, *extra) -> list[str]:
    return [*TINY, "--CPU_THREADS", "0", "--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path / "runs"),
            "--save_path", str(tmp_path / "prediction.png"), *extra]


@pytest.mark.parametrize("extra, error, message", [
    (["--inklabel_path", "wrong_size.png"], SegmentError, r"wrong_size.png has shape \(Y, X\) = \(192, 128\).*\(128, 192\)"),
    (["--scheme", "iterative", "--inklabel_path", "empty.png"], SegmentError, "empty.png holds no ink"),
    (["--pretrained_path", "/nonexistent/encoder.pth"], checkpoint.CheckpointError, "/nonexistent/encoder.pth does not exist"),
    (["--pretrained_path", "NARROW"], checkpoint.CheckpointError,
     "do not fit resnet18_3d_tiny: it holds a resnet50_3d_narrow encoder: set MODEL resnet50_3d_narrow"),
    (["--pretrained_path", "DEPTH16"], checkpoint.CheckpointError,
     "DEPTH 8 differs from the encoder's 16 .*: leave DEPTH unset to use the encoder's"),
    (["--NUM_EPOCHS", "two"], ConfigError, "--NUM_EPOCHS expects int"),
    (["--EPOCHS", "2"], ConfigError, "unknown setting --EPOCHS; did you mean --NUM_EPOCHS"),
    (["--scheme", "active"], ConfigError, "scheme 'active' is not one of validation, iterative"),
    (["--TILE_SIZE", "48"], ConfigError, "TILE_SIZE 48 .* multiples"),
], ids=["wrong-size-labels", "empty-iterative-labels", "missing-pretrained", "other-architecture",
        "contradicts-the-encoder", "non-numeric", "unknown-setting", "unknown-scheme", "tile-size"])
def test_user_errors_name_the_problem_and_overwrite_nothing(labelled_segment_path, tmp_path, extra, error, message):
    if "NARROW" in extra:  # a bare state dict from elsewhere: the architecture is recognised from its shapes
        torch.save(build_encoder("resnet50_3d_narrow").state_dict(), tmp_path / "narrow.pth")
        extra = [str(tmp_path / "narrow.pth") if item == "NARROW" else item for item in extra]
    if "DEPTH16" in extra:  # an encoder pretrained on 16 layers, given DEPTH 8 by TINY
        checkpoint.save(tmp_path / "depth16.pth", "encoder", build_encoder("resnet18_3d_tiny").state_dict(),
                        InputSettings(model="resnet18_3d_tiny", depth=16, tile_size=32))
        extra = [str(tmp_path / "depth16.pth") if item == "DEPTH16" else item for item in extra]
    (tmp_path / "prediction.png").write_bytes(b"an earlier prediction")
    with pytest.raises(error, match=message):
        train.main(in_process_arguments(labelled_segment_path, tmp_path, *extra))
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "prediction.png").read_bytes() == b"an earlier prediction"


def test_an_error_is_one_line_on_stderr_with_exit_status_2(labelled_segment_path, tmp_path):
    result = run_train(["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path), "--inklabel_path",
                        "wrong_size.png"], timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: inklabel_path "), result.stderr
    assert not list(tmp_path.iterdir())
