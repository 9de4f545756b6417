"""kill -9 a tiny fine-tuning run at chosen points (after an optimizer step, right before a checkpoint's or an
image's rename) and resume it each time: it ends exactly where an uninterrupted run ends, logs every epoch, and
leaves only whole checkpoints and no temp files. On one segment, and on two training segments and a validation one."""
import json
import os
import pathlib
import random
import subprocess
import sys

import cv2
import pytest

from pretrain import checkpoint
from tests.conftest import FINETUNE_SHAPE as SHAPE
from tests.conftest import FINETUNE_TINY as TINY
from tests.conftest import REPO_ROOT
from tests.kill_at import assert_same_weights, run_killed, temporary_files

EPOCHS = 4
# TINY less its NUM_WORKERS 0: the kills land with the default DataLoader worker running.
WORKERS_AT = TINY.index("--NUM_WORKERS")
FINETUNE = [*TINY[:WORKERS_AT], *TINY[WORKERS_AT + 2:], "--NUM_EPOCHS", str(EPOCHS)]
# Where each run dies: after an optimizer step or right before a checkpoint's rename, in one of the next two
# epochs (so each kill leaves work for the next); last, right before an image's rename, after the last epoch.
# One more run then finishes.
KILLS = ("step", "rename", "step", "image")
# The segments of each run and the images its prediction renames into place last, in order.
RUNS = {
    "one-segment": (["--segment_id", "LABELLED"], ["prediction.png", "labels_vs_prediction.png"]),
    "several-segments": (["--segment_id", "demo:1", "demo:2", "--VALIDATION_SEGMENTS", "demo:3"],
                         [f"predictions/{name}{suffix}" for name in ("demo_1", "demo_2", "demo_3")
                          for suffix in (".png", "_labels_vs_prediction.png")]),
}


def epoch_records(experiment: pathlib.Path) -> list[dict]:
    records = map(json.loads, (experiment / "log.jsonl").read_text().splitlines())
    return [record for record in records if record["event"] == "epoch"]


def renames(best_epochs: set[int], first: int, last: int) -> list[str]:
    """The checkpoints that epochs `first` to `last` rename into place, in order (finetune/train.py): best.pth if
    the epoch is the best so far, then last.pth, which commits the epoch."""
    return [name for epoch in range(first, last + 1)
            for name in (["best.pth"] if epoch in best_epochs else []) + ["last.pth"]]


def epochs_done(experiment: pathlib.Path) -> int:
    last = experiment / "last.pth"
    return checkpoint.read(last)["state"]["epoch"] if last.exists() else 0


@pytest.mark.parametrize("run", RUNS)
def test_finetuning_survives_kill_9_at_chosen_points(labelled_segment_path, demo_family_cache, tmp_path, run):
    segments, prediction_images = RUNS[run]
    segments = [str(labelled_segment_path) if item == "LABELLED" else item for item in segments]
    script = REPO_ROOT / "finetune" / "train.py"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "SEGMENT_CACHE_DIR": str(demo_family_cache)}
    uninterrupted, experiment = tmp_path / "uninterrupted", tmp_path / "killed"
    arguments = [*FINETUNE, *segments, "--OUTPUT_DIR", str(tmp_path)]
    reference = subprocess.run([sys.executable, str(script), *arguments, "--exp_name", uninterrupted.name],
                               cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    reference_records = {record["epoch"]: record for record in epoch_records(uninterrupted)}
    best_epochs = {epoch for epoch, record in reference_records.items() if record["best"]}
    steps_per_epoch = checkpoint.read(uninterrupted / "last.pth")["state"]["global_step"] // EPOCHS

    arguments += ["--exp_name", experiment.name]
    chooser = random.Random(5)
    for attempt, kind in enumerate(KILLS):
        done = epochs_done(experiment)
        output = tmp_path / f"kill{attempt}.txt"
        if kind == "step":  # in the middle of an epoch, or at its end before validation
            step = chooser.randint(done * steps_per_epoch + 1, min(done + 2, EPOCHS) * steps_per_epoch)  # global
            run_killed(["--step", str(step - done * steps_per_epoch)], script, arguments, output, environment)
            assert epochs_done(experiment) == (step - 1) // steps_per_epoch
            left_behind = []
        else:  # right before a rename: the temp file is written whole and not yet renamed
            if kind == "rename":
                names = renames(best_epochs, done + 1, min(done + 2, EPOCHS))
                rename = chooser.randint(1, len(names))
            else:
                names = renames(best_epochs, done + 1, EPOCHS) + prediction_images
                rename = len(names) - chooser.randrange(len(prediction_images))
            died = run_killed(["--rename", str(rename)], script, arguments, output, environment)
            destination, temporary = experiment / names[rename - 1], pathlib.Path(died["temporary"])
            assert died["destination"] == str(destination), (died, names, rename)
            assert temporary.parent == destination.parent and temporary.name.startswith(f".{destination.name}.")
            if destination.suffix == ".pth":  # whole: it loads, or decodes
                checkpoint.read(temporary)
            else:
                image = cv2.imread(str(temporary), cv2.IMREAD_UNCHANGED)
                reference_image = uninterrupted / destination.relative_to(experiment)
                assert image.shape == cv2.imread(str(reference_image), cv2.IMREAD_UNCHANGED).shape
            # A killed epoch is not done (a resume trains it again); the epochs whose last.pth was renamed are.
            assert epochs_done(experiment) == done + names[:rename - 1].count("last.pth")
            left_behind = [temporary]
        # This run swept the temp files earlier kills left; only this kill's own may be there.
        assert temporary_files(experiment) == left_behind
        for saved in experiment.glob("*.pth"):  # whatever is on disk after a kill loads
            checkpoint.read(saved)

    finished = subprocess.run([sys.executable, str(script), *arguments], cwd=REPO_ROOT, env=environment,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert checkpoint.read(experiment / "last.pth")["state"]["epoch"] == EPOCHS
    assert not temporary_files(experiment)  # checkpoints' and images' temp files alike
    # Killed and resumed four times, the run trained and predicted exactly what an uninterrupted one did. An epoch
    # killed before last.pth was renamed is trained again, so it may be logged twice, each time the same.
    records = epoch_records(experiment)
    assert {record["epoch"] for record in records} == set(range(1, EPOCHS + 1))
    for record in records:
        reference_record = reference_records[record["epoch"]]
        metrics = [name for name in reference_record if name.startswith(("train_", "validation_")) or name == "best"]
        assert {name: record[name] for name in metrics} == {name: reference_record[name] for name in metrics}
    for name in ("last.pth", "best.pth"):
        assert_same_weights(experiment / name, uninterrupted / name)
    best = min(reference_records.values(), key=lambda record: record["validation_loss"])["epoch"]
    assert checkpoint.read(experiment / "best.pth")["state"]["epoch"] == best
    for image_name in prediction_images:
        prediction = cv2.imread(str(experiment / image_name), cv2.IMREAD_UNCHANGED)
        assert prediction.shape == cv2.imread(str(uninterrupted / image_name), cv2.IMREAD_UNCHANGED).shape
        assert (prediction == cv2.imread(str(uninterrupted / image_name), cv2.IMREAD_UNCHANGED)).all(), image_name
    if run == "one-segment":
        assert cv2.imread(str(experiment / "prediction.png"), cv2.IMREAD_UNCHANGED).shape == SHAPE[1:]
    else:  # the per-segment validation metrics, resumed too (compared above with every validation_ entry)
        assert all(list(record["validation_segments"]) == ["demo_3"] for record in records)
