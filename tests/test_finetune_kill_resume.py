"""kill -9 a tiny fine-tuning run at random points (mid-epoch, mid-checkpoint-write) and resume it each time:
it finishes its epochs, logs each one, and leaves only whole checkpoints and no temp files."""
import json
import os
import pathlib
import random
import subprocess
import sys
import time

import cv2
import torch

from tests.conftest import FINETUNE_SHAPE as SHAPE
from tests.conftest import FINETUNE_TINY as TINY
from tests.conftest import REPO_ROOT
from tests.test_fault_tolerance import temporary_files

EPOCHS = 6  # more than five kills can complete: each kill lands before the run is done
# Ten steps per epoch: long enough to land a kill inside one on a fast machine, short enough for a quick test.
TILES_PER_EPOCH = 40


def epoch_records(log: pathlib.Path) -> list[dict]:
    # The text after the last newline may be a record still being written.
    complete_lines = log.read_text().split("\n")[:-1] if log.exists() else []
    return [record for record in map(json.loads, complete_lines) if record["event"] == "epoch"]


def kill_mid_write(process: subprocess.Popen, folder: pathlib.Path, writes_to_skip: int, deadline: float = 60) -> bool:
    """SIGKILL `process` while it writes its (writes_to_skip + 1)-th temp file in `folder` (last.pth, best.pth or
    a PNG). True if that file is still there afterwards: the kill landed mid-write, not just after the rename."""
    # A killed run's leftovers stay until the next run removes them at start-up; they are not this run's writes.
    leftovers = set(temporary_files(folder))
    writes_seen = set()
    started = time.time()
    while process.poll() is None and time.time() - started < deadline:
        writing = set(temporary_files(folder)) - leftovers
        writes_seen |= writing
        if writing and len(writes_seen) > writes_to_skip:
            process.kill()
            process.wait()
            return bool(set(temporary_files(folder)) - leftovers)
        time.sleep(0.0005)
    process.wait()
    return False


def kill_mid_epoch(process: subprocess.Popen, log: pathlib.Path, fraction: float, deadline: float = 60) -> bool:
    """Once `process` has logged an epoch, SIGKILL it `fraction` of that epoch's duration later. True if no epoch
    ended in between: the kill landed inside the next epoch. (Waiting for an epoch of this process's own makes sure
    it is training, not starting up or resuming.)"""
    records_before = len(epoch_records(log))
    started = time.time()
    while process.poll() is None and time.time() - started < deadline:
        records = epoch_records(log)
        if len(records) > records_before:
            time.sleep(fraction * records[-1]["seconds"])
            process.kill()
            process.wait()
            return len(epoch_records(log)) == len(records)
        time.sleep(0.002)
    process.wait()
    return False


def test_finetuning_survives_kill_9_at_random_points(labelled_segment_path, tmp_path):
    experiment = tmp_path / "killed"
    command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), *TINY, "--NUM_EPOCHS", str(EPOCHS),
               "--MIN_TILES_PER_EPOCH", str(TILES_PER_EPOCH), "--segment_id", str(labelled_segment_path),
               "--OUTPUT_DIR", str(tmp_path), "--exp_name", experiment.name]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    chooser = random.Random(5)
    kills = []
    for attempt in range(5):
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if attempt % 2 == 0:
            if kill_mid_write(process, experiment, writes_to_skip=chooser.randrange(3)):
                kills.append("mid-write")
        elif kill_mid_epoch(process, experiment / "log.jsonl", fraction=chooser.uniform(0.1, 0.9)):
            kills.append("mid-epoch")
        for checkpoint in experiment.glob("*.pth"):  # whatever is on disk after a kill loads
            torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert "mid-write" in kills and "mid-epoch" in kills, kills

    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    last = torch.load(experiment / "last.pth", map_location="cpu", weights_only=False)
    assert last["state"]["epoch"] == EPOCHS
    # An epoch killed before last.pth was renamed is trained again, so it may be logged twice, but none is missing.
    # Its later record is the one the run continued from.
    records = {record["epoch"]: record for record in epoch_records(experiment / "log.jsonl")}
    assert sorted(records) == list(range(1, EPOCHS + 1))
    assert not temporary_files(experiment)  # checkpoints' and PNGs' temp files alike: `.<name>.<pid>-<id>.tmp`
    best = torch.load(experiment / "best.pth", map_location="cpu", weights_only=False)
    assert best["state"]["epoch"] == min(records.values(), key=lambda record: record["val_loss"])["epoch"]
    assert cv2.imread(str(experiment / "prediction.png"), cv2.IMREAD_UNCHANGED).shape == SHAPE[1:]
