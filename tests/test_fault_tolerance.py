"""Surviving faults: kill -9 at random points of a pretraining run, and a server that misbehaves on 20% of chunks."""
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pretrain.data.patches import InputSettings, RandomPatchDataset
from pretrain.data.remote import INCOMPLETE_DIR
from pretrain.data.segment import open_segment
from tests.conftest import (REPO_ROOT, SERVER_SEGMENTS, random_volume, rectangle_mask, server_folder, write_png,
                            write_zarr_segment)
from tests.loopback_server import LoopbackServer
from tests.test_remote import assert_cache_holds_only_whole_chunks

EPOCHS = 4
PRETRAIN = ["--model", "resnet18_3d_tiny", "--depth", "16", "--input_size", "64", "--bs", "2", "--samples_per_ep", "6",
            "--num_workers", "0", "--vis_every", "0", "--decoder_width", "32", "--ep", str(EPOCHS),
            "--keep_epoch_encoders", "True"]


def temporary_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return list(folder.glob(".*.tmp"))


def kill_when(process: subprocess.Popen, exp_dir: pathlib.Path, mode: str, delay: float, deadline: float = 60) -> bool:
    """SIGKILL `process` mid-checkpoint-write (as soon as a temp checkpoint appears) or after `delay` seconds
    into training. Returns True if it was killed before finishing."""
    started = time.time()
    while process.poll() is None and time.time() - started < deadline:
        log = exp_dir / "log.jsonl"
        if mode == "mid-write" and temporary_files(exp_dir):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if mode == "mid-epoch" and log.exists() and time.time() - log.stat().st_mtime > delay:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005)
    process.wait()
    return False


def test_pretraining_survives_kill_9_at_random_points(tmp_path):
    volume = random_volume((65, 128, 128), seed=41)
    segment = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(segment / "mask.png", rectangle_mask((128, 128), margin=4))
    exp_dir = tmp_path / "run"
    command = [sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), *PRETRAIN, "--data_path", str(segment),
               "--exp_dir", str(exp_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    chooser = random.Random(5)
    kills = []
    for attempt in range(5):
        mode = "mid-write" if attempt % 2 == 0 else "mid-epoch"
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if kill_when(process, exp_dir, mode, delay=chooser.uniform(0.05, 1.0)):
            kills.append(mode)
        for checkpoint in exp_dir.glob("*.pth"):  # whatever is on disk after a kill loads
            torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert "mid-write" in kills and "mid-epoch" in kills, kills

    finished = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    full = torch.load(exp_dir / "resnet18_3d_tiny_withdecoder_spark_style.pth", weights_only=False)
    assert full["epoch"] == EPOCHS - 1 and full["global_step"] == EPOCHS * 3
    assert not temporary_files(exp_dir)
    records = [json.loads(line) for line in (exp_dir / "log.jsonl").read_text().splitlines()]
    # Every epoch is logged and keeps its encoder (one killed before its full checkpoint is trained again).
    assert {record["epoch"] for record in records if record["event"] == "epoch"} == set(range(1, EPOCHS + 1))
    assert sorted(path.name for path in (exp_dir / "epochs").iterdir()) == [
        f"resnet18_3d_tiny_timm_style_ep{epoch:03d}.pth" for epoch in range(1, EPOCHS + 1)]


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
