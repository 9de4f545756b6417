"""The unsupervised ink map finds ink that any encoder must see, and writes its maps and scores."""
import json
import subprocess
import sys

import numpy as np

from tests.conftest import REPO_ROOT
from tests.synthetic import rectangle_mask, write_png, write_zarr_segment


def test_ink_map_finds_obvious_ink_without_labels_and_scores_it(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.integers(90, 110, (65, 128, 192), dtype=np.uint8)
    ink = np.zeros((128, 192), np.uint8)
    ink[:, 32:64] = ink[:, 128:160] = 1  # two wide bands, much brighter through every layer
    volume[:, ink > 0] += 120
    segment = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(segment / "mask.png", rectangle_mask((128, 192), margin=1))
    write_png(segment / "inklabels.png", ink * 255)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate" / "ink_map.py"), "--pretrained_path", "random", "--model",
         "resnet18_3d_tiny", "--segment_id", str(segment), "--depth", "16", "--tile_size", "32", "--components", "3",
         "--clusters", "2", "--output", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "out" / "ink_map.json").read_text())
    assert scores["grid_factor"] == 4 and abs(scores["ink_fraction"] - 1 / 3) < 0.05
    assert scores["best_component"]["f05"] > 0.8 and scores["best_component"]["auc"] > 0.9
    assert scores["best_cluster"]["f05"] > 0.8
    # The linear probe learns outside the held-out band (64 columns holding ink and papyrus) and is scored inside.
    probe = scores["linear_probe"]
    box = probe["held_out_box"]
    assert box["x1"] - box["x0"] == 64 and (box["y0"], box["y1"]) == (0, 128)
    assert 0.7 * (128 // 4) * (64 // 4) < probe["held_out_pixels"] <= (128 // 4) * (64 // 4)  # grid pixels of the band
    assert probe["fit_pixels"] > 2 * probe["held_out_pixels"]
    assert probe["f05"] > 0.8 and probe["auc"] > 0.9
    for name in ("pca_rgb.png", "pca_best.png", "kmeans.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_ink_map_needs_labels(tmp_path):
    volume = np.random.default_rng(1).integers(0, 255, (65, 64, 64), dtype=np.uint8)
    segment = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(segment / "mask.png", rectangle_mask((64, 64), margin=1))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "ink_map.py"), "--pretrained_path", "random",
                             "--model", "resnet18_3d_tiny", "--segment_id", str(segment)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "has no ink labels" in result.stderr.strip().splitlines()[-1]


def test_a_stage_too_coarse_for_the_tile_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "ink_map.py"), "--pretrained_path", "random",
                             "--model", "resnet18_3d_tiny", "--stage", "4", "--output", str(tmp_path / "out")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --stage 4 has one feature per 32 pixels: a 64-pixel tile gives too few to keep the central half of "
        "each; use --tile_size 128 or more, or a finer stage")
    assert not (tmp_path / "out").exists()
