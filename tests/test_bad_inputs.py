"""Every user mistake, across the scripts, as a user meets it: one `error:` line naming the problem, a non-zero
exit, and nothing written or overwritten."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from pretrain.models import build_encoder
from tests.conftest import REPO_ROOT
from tests.loopback_server import LoopbackServer
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

PRETRAIN = [sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), "--model", "resnet18_3d_tiny", "--depth", "16",
            "--tile_size", "64", "--samples_per_ep", "4", "--num_workers", "0", "--cpu_threads", "1",
            "--decoder_width", "32", "--ep", "1"]
FINETUNE = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--MODEL", "resnet18_3d_tiny", "--DEPTH", "8",
            "--TILE_SIZE", "32", "--STRIDE", "32", "--BATCH_SIZE", "4", "--NUM_EPOCHS", "1", "--NUM_WORKERS", "0",
            "--CPU_THREADS", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and bad segments and checkpoints, built once."""
    folder = tmp_path_factory.mktemp("inputs")
    good = write_zarr_segment(folder / "good.zarr", random_volume((65, 128, 128), seed=51))
    write_png(good / "mask.png", rectangle_mask((128, 128), margin=4))
    labels = np.zeros((128, 128), np.uint8)
    labels[40:80, 30:90] = 255
    write_png(good / "inklabels.png", labels)
    write_png(good / "empty.png", np.zeros((128, 128), np.uint8))
    write_png(good / "wrong_size.png", np.zeros((100, 140), np.uint8))  # shorter and wider: not padding

    malformed = folder / "malformed.zarr"
    malformed.mkdir()
    (malformed / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"')

    mismatched = write_zarr_segment(folder / "mismatched.zarr", random_volume((65, 128, 128), seed=52))
    write_png(mismatched / "mask.png", rectangle_mask((128, 140), margin=4))

    with_nan = folder / "nan.zarr"
    root = zarr.open_group(with_nan, mode="w")
    volume = np.random.default_rng(0).random((65, 128, 128), dtype=np.float32)
    volume[20:45, 40:90, 40:90] = np.nan
    root.create_array("0", shape=volume.shape, chunks=(65, 64, 64), dtype="float32")[:] = volume
    write_png(with_nan / "mask.png", rectangle_mask((128, 128), margin=30))  # every crop overlaps the NaN block

    torch.save(build_encoder("resnet50_3d_narrow").state_dict(), folder / "narrow_encoder.pth")
    spark_run = folder / "spark_run"
    result = subprocess.run([*PRETRAIN, "--data_path", str(good), "--exp_dir", str(spark_run)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    blocker = folder / "a_file"
    blocker.write_text("not a folder")
    return {"good": good, "malformed": malformed, "mismatched": mismatched, "nan": with_nan, "folder": folder,
            "narrow": folder / "narrow_encoder.pth", "blocker": blocker,
            "spark": spark_run / "resnet18_3d_tiny_withdecoder_spark_style.pth"}


CASES = [
    # (script, arguments, what the error line must say)
    ("pretrain", ["--data_path", "20990101000000"], "segment 20990101000000 not found at http://127.0.0.1"),
    ("pretrain", ["--data_path", "{malformed}"], "malformed.zarr is not a readable zarr"),
    ("pretrain", ["--data_path", "{mismatched}"], "has shape (Y, X) = (128, 140), but the volume's (Y, X) is (128, 128)"),
    ("pretrain", ["--data_path", "{nan}"], "holds float32 voxels: a float volume is read only with the voxel values"),
    ("pretrain", ["--data_path", "{nan}", "--float_range", "0", "1"], "has non-finite voxels (NaN or inf)"),
    # Raised in a (default, persistent) DataLoader worker: the one line comes out of the worker's traceback.
    ("pretrain", ["--data_path", "{nan}", "--float_range", "0", "1", "--num_workers", "2"],
     "has non-finite voxels (NaN or inf)"),
    ("pretrain", ["--data_path", "{good}", "--tile_size", "256"], "tile size 256 is larger than segment good's"),
    ("pretrain", ["--data_path", "{good}", "--depth_offset", "30"], "outside the volume's 0..64"),
    ("pretrain", ["--data_path", "{good}", "--resume_from", "{folder}/missing.pth"], "missing.pth does not exist"),
    ("pretrain", ["--data_path", "{good}", "--model", "resnet50_3d_narrow", "--resume_from", "{spark}"],
     "holds a resnet18_3d_tiny model; this run builds resnet50_3d_narrow"),
    ("pretrain", ["--data_path", "{good}", "--init_weight", "{narrow}"], "it holds a resnet50_3d_narrow encoder: set --model"),
    ("pretrain", ["--data_path", "{good}", "--exp_dir", "{blocker}/run"], "is not writable"),
    ("pretrain", ["--data_path", "{good}", "--ep", "many"], "argument --ep: invalid int value: 'many'"),
    ("finetune", ["--segment_id", "{good}", "--inklabel_path", "wrong_size.png"], "(100, 140)"),
    ("finetune", ["--segment_id", "{good}", "--scheme", "iterative", "--inklabel_path", "empty.png"], "empty.png holds no ink"),
    ("finetune", ["--segment_id", "{good}", "--pretrained_path", "{narrow}"], "holds a resnet50_3d_narrow encoder"),
    ("finetune", ["--segment_id", "{good}", "--NUM_EPOCHS", "two"], "--NUM_EPOCHS expects int"),
    ("download", ["20990101000000"], "20990101000000.zarr"),
]


@pytest.mark.parametrize("script, arguments, message", CASES,
                         ids=[f"{case[0]}-{index}" for index, case in enumerate(CASES)])
def test_bad_input_is_one_clear_line_and_writes_nothing(inputs, tmp_path, script, arguments, message):
    arguments = [argument.format(**inputs) for argument in arguments]
    output = tmp_path / "outputs"
    output.mkdir()
    (output / "earlier_result.txt").write_text("keep me")
    with LoopbackServer(tmp_path) as server:  # serves an empty folder: every segment ID is unknown
        environment = {**os.environ, "VESUVIUS_DATA_URL": server.url, "SEGMENT_CACHE_DIR": str(tmp_path / "cache")}
        if script == "pretrain":
            command = [*PRETRAIN, *(["--exp_dir", str(output)] if "--exp_dir" not in arguments else []), *arguments]
        elif script == "finetune":
            command = [*FINETUNE, "--OUTPUT_DIR", str(output), "--save_path", str(output / "earlier_result.txt"),
                       *arguments]
        else:
            command = ["bash", str(REPO_ROOT / "download_segment.sh"), *arguments]
        result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (output / "earlier_result.txt").read_text() == "keep me"
    if "non-finite" in message:
        # Found only when a crop is read, after the run began its log: nothing is overwritten, no checkpoint written.
        assert not list(output.glob("*.pth"))
    else:
        # Found while checking the inputs, before anything is written.
        assert sorted(path.name for path in output.iterdir()) == ["earlier_result.txt"]
