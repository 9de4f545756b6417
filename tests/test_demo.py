"""The demo segment: layout, determinism, and calibrated difficulty (ink hidden from one slice, present
in the surface texture); and the single-layer threshold baseline against a brute-force reference."""
import itertools
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import sklearn.metrics
import zarr

from pretrain.data import demo
from pretrain.data.demo import CHUNKS_ZYX, GENERATOR_VERSION, best_single_layer_threshold_f05, build_demo_segment

SMALL_SHAPE = (65, 256, 384)


def read_segment(directory):
    volume_zyx = zarr.open_group(directory, mode="r")["0"][:]
    images = {name: cv2.imread(str(directory / f"{name}.png"), cv2.IMREAD_UNCHANGED)
              for name in ("mask", "inklabels", "inklabels_two_letters")}
    return volume_zyx, images


@pytest.fixture(scope="module")
def small_segment(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small") / "segment"
    build_demo_segment(directory, seed=3, shape=SMALL_SHAPE)
    return directory


@pytest.fixture(scope="module")
def default_segment(tmp_path_factory):
    directory = tmp_path_factory.mktemp("default") / "segment"
    build_demo_segment(directory)
    return read_segment(directory)


def estimate_surface_layer(volume_zyx: np.ndarray) -> np.ndarray:
    """First layer inside the papyrus, from the data alone: the steepest rise of the locally averaged
    intensity along z, searched in the middle layers so the neighbouring sheets cannot win. # (Y, X)"""
    first, last = 16, 48
    averaged_zyx = np.stack([cv2.blur(volume_zyx[z].astype(np.float32), (15, 15)) for z in range(first, last + 1)])
    return first + 1 + np.argmax(np.diff(averaged_zyx, axis=0), axis=0)


def local_standard_deviation(image_yx: np.ndarray, window: int = 5) -> np.ndarray:
    image_yx = image_yx.astype(np.float32)
    mean_yx = cv2.blur(image_yx, (window, window))
    return np.sqrt(np.maximum(cv2.blur(image_yx ** 2, (window, window)) - mean_yx ** 2, 0))


def cohens_d(feature_yx: np.ndarray, ink_yx: np.ndarray, inside_yx: np.ndarray) -> float:
    on_ink, off_ink = feature_yx[inside_yx & ink_yx], feature_yx[inside_yx & ~ink_yx]
    return float((on_ink.mean() - off_ink.mean()) / np.sqrt((on_ink.var() + off_ink.var()) / 2))


def test_layout_and_labels(small_segment):
    group = zarr.open_group(small_segment, mode="r")
    array = group["0"]
    assert array.shape == SMALL_SHAPE and array.dtype == np.uint8 and array.chunks == CHUNKS_ZYX
    assert group.attrs["seed"] == 3 and group.attrs["generator_version"] == GENERATOR_VERSION
    assert tuple(group.attrs["shape"]) == SMALL_SHAPE and group.attrs["contrast"] == 1.0

    _, images = read_segment(small_segment)
    for name, image_yx in images.items():
        assert image_yx.shape == SMALL_SHAPE[1:] and image_yx.dtype == np.uint8, name
        assert set(np.unique(image_yx)) == {0, 255}, name
    mask_yx, ink_yx, two_letters_yx = (images[name] > 0 for name in ("mask", "inklabels", "inklabels_two_letters"))
    assert 0.6 < mask_yx.mean() < 0.9
    assert not (ink_yx & ~mask_yx).any()
    assert not (two_letters_yx & ~ink_yx).any()
    assert 0 < two_letters_yx.sum() < ink_yx.sum()
    # Two letters, not a fragment of one: two separate pieces of ink.
    assert cv2.connectedComponents(two_letters_yx.astype(np.uint8))[0] - 1 >= 2


def test_same_seed_same_segment_other_seed_differs(small_segment, tmp_path):
    build_demo_segment(tmp_path / "again", seed=3, shape=SMALL_SHAPE)
    build_demo_segment(tmp_path / "other", seed=4, shape=SMALL_SHAPE)
    volume_zyx, images = read_segment(small_segment)
    again_zyx, again_images = read_segment(tmp_path / "again")
    other_zyx, other_images = read_segment(tmp_path / "other")
    np.testing.assert_array_equal(volume_zyx, again_zyx)
    for name in images:
        np.testing.assert_array_equal(images[name], again_images[name])
        assert not np.array_equal(images[name], other_images[name])
    assert not np.array_equal(volume_zyx, other_zyx)


def test_the_default_demo_is_the_reference_one(default_segment, tmp_path):
    # The arrays every recorded score comes from, byte for byte (the build checks it too, and refuses another).
    volume_zyx, images = default_segment
    digest = demo.demo_digest(volume_zyx, images["mask"], images["inklabels"], images["inklabels_two_letters"])
    assert digest == demo.REFERENCE_SHA256[0]


def test_a_demo_other_than_the_reference_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DEFAULT_SHAPE", SMALL_SHAPE)
    build_demo_segment(tmp_path / "reference", seed=3, shape=SMALL_SHAPE)
    monkeypatch.setattr(demo, "REFERENCE_SHA256", {3: zarr.open_group(tmp_path / "reference").attrs["sha256"]})
    build_demo_segment(tmp_path / "same", seed=3, shape=SMALL_SHAPE)
    monkeypatch.setattr(demo, "REFERENCE_SHA256", {3: "0" * 64})
    with pytest.raises(demo.DemoDigestError, match="different demo:3"):
        build_demo_segment(tmp_path / "other", seed=3, shape=SMALL_SHAPE)
    assert not (tmp_path / "other" / "0").exists()


def test_the_demo_does_not_depend_on_the_instruction_set(small_segment):
    # numpy picks SSE, AVX2 or AVX-512 code for its ufuncs by machine; the float32 generator of version 1 built a
    # different demo:0 with AVX disabled. Built with only the baseline instructions, the demo must not change.
    from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_features__

    extra = [feature for feature, present in __cpu_features__.items() if present and feature not in __cpu_baseline__]
    if not extra:
        pytest.skip("this machine has only numpy's baseline instructions")
    script = ("import sys, zarr; from pretrain.data.demo import build_demo_segment; "
              f"build_demo_segment(sys.argv[1], seed=3, shape={SMALL_SHAPE}); "
              "print(zarr.open_group(sys.argv[1]).attrs['sha256'])")
    baseline = subprocess.run([sys.executable, "-c", script, str(small_segment.parent / "baseline")], check=True,
                              capture_output=True, text=True, env={**os.environ, "NPY_DISABLE_CPU_FEATURES": " ".join(extra)})
    assert baseline.stdout.split()[-1] == zarr.open_group(small_segment).attrs["sha256"]


def test_existing_folder_is_refused(small_segment):
    with pytest.raises(FileExistsError):
        build_demo_segment(small_segment, shape=SMALL_SHAPE)


def test_no_single_layer_and_threshold_finds_the_ink(default_segment):
    volume_zyx, images = default_segment
    best_f05, _, _ = best_single_layer_threshold_f05(volume_zyx, images["inklabels"], images["mask"])
    assert best_f05 <= 0.35


def test_ink_changes_the_texture_at_the_surface(default_segment):
    volume_zyx, images = default_segment
    surface_yx = estimate_surface_layer(volume_zyx)
    surface_layer_yx = np.take_along_axis(volume_zyx, surface_yx[None], axis=0)[0]  # (Y, X), follows the warp
    texture_yx = local_standard_deviation(surface_layer_yx)
    # Away from the segment edge, where the 5x5 window would see the black outside.
    inside_yx = cv2.erode(images["mask"], np.ones((11, 11), np.uint8)) > 0
    ink_yx = images["inklabels"] > 0
    surface_effect = cohens_d(texture_yx, ink_yx, inside_yx)
    assert surface_effect >= 0.5
    # Two layers deeper the same feature sees almost nothing: the ink is a thin layer at the surface.
    deeper_layer_yx = np.take_along_axis(volume_zyx, surface_yx[None] + 2, axis=0)[0]
    assert abs(cohens_d(local_standard_deviation(deeper_layer_yx), ink_yx, inside_yx)) < surface_effect / 3


def test_ink_touches_only_a_thin_layer_under_the_labels(tmp_path):
    # Contrast only scales the ink, so with contrast 0 the same seed gives the same segment without it.
    build_demo_segment(tmp_path / "ink", seed=5, shape=SMALL_SHAPE)
    build_demo_segment(tmp_path / "no_ink", seed=5, shape=SMALL_SHAPE, contrast=0.0)
    volume_zyx, images = read_segment(tmp_path / "ink")
    no_ink_zyx, _ = read_segment(tmp_path / "no_ink")
    changed_zyx = volume_zyx != no_ink_zyx
    ink_yx = images["inklabels"] > 0

    # Nothing changes away from the labels (beyond the few pixels the soft ink edge reaches) ...
    near_ink_yx = cv2.dilate(images["inklabels"], np.ones((11, 11), np.uint8)) > 0
    assert not changed_zyx[:, ~near_ink_yx].any()
    # ... nearly every labelled pixel changes ...
    changed_layers_yx = changed_zyx.sum(axis=0)
    assert (changed_layers_yx[ink_yx] > 0).mean() > 0.9
    # ... and only in a few adjacent layers (rounding can flip a voxel where the ink fades out).
    layers_zyx = np.arange(SMALL_SHAPE[0])[:, None, None]
    first_yx = np.where(changed_zyx, layers_zyx, SMALL_SHAPE[0]).min(axis=0)
    last_yx = np.where(changed_zyx, layers_zyx, -1).max(axis=0)
    assert (last_yx - first_yx)[changed_layers_yx > 0].max() <= 4
    assert np.median(changed_layers_yx[ink_yx]) <= 3


def test_best_single_layer_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    volume_zyx = rng.integers(100, 130, size=(3, 9, 11), dtype=np.uint8)
    inklabels_yx = np.where(rng.random((9, 11)) < 0.3, 255, 0).astype(np.uint8)
    mask_yx = np.where(rng.random((9, 11)) < 0.8, 255, 0).astype(np.uint8)
    volume_zyx[1][inklabels_yx > 0] += 5  # make one layer informative, so the maximum is not a tie at 0

    inside_yx = mask_yx > 0
    truth = inklabels_yx[inside_yx] > 0
    reference = 0.0
    for z, threshold in itertools.product(range(3), range(257)):
        values = volume_zyx[z][inside_yx]
        for prediction in (values >= threshold, values < threshold):
            reference = max(reference, sklearn.metrics.fbeta_score(truth, prediction, beta=0.5, zero_division=0.0))

    best_f05, layer, threshold = best_single_layer_threshold_f05(volume_zyx, inklabels_yx, mask_yx)
    assert best_f05 == pytest.approx(reference)
    # The returned layer and threshold reproduce that score in one of the two polarities.
    values = volume_zyx[layer][inside_yx]
    achieved = max(sklearn.metrics.fbeta_score(truth, values > threshold, beta=0.5, zero_division=0.0),
                   sklearn.metrics.fbeta_score(truth, values < threshold, beta=0.5, zero_division=0.0))
    assert achieved == pytest.approx(reference)


def test_a_layer_equal_to_the_labels_scores_one():
    rng = np.random.default_rng(1)
    inklabels_yx = np.where(rng.random((16, 16)) < 0.2, 255, 0).astype(np.uint8)
    volume_zyx = rng.integers(0, 256, size=(4, 16, 16), dtype=np.uint8)
    volume_zyx[2] = inklabels_yx
    mask_yx = np.full((16, 16), 255, np.uint8)
    best_f05, layer, threshold = best_single_layer_threshold_f05(volume_zyx, inklabels_yx, mask_yx)
    assert (best_f05, layer) == (pytest.approx(1.0), 2)
    assert 0 < threshold < 255
