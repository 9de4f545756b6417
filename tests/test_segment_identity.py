"""One segment, one identity, whatever its spelling (`pretrain.data.segment.segment_identity`): fine-tuning,
evaluate/transfer.py and finetune/predict.py treat every spelling of a segment as that segment, so a training segment
is never scored as held out; predict.py skips only what this segment, checkpoint and settings made; and one run per
folder (`pretrain.utils.folder_lock`)."""
import argparse
import itertools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from evaluate import encoder_input, transfer
from finetune import inference, outputs, predict, train
from finetune.config import Config, ConfigError
from finetune.model import build_ink_unet
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.data.segment import SegmentError, open_segment, segment_identity
from pretrain.utils import folder_lock, misc
from tests.conftest import FINETUNE_TINY, REPO_ROOT
from tests.loopback_server import LoopbackServer
from tests.synthetic import SERVER_SEGMENT_ID, random_volume, rectangle_mask, write_png, write_zarr_segment
from tests.test_pretrain import TINY as PRETRAIN_TINY

PYTHON_ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
PREDICT_SETTINGS = InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32)
pytestmark = pytest.mark.filterwarnings("ignore:.*mask")


def run_script(script: str, arguments: list[str], environment: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *arguments], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=240, env={**PYTHON_ENVIRONMENT, **(environment or {})})


# ---------------------------------------------------------------- every spelling of a segment is that segment


@pytest.fixture
def spellings(tmp_path, monkeypatch) -> list[list[str]]:
    """Groups of spellings the toolkit accepts, each group one segment, no two groups the same segment: demo seeds,
    an ID bare and with its scroll, a local folder relative, absolute, with a trailing slash and through a link, and
    a folder of the same name elsewhere."""
    for folder in ("a/seg.zarr", "b/seg.zarr"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "link.zarr").symlink_to(tmp_path / "a" / "seg.zarr")
    monkeypatch.chdir(tmp_path)
    return [
        ["demo:1", "demo:01", " demo:001", "demo:1 "],
        ["demo", "demo:0", "demo:00"],
        ["demo:2"],
        [SERVER_SEGMENT_ID, f"scroll1:{SERVER_SEGMENT_ID}", f"Scroll1:{SERVER_SEGMENT_ID}"],
        [f"scroll4:{SERVER_SEGMENT_ID}"],
        ["a/seg.zarr", "./a/seg.zarr/", str(tmp_path / "a" / "seg.zarr"), f"{tmp_path}/a/seg.zarr/", "link.zarr",
         "b/../a/seg.zarr"],
        ["b/seg.zarr", f"{tmp_path}/b/seg.zarr/"],
    ]


def test_spellings_of_one_segment_are_one_segment_to_train_transfer_and_predict(spellings):
    """For every pair of spellings (a, b): of one segment, fine-tuning refuses b as a validation segment beside a
    and as a second training segment, transfer.py refuses b held out beside a, and predict.py names and records
    them alike; of two segments, all accept them and predict.py names them apart."""
    options = argparse.Namespace(stride=16, tta=False)
    groups = [(group, spelling) for group, members in enumerate(spellings) for spelling in members]
    for (group_a, a), (group_b, b) in itertools.permutations(groups, 2):
        same = group_a == group_b
        assert (segment_identity(a) == segment_identity(b)) == same, (a, b)
        assert (predict.output_name(a) == predict.output_name(b)) == same, (a, b)
        assert (predict.made_by(a, "digest", options) == predict.made_by(b, "digest", options)) == same, (a, b)
        if same:
            with pytest.raises(ConfigError, match=f"segment {b} is in both segment_id and VALIDATION_SEGMENTS"):
                train.check_segments(Config(segment_id=["demo:5", a], VALIDATION_SEGMENTS=b))
            with pytest.raises(ConfigError, match=f"segment {b} is given twice"):
                train.check_segments(Config(segment_id=[a, b], VALIDATION_SEGMENTS=None))
            with pytest.raises(encoder_input.EvaluationError, match="is also in --segment_id"):
                transfer.check_segments(argparse.Namespace(segment_id=["demo:5", a], held_out=b))
            with pytest.raises(encoder_input.EvaluationError, match="twice"):
                transfer.check_segments(argparse.Namespace(segment_id=[a, b], held_out="demo:5"))
            with pytest.raises(SegmentError, match="is given twice"):
                outputs.output_names([a, b], unique=True)
        else:
            assert train.check_segments(Config(segment_id=[a], VALIDATION_SEGMENTS=b)) == [segment_identity(a),
                                                                                              segment_identity(b)]
            transfer.check_segments(argparse.Namespace(segment_id=[a], held_out=b))
            assert len(set(outputs.output_names([a, b], unique=True))) == 2


def test_identity_is_the_scroll_and_id_the_demo_seed_or_the_resolved_path(spellings, tmp_path):
    assert segment_identity("demo:01") == "demo:1" and segment_identity("demo") == "demo:0"
    assert segment_identity(SERVER_SEGMENT_ID) == f"scroll1:{SERVER_SEGMENT_ID}"
    assert segment_identity(SERVER_SEGMENT_ID, scroll="4") == f"scroll4:{SERVER_SEGMENT_ID}"  # pretraining's --scroll
    assert segment_identity("./a/seg.zarr/") == str(tmp_path / "a" / "seg.zarr")
    with pytest.raises(SegmentError, match="the seed after 'demo:' must be a whole number"):
        segment_identity("demo:one")
    # The evaluation scripts run fine-tuning in the repository root: a relative path goes to them resolved.
    assert encoder_input.segment_for_runs("./a/seg.zarr/") == str(tmp_path / "a" / "seg.zarr")
    assert encoder_input.segment_for_runs("demo:01") == "demo:01"
    arguments = transfer.parse_args(["--pretrained_path", "random", "--segment_id", "a/seg.zarr", "demo:1",
                                     "--held_out", "b/seg.zarr"])
    assert arguments.segment_id == [str(tmp_path / "a" / "seg.zarr"), "demo:1"]
    assert arguments.held_out == str(tmp_path / "b" / "seg.zarr")


def test_an_opened_segment_carries_its_identity(demo_family_cache, monkeypatch):
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(demo_family_cache))
    assert open_segment("demo:01").identity == "demo:1"


# ---------------------------------------------------------------- the three commands, as a user types them


def test_a_training_segment_spelled_otherwise_is_refused_as_validation_segment(demo_family_cache, tmp_path):
    result = run_script("finetune/train.py", ["--segment_id", "demo:1", "demo:2", "--VALIDATION_SEGMENTS", "demo:01",
                                              "--OUTPUT_DIR", str(tmp_path / "runs")],
                        {"SEGMENT_CACHE_DIR": str(demo_family_cache)})
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: segment demo:01 is in both segment_id and VALIDATION_SEGMENTS (as demo:1 too): a validation segment "
        "must be one the model never trains on"], result.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_server_segment_with_and_without_its_scroll_is_one_segment(server_layout, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(tmp_path / "cache"))
    with LoopbackServer(server_layout.root) as server:
        monkeypatch.setenv("VESUVIUS_DATA_URL", server.url)
        with pytest.raises(ConfigError) as raised:
            train.main(["--segment_id", SERVER_SEGMENT_ID, "--VALIDATION_SEGMENTS", f"scroll1:{SERVER_SEGMENT_ID}",
                        "--OUTPUT_DIR", str(tmp_path / "runs")])
        requests = list(server.requests)
    assert str(raised.value) == (f"segment scroll1:{SERVER_SEGMENT_ID} is in both segment_id and VALIDATION_SEGMENTS "
                                 f"(as {SERVER_SEGMENT_ID} too): a validation segment must be one the model never "
                                 "trains on")
    assert not requests and not (tmp_path / "runs").exists()  # refused before anything is downloaded or written


def test_transfer_refuses_a_held_out_segment_it_trains_on(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate/transfer.py", "--pretrained_path", "random", "--segment_id", "demo:1",
                                      "demo:2", "--held_out", "demo:01", "--question", "b", "--output",
                                      str(tmp_path / "transfer")])
    with pytest.raises(encoder_input.EvaluationError) as raised:
        transfer.main()
    assert str(raised.value) == ("--held_out demo:01 is also in --segment_id (as demo:1): the held-out segment must be "
                                 "one the probe does not train on whole")
    assert not (tmp_path / "transfer").exists()


# ---------------------------------------------------------------- predict.py: what it skips, names and says


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
    """An (untrained) fine-tuning checkpoint of the tiny UNet: predict.py reads it as a run's best.pth."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "best.pth"
    config = {"TTA": False, "BATCH_SIZE": 4, "INFERENCE_STRIDE": 16, "NUM_WORKERS": 0, "CPU_THREADS": 1,
              "DEPTH_POOL": "max", "OUTPUT_STRIDE": 4}
    checkpoint.save(path, "finetune", build_ink_unet("resnet18_3d_tiny").state_dict(), PREDICT_SETTINGS, config=config)
    return path


@pytest.fixture(scope="module")
def two_folders_one_name(tmp_path_factory) -> list[str]:
    """/…/a/seg.zarr and /…/b/seg.zarr: two segments of one folder name; a's has ink labels."""
    root = tmp_path_factory.mktemp("segments")
    paths = []
    for index, folder in enumerate("ab"):
        path = write_zarr_segment(root / folder / "seg.zarr", random_volume((12, 48, 64), seed=40 + index),
                                  chunks=(12, 48, 64))
        write_png(path / "mask.png", rectangle_mask((48, 64), margin=2))
        paths.append(str(path))
    labels = np.zeros((48, 64), np.uint8)
    labels[10:30, 8:40] = 255
    write_png(pathlib.Path(paths[0]) / "inklabels.png", labels)
    return paths


def test_predict_skips_only_what_this_segment_checkpoint_and_settings_made(model_checkpoint, two_folders_one_name,
                                                                           tmp_path, capsys):
    a, b = two_folders_one_name
    output = tmp_path / "predictions"
    common = ["--checkpoint", str(model_checkpoint), "--output_dir", str(output)]
    assert predict.main([*common, "--segment_id", a, "--overlay"]) == 0
    said = capsys.readouterr().out
    name_a, name_b = predict.output_name(a), predict.output_name(b)
    assert name_a != name_b and name_a.startswith("seg-") and name_b.startswith("seg-")
    assert f"overlay {output / name_a}_overlay.png" in said
    assert f"{a}: scored against its own ink labels" in said and "AUC" in said
    record = json.loads((output / f"{name_a}.json").read_text())
    assert record["made_by"]["segment"] == segment_identity(a) and record["score"]["pixels"] > 0
    assert record["made_by"]["checkpoint_sha256"] == misc.file_sha256(model_checkpoint)

    # The second folder's seg.zarr is its own segment: predicted, under its own name, A's files untouched.
    a_written = (output / f"{name_a}.png").stat().st_mtime_ns
    assert predict.main([*common, "--segment_id", b]) == 0
    said = capsys.readouterr().out
    assert "1 of 1 segment(s) to predict" in said and "skipped" not in said and "scored" not in said  # b: no labels
    assert (output / f"{name_a}.png").stat().st_mtime_ns == a_written
    assert json.loads((output / f"{name_b}.json").read_text())["made_by"]["segment"] == segment_identity(b)

    # The same segment, checkpoint and settings, spelled otherwise: skipped.
    assert predict.main([*common, "--segment_id", f"{a}/"]) == 0
    said = capsys.readouterr().out
    assert f"{a}/: skipped" in said and f"{a}/: scored against its own ink labels" in said  # the score recorded
    # Other settings, or another checkpoint under the same name: predicted again; the old overlay goes.
    assert predict.main([*common, "--segment_id", a, "--stride", "32"]) == 0
    assert "1 of 1 segment(s) to predict" in capsys.readouterr().out
    assert not (output / f"{name_a}_overlay.png").exists()
    other = tmp_path / "other" / model_checkpoint.name
    other.parent.mkdir()
    other.write_bytes(model_checkpoint.read_bytes() + b"\0")  # other bytes: another checkpoint, whatever its name
    assert predict.main(["--checkpoint", str(other), "--output_dir", str(output), "--segment_id", a, "--stride",
                         "32"]) == 0
    assert "1 of 1 segment(s) to predict" in capsys.readouterr().out


def test_the_overlay_has_a_colour_scale_from_grey_to_red(model_checkpoint, two_folders_one_name, tmp_path):
    output = tmp_path / "predictions"
    assert predict.main(["--checkpoint", str(model_checkpoint), "--output_dir", str(output), "--segment_id",
                         two_folders_one_name[1], "--overlay"]) == 0
    overlay = cv2.imread(str(output / f"{predict.output_name(two_folders_one_name[1])}_overlay.png"))
    scale = predict.colour_scale(overlay.shape[1])
    bar_row = scale[scale.shape[0] // 2]  # (X, 3) BGR, through the bar
    red_minus_blue = bar_row[:, 2].astype(int) - bar_row[:, 0].astype(int)
    assert red_minus_blue.max() > 40 and (bar_row == predict.SCALE_GREY).all(axis=1).any()  # grey to red
    assert any(np.array_equal(overlay[row:row + scale.shape[0]], scale) for row in range(overlay.shape[0]))


def test_a_stride_past_the_tile_is_one_error_and_writes_nothing(model_checkpoint, two_folders_one_name, tmp_path):
    with pytest.raises(predict.ArgumentError, match="--stride 48 is larger than the model's tile side 32: the pixels "
                                                    "between tiles would stay unpredicted"):
        predict.main(["--checkpoint", str(model_checkpoint), "--output_dir", str(tmp_path / "predictions"),
                      "--segment_id", two_folders_one_name[0], "--stride", "48"])
    assert not (tmp_path / "predictions").exists()


# ---------------------------------------------------------------- one run per folder


HOLDER = """import sys, time, types
sys.modules["pretrain.dist"] = types.SimpleNamespace(is_master=lambda: True)  # hack: rank 0 without torch's start-up
from pretrain.utils import folder_lock
for folder in sys.argv[1:]:
    folder_lock.hold(folder, "run")
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding the locks of the folders it is given (as a run holds its folder), killed with SIGKILL."""
    processes = []

    def start(*folders) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, folders)], cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, text=True, env=PYTHON_ENVIRONMENT)
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_run_in_a_folder_is_refused_naming_the_first_until_it_is_killed(
        holder, labelled_segment_path, model_checkpoint, two_folders_one_name, tmp_path):
    experiment, predictions = tmp_path / "runs" / "shared", tmp_path / "predictions"
    experiment.mkdir(parents=True)
    (experiment / "log.jsonl").write_text('{"event": "start"}\n')  # the first run's
    first = holder(experiment, predictions)
    result = run_script("finetune/train.py", [*FINETUNE_TINY, "--segment_id", str(labelled_segment_path),
                                              "--OUTPUT_DIR", str(tmp_path / "runs"), "--exp_name", "shared"])
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {experiment} is in use by another fine-tuning run: pid {first.pid} on host "
                           f"{socket.gethostname()} since ")
    assert (experiment / "log.jsonl").read_text() == '{"event": "start"}\n' and not (experiment / "last.pth").exists()
    with pytest.raises(folder_lock.FolderInUseError, match=f"is in use by another prediction run: pid {first.pid} "):
        predict.main(["--checkpoint", str(model_checkpoint), "--output_dir", str(predictions), "--segment_id",
                      two_folders_one_name[1]])
    assert not list(predictions.glob("*.png"))

    os.kill(first.pid, signal.SIGKILL)  # the lock files stay; the locks go with the process
    first.wait()
    assert (predictions / folder_lock.LOCK_FILE).exists()
    assert predict.main(["--checkpoint", str(model_checkpoint), "--output_dir", str(predictions), "--segment_id",
                         two_folders_one_name[1]]) == 0
    assert list(predictions.glob("*.png"))
    folder_lock.hold(experiment, "fine-tuning run")  # as train.py takes it
    folder_lock.release(experiment)


def test_pretraining_takes_the_lock_of_its_folder(holder, labelled_segment_path, tmp_path, monkeypatch):
    import pretrain.main

    exp_dir = tmp_path / "pretraining"
    first = holder(exp_dir)
    monkeypatch.setattr(sys, "argv", ["pretrain/main.py", *PRETRAIN_TINY, "--cpu_threads", "1", "--data_path",
                                      str(labelled_segment_path), "--exp_dir", str(exp_dir)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(folder_lock.FolderInUseError, match=f"in use by another pretraining run: pid {first.pid} "):
            pretrain.main.main()
    finally:
        torch.set_num_threads(threads)  # main sets this process's threads (cpu_threads)
    assert not (exp_dir / "log.jsonl").exists()


def test_a_stride_past_the_tile_is_refused_by_training_and_inference():
    config = Config(**{**train.DEFAULTS, "TILE_SIZE": 32, "INFERENCE_STRIDE": 48})
    with pytest.raises(ConfigError, match="INFERENCE_STRIDE 48 is larger than TILE_SIZE 32: the pixels between tiles "
                                          "would stay unpredicted"):
        train.check_settings(config, PREDICT_SETTINGS)
    with pytest.raises(ValueError, match="stride 48 is larger than the tile side 32"):
        inference.predict_segment(None, None, np.ones((64, 64), bool), PREDICT_SETTINGS, 48, 4, torch.device("cpu"))
