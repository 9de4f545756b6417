"""The local-contrast map: the layers under the surface, measured as a direct computation does; memory bounded on a
large lazy segment; the command writes the prior PNG and its scores."""
import json
import subprocess
import sys
import tracemalloc

import cv2
import numpy as np
import scipy.ndimage

from evaluate.local_contrast import contrast_map, prior_image
from pretrain.data.segment import Segment, open_segment
from tests.conftest import REPO_ROOT
from tests.synthetic import write_png, write_zarr_segment

SURFACE = 10  # the first papyrus layer of the flat test sheet


def flat_sheet(shape_zyx, seed=0) -> np.ndarray:
    """Air (0) above layer SURFACE, papyrus (200 ± 10 of texture) from it down: a surface at 9.5 once smoothed."""
    volume = np.zeros(shape_zyx, np.uint8)
    texture = np.random.default_rng(seed).integers(-10, 11, shape_zyx[1:])
    for layer in range(SURFACE, shape_zyx[0]):
        volume[layer] = 200 + np.roll(texture, 3 * layer, axis=1)  # each layer its own texture
    return volume


def direct_contrast(volume_zyx: np.ndarray, tile_size: int) -> np.ndarray:
    """What the map should be, written out: per tile, the layers at depths 9.5 and 10.5 (the surface and the one
    below, interpolated), each layer's RMS detail in 5 × 5 windows (edges averaged over the pixels present), their
    mean."""
    values = volume_zyx.astype(np.float64) / 255
    layers = [(values[SURFACE - 1] + values[SURFACE]) / 2, (values[SURFACE] + values[SURFACE + 1]) / 2]
    result = np.zeros(volume_zyx.shape[1:])
    for y in range(0, result.shape[0], tile_size):
        for x in range(0, result.shape[1], tile_size):
            contrasts = []
            for layer in layers:
                tile = layer[y:y + tile_size, x:x + tile_size]
                count = scipy.ndimage.uniform_filter(np.ones_like(tile), 5, mode="constant")
                mean = scipy.ndimage.uniform_filter(tile, 5, mode="constant") / count
                energy = scipy.ndimage.uniform_filter((tile - mean) ** 2, 5, mode="constant") / count
                contrasts.append(np.sqrt(energy))
            result[y:y + tile_size, x:x + tile_size] = np.mean(contrasts, axis=0)
    return result


def test_map_is_the_local_contrast_under_the_surface(tmp_path):
    volume = flat_sheet((24, 96, 128))
    path = write_zarr_segment(tmp_path / "flat.zarr", volume)
    write_png(path / "mask.png", np.full((96, 128), 255, np.uint8))
    measured = contrast_map(open_segment(str(path)), depth=16, tile_size=32, smoothing_px=0)
    expected = direct_contrast(volume, 32)
    # The surface found per tile lies within a few hundredths of a layer of 9.5 (texture moves it slightly).
    np.testing.assert_allclose(measured, expected, rtol=0.03, atol=1e-4)
    assert not np.allclose(expected, direct_contrast(np.roll(volume, 1, axis=0), 32), rtol=0.03)  # a layer off differs


class LazySheet:
    """A (Z, Y, X) uint8 volume computed on demand, never held whole: stands in for a remote segment."""

    def __init__(self, shape_zyx) -> None:
        self.shape, self.dtype = shape_zyx, np.dtype(np.uint8)

    def __getitem__(self, key):
        layers, rows, columns = key
        z = np.arange(*layers.indices(self.shape[0]))[:, None, None]
        y = np.arange(*rows.indices(self.shape[1]))[None, :, None]
        x = np.arange(*columns.indices(self.shape[2]))[None, None, :]
        texture = ((y * 7 + x * 13 + z * 5) % 21 - 10).astype(np.int16)
        return np.where(z >= SURFACE, 200 + texture, 0).astype(np.uint8)


def test_memory_stays_bounded_on_a_large_lazy_segment():
    shape = (40, 2048, 2048)  # 168 MB of voxels if held
    segment = Segment(volume=LazySheet(shape), mask=np.ones(shape[1:], bool), inklabels=None, name="lazy",
                      source="zarr", location="(computed)")
    tracemalloc.start()
    contrast_yx = contrast_map(segment, tile_size=64, smoothing_px=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert contrast_yx.shape == shape[1:] and (contrast_yx > 0).all()
    # The (Y, X) map (17 MB) and the mask's tile tables plus a tile at a time, far from the volume's 168 MB.
    assert peak < 60e6, f"peak {peak / 1e6:.0f} MB"


def test_command_writes_the_prior_and_its_scores(labelled_segment_path, tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "local_contrast.py"), "--segment_id",
                             str(labelled_segment_path), "--tile_size", "32", "--depth", "8", "--output", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    image = cv2.imread(str(tmp_path / "tiny_local_contrast.png"), cv2.IMREAD_UNCHANGED)
    segment = open_segment(str(labelled_segment_path))
    assert image.dtype == np.uint8 and image.shape == segment.shape[1:] and (image[~segment.mask] == 0).all()
    scores = json.loads((tmp_path / "tiny_local_contrast.json").read_text())
    assert 0 <= scores["auc"] <= 1 and 0 < scores["pixels"] <= segment.mask.sum()
    expected = prior_image(contrast_map(segment, depth=8, tile_size=32), segment.mask)
    assert np.array_equal(image, expected)
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "local_contrast.py"), "--segment_id",
                          str(labelled_segment_path), "--layers", "9", "--depth", "8"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --layers 9 must be between 1 and depth // 2 = 4"]
    # --segment, the option's older name in evaluate/, still works, with a one-line note.
    old_name = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "local_contrast.py"), "--segment",
                               str(labelled_segment_path), "--layers", "9", "--depth", "8"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
    assert old_name.stderr.strip().splitlines() == [
        "note: --segment is now --segment_id; the old name still works",
        "error: --layers 9 must be between 1 and depth // 2 = 4"]
