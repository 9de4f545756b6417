"""The online ink probe (pretrain/probe.py): its tiles, whether it can fail both ways, and its place in pretraining."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import pretrain.main
from pretrain import methods, probe
from pretrain.data.patches import InputSettings
from pretrain.data.segment import SegmentError, open_segment
from pretrain.utils import arg_util, run_log
from tests.conftest import REPO_ROOT
from tests.kill_at import run_killed
from tests.test_methods import TOY_METHOD

# The labelled segment of conftest (24 × 128 × 192, ink blocks brightening layers 10-13): 6 tiles of 64, 24 of 32.
TINY = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--samples_per_ep", "4",
        "--num_workers", "0", "--cpu_threads", "1", "--vis_every", "0", "--decoder_width", "32", "--projector", "64-64",
        "--ep", "2"]
METHOD_SETTINGS = {"vicreg": ["--bs", "4", "--samples_per_ep", "8"]}
SETTINGS = InputSettings(model="resnet18_3d_tiny", depth=16, tile_size=32)


class SeesInk(torch.nn.Module):
    """An encoder whose one stage is the brightest voxel over depth, averaged over 4 × 4 pixels: on this segment,
    the ink label itself."""

    def forward(self, volume_bcdhw, hierarchical=True):
        brightest_bchw = volume_bcdhw.amax(dim=2)
        return [torch.nn.functional.avg_pool2d(brightest_bchw, 4).unsqueeze(2)]  # (B, 1, 1, T/4, T/4)


class Constant(SeesInk):
    def forward(self, volume_bcdhw, hierarchical=True):
        return [torch.ones_like(stage) for stage in super().forward(volume_bcdhw)]


def test_fitted_and_scored_tiles_never_share_a_pixel_and_both_hold_ink(labelled_segment_path, monkeypatch):
    segment = open_segment(labelled_segment_path)
    origins, fit = probe.choose_tiles(segment, 32, 24, seed=3)
    assert fit.sum() >= 1 and (~fit).sum() >= 1 and len(np.unique(origins, axis=0)) == len(origins)
    for first in origins[fit]:
        for second in origins[~fit]:
            assert np.abs(first - second).max() >= 32  # no pixel in both
    inked = [segment.inklabels[y : y + 32, x : x + 32].any() for y, x in origins]
    assert any(np.array(inked)[fit]) and any(np.array(inked)[~fit])
    assert not np.array_equal(origins, probe.choose_tiles(segment, 32, 24, seed=4)[0])  # the seed chooses

    # The guard: tiles offered on a grid finer than a tile would overlap, and are refused.
    finer_grid = probe.tile_origins
    monkeypatch.setattr(probe, "tile_origins", lambda segment, tile, stride, fraction: finer_grid(segment, tile, 16, fraction))
    with pytest.raises(ValueError, match="share pixels"):
        probe.choose_tiles(segment, 32, 24, seed=3)


def test_the_probe_finds_ink_an_encoder_shows_and_none_in_a_constant_one(labelled_segment_path):
    tiles = probe.read_tiles(open_segment(labelled_segment_path), SETTINGS, 24, seed=0)
    assert tiles.volumes.shape == (24, 1, 16, 32, 32)
    method = methods.get("spark")
    sees = probe.probe_encoder(method, SeesInk(), tiles, torch.device("cpu"), seed=0)
    assert sees.auc > 0.97 and sees.ap > 0.9 and sees.f05 > 0.8 > sees.f05_chance
    constant = probe.probe_encoder(method, Constant(), tiles, torch.device("cpu"), seed=0)
    assert constant.auc == 0.5 and constant.ap == pytest.approx(constant.ink_fraction)
    assert constant.f05 == pytest.approx(constant.f05_chance)
    assert probe.prediction_image(sees, tiles).shape == (1, 64, 4 * 32)


def test_a_probe_segment_without_labels_is_refused_and_a_data_path_without_them_turns_the_probe_off(tmp_path):
    from tests.synthetic import random_volume, write_zarr_segment

    unlabelled = write_zarr_segment(tmp_path / "unlabelled.zarr", random_volume((24, 64, 64), seed=1))
    args = arg_util.parse_args([*TINY, "--data_path", str(unlabelled), "--probe_segment", str(unlabelled)])
    args.fill_runtime("cpu", 1)
    with pytest.raises(SegmentError, match="probe_segment .*unlabelled.zarr has no ink labels"):
        probe.OnlineProbe.build(args, open_segment(args.data_path))
    args.probe_segment = ""
    assert not probe.OnlineProbe.build(args, open_segment(args.data_path)).enabled
    with pytest.raises(arg_util.ArgumentError, match="probe_every -1 is out of range: it must be ≥ 0"):
        arg_util.parse_args(["--probe_every", "-1"])


def probe_history(exp_dir) -> list[dict]:
    return [{key: value for key, value in record.items() if key.startswith("probe__")}
            for record in run_log.epochs(exp_dir)]


def run_main(arguments: list[str], monkeypatch) -> None:
    """pretrain/main.py in this process (no interpreter to start)."""
    monkeypatch.setattr(sys, "argv", ["pretrain/main.py", *arguments])
    threads = torch.get_num_threads()
    try:
        assert pretrain.main.main() == 0
    finally:
        torch.set_num_threads(threads)  # main sets this process's threads (cpu_threads)


def assert_two_probed_epochs(exp_dir) -> list[dict]:
    """Both epochs of a 2-epoch run probed, beside the one baseline, in log.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = probe_history(exp_dir)
    assert len(history) == 2
    for scalars in history:
        assert {f"probe__{name}{suffix}" for name in probe.SCORES for suffix in ("", "_random")} < set(scalars)
        assert all(math.isfinite(value) for value in scalars.values())
    baseline = run_log.records(exp_dir, probe.BASELINE_EVENT)
    assert len(baseline) == 1 and baseline[0]["probe__auc_random"] == history[0]["probe__auc_random"]
    assert len(baseline[0]["fit_origins"]) == len(baseline[0]["scored_origins"]) == 3
    events = EventAccumulator(str(exp_dir / "tensorboard_logs")).Reload()
    assert {"probe/auc", "probe/ap", "probe/f05", "probe/ap_chance", "probe/f05_chance", "probe/auc_random",
            "probe/ap_random", "probe/f05_random"} <= set(events.Tags()["scalars"])
    assert "probe/prediction_labels" in events.Tags()["images"]
    return history


# SparK's 2-epoch run is the killed and resumed one below.
@pytest.mark.parametrize("method", [*(name for name in methods.METHODS if name != "spark"), "toy"])
def test_a_two_epoch_pretraining_logs_the_probe_of_every_method(method, labelled_segment_path, tmp_path, monkeypatch):
    if method == "toy":  # a method written after the probe gets it too
        (tmp_path / "toy_method.py").write_text(TOY_METHOD)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setitem(methods.METHODS, "toy", "toy_method")
    run_main([*TINY, "--method", method, *METHOD_SETTINGS.get(method, []), "--data_path", str(labelled_segment_path),
              "--exp_dir", str(tmp_path / "run")], monkeypatch)
    assert_two_probed_epochs(tmp_path / "run")


def test_a_run_killed_and_resumed_keeps_one_probe_history(labelled_segment_path, tmp_path, monkeypatch, capsys):
    arguments = [*TINY, "--data_path", str(labelled_segment_path), "--exp_dir", str(tmp_path / "run")]
    # An epoch writes the encoder, then its log record, then the full checkpoint: dying before epoch 2's full
    # checkpoint (the 4th rename) leaves epoch 2 probed and logged, but not done.
    died = run_killed(["--rename", "4"], REPO_ROOT / "pretrain" / "main.py", arguments, tmp_path / "killed.txt",
                      {**os.environ, "OMP_NUM_THREADS": "1"})
    assert died["destination"].endswith("_withdecoder_spark_style.pth")
    killed_history = probe_history(tmp_path / "run")
    run_main(arguments, monkeypatch)
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "(read back from log.jsonl)" in printed
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines if line["event"] == "epoch"] == [1, 2, 2]  # epoch 2 trained twice
    history = assert_two_probed_epochs(tmp_path / "run")  # the baseline probed once, each epoch's probe once
    assert history[0] == killed_history[0]
    assert history[1] == pytest.approx(killed_history[1], rel=1e-4)  # the same training, probed again
