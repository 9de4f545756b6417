"""`python finetune/predict.py`: a trained model on other segments, exactly as train.py predicts its own, resumed
after a kill, one error line per bad input; and segment specs of any scroll (`scroll4:ID`), mixed in one list,
opened by pretraining and prediction alike through the loopback data server."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from finetune import outputs, predict
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.data.segment import SegmentError
from pretrain.models import build_encoder
from tests.conftest import FINETUNE_SHAPE, FINETUNE_TINY, REPO_ROOT
from tests.kill_at import run_killed, temporary_files
from tests.synthetic import (SERVER_LAYER_SEGMENT_ID, SERVER_SEGMENT_ID, random_volume, rectangle_mask, write_png,
                             write_zarr_segment)
from tests.loopback_server import LoopbackServer
from tests.test_pretrain import TINY as PRETRAIN_TINY
from tests.test_pretrain import run_pretrain

PREDICT = REPO_ROOT / "finetune" / "predict.py"
pytestmark = pytest.mark.filterwarnings("ignore:.*cropped its bottom/right padding")


def run_predict(arguments: list[str], environment: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREDICT), *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", **(environment or {})})


def read_grey(path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


@pytest.fixture(scope="module")
def trained_run(labelled_segment_path, tmp_path_factory):
    """A tiny two-epoch "validation" fine-tuning run on the labelled segment: its folder (best.pth, prediction.png)."""
    output = tmp_path_factory.mktemp("runs")
    result = subprocess.run([sys.executable, str(REPO_ROOT / "finetune" / "train.py"), *FINETUNE_TINY,
                             "--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(output), "--exp_name",
                             "tiny"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "tiny"


@pytest.fixture(scope="module")
def other_segments(tmp_path_factory) -> list[str]:
    """Three small unlabelled segments in three kinds of spec: two zarrs and a layer folder."""
    folder = tmp_path_factory.mktemp("other_segments")
    specs = []
    for index in range(2):
        path = write_zarr_segment(folder / f"segment_{index}.zarr", random_volume((16, 64, 96), seed=20 + index),
                                  chunks=(8, 64, 64))
        write_png(path / "mask.png", rectangle_mask((64, 96), margin=4))
        specs.append(str(path))
    layers = folder / "fragment" / "layers"
    layers.mkdir(parents=True)
    for index, layer in enumerate(random_volume((12, 48, 80), seed=30)):
        write_png(layers / f"{index:02d}.png", layer)
    write_png(layers.parent / "mask.png", rectangle_mask((48, 80), margin=4))
    specs.append(str(layers.parent))
    return specs


def test_prediction_is_exactly_train_py_s_own(trained_run, labelled_segment_path, tmp_path):
    output = tmp_path / "predictions"
    result = run_predict(["--checkpoint", str(trained_run / "best.pth"), "--segment_id", str(labelled_segment_path),
                          "--output_dir", str(output), "--overlay"])
    assert result.returncode == 0, result.stderr[-3000:]
    name = predict.output_name(str(labelled_segment_path))
    assert name.startswith("tiny-")  # the folder's name and a digest of its path
    ours = read_grey(output / f"{name}.png")
    assert ours.dtype == np.uint8 and ours.shape == FINETUNE_SHAPE[1:]
    assert np.array_equal(ours, read_grey(trained_run / "prediction.png"))
    overlay = read_grey(output / f"{name}_overlay.png")
    assert overlay.ndim == 3 and overlay.shape[1:] == (FINETUNE_SHAPE[2], 3) and overlay.shape[0] > FINETUNE_SHAPE[1]
    assert "row" in result.stderr  # the progress bar, in rows of the segment

    # An overlay asked for later is drawn from the prediction already written, which is kept.
    (output / f"{name}_overlay.png").unlink()
    predicted_at = (output / f"{name}.png").stat().st_mtime_ns
    assert predict.main(["--checkpoint", str(trained_run / "best.pth"), "--segment_id", str(labelled_segment_path),
                         "--output_dir", str(output), "--overlay"]) == 0
    assert (output / f"{name}.png").stat().st_mtime_ns == predicted_at
    assert np.array_equal(read_grey(output / f"{name}_overlay.png"), overlay)


def test_killed_after_the_first_segment_resumes_with_the_rest(trained_run, other_segments, tmp_path):
    output = tmp_path / "predictions"
    arguments = ["--checkpoint", str(trained_run / "last.pth"), "--segment_id", *other_segments,
                 "--output_dir", str(output)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    names = [f"{predict.output_name(spec)}.png" for spec in other_segments]
    died = run_killed(["--rename", "3"], PREDICT, arguments, tmp_path / "killed.log", environment)
    assert died["destination"] == str(output / names[1])  # the second PNG was being written (after a PNG, a record)
    assert sorted(path.name for path in output.glob("*.png")) == names[:1]
    assert temporary_files(output)  # the half-written PNG, never renamed
    first = output / names[0]
    first_written = first.stat().st_mtime_ns

    result = run_predict(arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{other_segments[0]}: skipped" in result.stdout and "2 of 3 segment(s) to predict" in result.stdout
    assert first.stat().st_mtime_ns == first_written
    assert sorted(path.name for path in output.glob("*.png")) == sorted(names)
    assert not temporary_files(output)
    assert read_grey(output / names[2]).shape == (48, 80)

    # What the resumed run wrote is what one uninterrupted run writes.
    straight = tmp_path / "straight"
    assert predict.main([*arguments[:-1], str(straight)]) == 0
    for name in names:
        assert np.array_equal(read_grey(output / name), read_grey(straight / name)), name


def test_torchrun_splits_the_tiles_and_writes_what_one_process_writes(trained_run, other_segments, tmp_path):
    arguments = ["--checkpoint", str(trained_run / "best.pth"), "--segment_id", *other_segments]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(PREDICT), *arguments, "--output_dir", str(tmp_path / "two")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("to predict on 2 process(es)") == 1  # rank 0 speaks (and writes) alone
    assert predict.main([*arguments, "--output_dir", str(tmp_path / "one")]) == 0
    for name in (f"{predict.output_name(spec)}.png" for spec in other_segments):
        two, one = read_grey(tmp_path / "two" / name), read_grey(tmp_path / "one" / name)
        # The band sums are added in another order across processes: a pixel may round to the next grey level.
        assert np.abs(two.astype(int) - one).max() <= 1, name


@pytest.mark.parametrize("case", ["pretraining checkpoint", "too few layers", "unknown scroll", "wrong scroll",
                                  "missing checkpoint"])
def test_bad_input_is_one_clear_error_and_writes_nothing(trained_run, labelled_segment_path, server_layout, tmp_path,
                                                         monkeypatch, case):
    good_checkpoint, segments = str(trained_run / "best.pth"), [str(labelled_segment_path)]
    if case == "pretraining checkpoint":
        good_checkpoint = str(tmp_path / "resnet18_3d_tiny_timm_style.pth")
        checkpoint.save(good_checkpoint, "encoder", build_encoder("resnet18_3d_tiny").state_dict(),
                        InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32))
        message = "holds encoder-only weights, not a fine-tuned ink model"
    elif case == "too few layers":
        thin = write_zarr_segment(tmp_path / "thin.zarr", random_volume((4, 64, 64), seed=3), chunks=(4, 64, 64))
        write_png(thin / "mask.png", rectangle_mask((64, 64)))
        segments.append(str(thin))
        message = f"segment {thin} has 4 layers, too few for the model, which reads resnet18_3d_tiny, 8 layers"
    elif case == "unknown scroll":
        segments.append(f"scroll9:{SERVER_SEGMENT_ID}")
        message = f"segment spec 'scroll9:{SERVER_SEGMENT_ID}': the data server http://127.0.0.1"
    elif case == "wrong scroll":  # the scroll-4 segment asked for under scroll 2
        segments.append(f"scroll2:{SERVER_LAYER_SEGMENT_ID}")
        message = f"Scroll2/PHercParis3.volpkg/paths/{SERVER_LAYER_SEGMENT_ID}/layers/00.tif"
    else:
        good_checkpoint = str(tmp_path / "nowhere" / "best.pth")
        message = f"checkpoint {good_checkpoint} does not exist"
    output = tmp_path / "predictions"
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(tmp_path / "cache"))
    with LoopbackServer(server_layout.root) as server:
        monkeypatch.setenv("VESUVIUS_DATA_URL", server.url)
        with pytest.raises((SegmentError, checkpoint.CheckpointError)) as raised:
            predict.main(["--checkpoint", good_checkpoint, "--segment_id", *segments, "--output_dir", str(output)])
    assert message in str(raised.value) and "\n" not in str(raised.value)
    if case == "wrong scroll":
        assert "(scroll=2)" in str(raised.value)
    assert not output.exists()


def test_a_bad_input_is_one_error_line_from_the_command(tmp_path):
    result = run_predict(["--checkpoint", str(tmp_path / "best.pth"), "--segment_id", "demo", "--output_dir",
                          str(tmp_path / "predictions")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: checkpoint {tmp_path / 'best.pth'} does not exist"]


def test_a_damaged_checkpoint_whose_checksum_key_was_renamed_is_one_error_line_and_no_prediction(trained_run,
                                                                                                 tmp_path):
    """The attack that loaded: every tensor zeroed and the checksum's key renamed by one byte; predict.py exited 0
    with an all-zero prediction."""
    saved = torch.load(trained_run / "best.pth", weights_only=True)
    saved["model"] = {key: torch.zeros_like(value) for key, value in saved["model"].items()}
    saved["checksuN"] = saved.pop("checksum")
    damaged = tmp_path / "best.pth"
    torch.save(saved, damaged)
    output = tmp_path / "predictions"
    result = run_predict(["--checkpoint", str(damaged), "--segment_id", "demo", "--output_dir", str(output)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"error: checkpoint {damaged} is damaged: it has a kind but no checksum (a "
                                          "corrupted copy or download); copy it again"]
    assert not list(output.rglob("*.png"))


def test_output_names_are_one_per_segment_fit_for_file_names(tmp_path):
    (tmp_path / "fragment1").mkdir()
    (tmp_path / "20230827161847.zarr").mkdir()
    assert predict.output_name("scroll4:20231107190228") == "scroll4_20231107190228"
    assert predict.output_name("20230827161847") == predict.output_name("scroll1:20230827161847") == "20230827161847"
    assert predict.output_name("demo:3") == predict.output_name("demo:03") == "demo_3"
    fragment = predict.output_name(f"{tmp_path}/fragment1/")
    assert fragment.startswith("fragment1-") and predict.output_name(f"{tmp_path}/fragment1") == fragment
    assert predict.output_name(f"{tmp_path}/20230827161847.zarr").startswith("20230827161847-")
    with pytest.raises(SegmentError, match="segment demo:03 is given twice \\(as demo:3 too\\)"):
        outputs.output_names(["demo:3", "demo:03"], unique=True)


# ---------------------------------------------------------------- segments of any scroll, in one list


def test_pretraining_opens_a_list_mixing_scrolls_and_local_zarrs(server_layout, other_segments, tmp_path, monkeypatch):
    """A scroll-1 segment zarr (a bare ID: --scroll's) and scroll-4 layer images, both from the loopback server,
    beside a local zarr, in one pretraining run."""
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(tmp_path / "cache"))
    with LoopbackServer(server_layout.root) as server:
        monkeypatch.setenv("VESUVIUS_DATA_URL", server.url)
        result = run_pretrain([*PRETRAIN_TINY, "--ep", "1", "--exp_dir", str(tmp_path / "run"), "--data_path",
                               SERVER_SEGMENT_ID, f"scroll4:{SERVER_LAYER_SEGMENT_ID}", other_segments[0]])
        assert result.returncode == 0, result.stderr[-3000:]
        assert "3 segment(s)" in result.stdout
        layers_read = {path for path in server.requests
                       if f"Scroll4/PHerc1667.volpkg/paths/{SERVER_LAYER_SEGMENT_ID}/layers/" in path}
        chunks_read = {path for path in server.requests if f"{SERVER_SEGMENT_ID}.zarr/0/" in path}
    assert len(layers_read) == 65 and chunks_read
    encoder = checkpoint.read(tmp_path / "run" / "resnet18_3d_tiny_timm_style.pth")
    assert set(checkpoint.input_settings(encoder).voxel_dtype.split("+")) == {"uint8", "uint16"}


def test_prediction_over_a_list_mixing_scrolls_from_the_server(trained_run, server_layout, tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(tmp_path / "cache"))
    output = tmp_path / "predictions"
    with LoopbackServer(server_layout.root) as server:
        monkeypatch.setenv("VESUVIUS_DATA_URL", server.url)
        assert predict.main(["--checkpoint", str(trained_run / "best.pth"), "--segment_id", SERVER_SEGMENT_ID,
                             f"scroll4:{SERVER_LAYER_SEGMENT_ID}", "--output_dir", str(output), "--stride", "32"]) == 0
    for name, mask in ((SERVER_SEGMENT_ID, server_layout.mask), (f"scroll4_{SERVER_LAYER_SEGMENT_ID}",
                                                                 server_layout.layer_mask)):
        prediction = read_grey(output / f"{name}.png")
        assert prediction.shape == mask.shape and not prediction[mask == 0].any() and prediction[mask > 0].any()


def test_scroll_spec_opens_the_segment_of_that_scroll_whatever_scroll_says(server_layout, tmp_path):
    from pretrain.data.segment import open_segment

    with LoopbackServer(server_layout.root) as server:
        options = dict(cache_dir=tmp_path / "cache", data_url=server.url)
        first, fourth = open_segment([SERVER_SEGMENT_ID, f"Scroll4:{SERVER_LAYER_SEGMENT_ID}"], scroll="1", **options)
        with pytest.raises(SegmentError, match="'abc' after 'scroll4:' is not a segment ID"):
            open_segment("scroll4:abc", **options)
    assert "/other/dev/scrolls/1/" in first.location and first.shape == server_layout.volume.shape
    assert "/Scroll4/PHerc1667.volpkg/" in fourth.location
    assert np.array_equal(fourth.volume[:, :, :], server_layout.layer_volume)
