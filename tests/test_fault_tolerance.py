"""Surviving faults: kill -9 at chosen points of a pretraining run, and a server that misbehaves on 20% of chunks."""
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from pretrain import checkpoint
from pretrain.data.patches import InputSettings, RandomPatchDataset
from pretrain.data.remote import INCOMPLETE_DIR
from pretrain.data.segment import open_segment
from tests.conftest import REPO_ROOT, assert_cache_holds_only_whole_chunks
from tests.kill_at import assert_same_weights, run_killed, temporary_files
from tests.synthetic import SERVER_SEGMENTS, random_volume, rectangle_mask, server_folder, write_png, write_zarr_segment
from tests.loopback_server import LoopbackServer

EPOCHS = 3
STEPS_PER_EPOCH = 3  # samples_per_ep / bs
# Default DataLoader workers (persistent) and TensorBoard images: the path users run, only smaller.
PRETRAIN = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--samples_per_ep", "6",
            "--decoder_width", "32", "--ep", str(EPOCHS), "--keep_epoch_encoders", "True"]
FULL_CHECKPOINT = "resnet18_3d_tiny_withdecoder_spark_style.pth"
# Where each run dies, in one of the next two epochs (so each kill leaves work for the next); one more run then
# finishes.
KILLS = ("rename", "step", "rename", "rename")


def epoch_writes(exp_dir: pathlib.Path, epoch: int) -> list[pathlib.Path]:
    """What pretrain/main.py writes at the end of `epoch` (1-based), in order: the encoder, its copy for this
    epoch, then the full checkpoint, which commits the epoch."""
    return [exp_dir / "resnet18_3d_tiny_timm_style.pth",
            exp_dir / "epochs" / f"resnet18_3d_tiny_timm_style_ep{epoch:03d}.pth", exp_dir / FULL_CHECKPOINT]


def epochs_in(path: pathlib.Path) -> int:
    """Epochs of training behind a checkpoint (0 if there is none)."""
    if not path.exists():
        return 0
    saved = checkpoint.read(path)
    return saved["epoch"] if saved["kind"] == "encoder" else saved["epoch"] + 1  # encoders count from 1


def epoch_losses(exp_dir: pathlib.Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (exp_dir / "log.jsonl").read_text().splitlines()]
    return [(record["epoch"], record["loss"]) for record in records if record["event"] == "epoch"]


def test_pretraining_survives_kill_9_at_chosen_points(tmp_path):
    volume = random_volume((65, 128, 128), seed=41)
    segment = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(segment / "mask.png", rectangle_mask((128, 128), margin=4))
    script = REPO_ROOT / "pretrain" / "main.py"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    uninterrupted, exp_dir = tmp_path / "uninterrupted", tmp_path / "run"
    reference = subprocess.run([sys.executable, str(script), *PRETRAIN, "--data_path", str(segment), "--exp_dir",
                                str(uninterrupted)], cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    arguments = [*PRETRAIN, "--data_path", str(segment), "--exp_dir", str(exp_dir)]
    chooser = random.Random(5)
    write_order = chooser.sample(range(3), 3)  # an epoch's three renames, each killed once (in an epoch chosen below)
    for attempt, kind in enumerate(KILLS):
        done = epochs_in(exp_dir / FULL_CHECKPOINT)
        output = tmp_path / f"kill{attempt}.txt"
        if kind == "rename":  # right before a rename: the temp file is written whole and not yet renamed
            write, epoch = write_order.pop(), chooser.randint(done + 1, min(done + 2, EPOCHS))
            rename = (epoch - done - 1) * len(epoch_writes(exp_dir, epoch)) + write + 1  # this run's writes
            died = run_killed(["--rename", str(rename)], script, arguments, output, environment)
            destination, temporary = epoch_writes(exp_dir, epoch)[write], pathlib.Path(died["temporary"])
            assert died["destination"] == str(destination), (died, epoch, write)
            assert temporary.parent == destination.parent and temporary.name.startswith(f".{destination.name}.")
            assert epochs_in(temporary) == epoch  # whole: it loads
            assert epochs_in(exp_dir / FULL_CHECKPOINT) == epoch - 1  # the epoch is not done: a resume trains it again
        else:  # right after an optimizer step: in the middle of an epoch, or at its end before its writes
            step = chooser.randint(done * STEPS_PER_EPOCH + 1, min(done + 2, EPOCHS) * STEPS_PER_EPOCH)  # global
            run_killed(["--step", str(step - done * STEPS_PER_EPOCH)], script, arguments, output, environment)
            assert epochs_in(exp_dir / FULL_CHECKPOINT) == (step - 1) // STEPS_PER_EPOCH
        # This run swept the temp files earlier kills left in exp_dir; only this kill's own may be there.
        own = [temporary] if kind == "rename" and temporary.parent == exp_dir else []
        assert [path for path in temporary_files(exp_dir) if path.parent == exp_dir] == own
        for saved in exp_dir.rglob("*.pth"):  # whatever is on disk after a kill loads
            checkpoint.read(saved)

    finished = subprocess.run([sys.executable, str(script), *arguments], cwd=REPO_ROOT, env=environment,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    full = checkpoint.read(exp_dir / FULL_CHECKPOINT)
    assert full["epoch"] == EPOCHS - 1 and full["global_step"] == EPOCHS * STEPS_PER_EPOCH
    # Killed and resumed four times, the run trained exactly what an uninterrupted one did: the same weights at
    # every epoch, the same losses. Every epoch is logged (one killed before its full checkpoint is trained and
    # logged again, with the same loss).
    compared = {*epoch_writes(exp_dir, EPOCHS), *(epoch_writes(exp_dir, epoch)[1] for epoch in range(1, EPOCHS))}
    for path in sorted(compared):
        assert_same_weights(path, uninterrupted / path.relative_to(exp_dir))
    assert sorted(set(epoch_losses(exp_dir))) == epoch_losses(uninterrupted)
    assert sorted(path.name for path in (exp_dir / "epochs").glob("*.pth")) == [
        f"resnet18_3d_tiny_timm_style_ep{epoch:03d}.pth" for epoch in range(1, EPOCHS + 1)]
    assert not temporary_files(exp_dir)  # in exp_dir/epochs/ too


@pytest.fixture
def served_segment(tmp_path):
    segment_id = "20230827161847"
    volume = random_volume((65, 192, 192), seed=43)
    zarr_path = tmp_path / "mirror" / SERVER_SEGMENTS / f"{segment_id}.zarr"
    write_zarr_segment(zarr_path, volume, zarr_format=2, slash_keys=True, chunks=(16, 32, 32))
    mask_path = server_folder(tmp_path / "mirror", segment_id) / f"{segment_id}_mask.png"  # in the volume package
    write_png(mask_path, rectangle_mask((192, 192), margin=8))
    return tmp_path / "mirror", segment_id


def sample_patches(segment_id: str, server_url: str, cache_dir: pathlib.Path) -> np.ndarray:
    segment = open_segment(segment_id, cache_dir=cache_dir, data_url=server_url, http_retries=8,
                           http_backoff_seconds=0.01)
    dataset = RandomPatchDataset([segment], InputSettings(depth=16, tile_size=48), samples_per_epoch=40, seed=9)
    return np.stack([dataset[0, index].numpy() for index in range(40)])


def test_twenty_percent_faulty_chunk_requests_give_byte_identical_samples(served_segment, tmp_path):
    mirror, segment_id = served_segment
    with LoopbackServer(mirror) as server:
        clean = sample_patches(segment_id, server.url, tmp_path / "clean_cache")
    faults = {"drop": 0.04, "truncate": 0.04, "delay": 0.04, "429": 0.04, "500": 0.04}
    with LoopbackServer(mirror, faults=faults, seed=7, delay_seconds=0.3) as server:
        faulty = sample_patches(segment_id, server.url, tmp_path / "faulty_cache")
        host = server.url.split("//")[1].replace(":", "_")
        assert set(server.fault_counts) == set(faults), server.fault_counts
        faulted = sum(server.fault_counts.values())
        assert 0.1 < faulted / server.chunk_requests() < 0.35  # about a fifth of chunk requests misbehaved
    assert faulty.tobytes() == clean.tobytes()
    assert_cache_holds_only_whole_chunks(tmp_path / "faulty_cache", mirror, host)
    assert not any((tmp_path / "faulty_cache" / INCOMPLETE_DIR).iterdir())
