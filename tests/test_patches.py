"""Patch sampling: depth windows, normalisation, tile selection, datasets, and bounded memory."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.data.patches import (EpochSampler, GridTileDataset, InputSettings, RandomPatchDataset, depth_window,
                                   normalize_patch, tile_origins)
from pretrain.data.segment import SegmentError, open_segment
from tests.conftest import REPO_ROOT
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment


@pytest.fixture
def segment(tmp_path):
    volume = random_volume((65, 160, 200), seed=7)
    path = write_zarr_segment(tmp_path / "s.zarr", volume)
    mask = np.zeros((160, 200), np.uint8)
    mask[16:144, 8:120] = 255  # the right part of the segment is outside the papyrus
    write_png(path / "mask.png", mask)
    labels = np.zeros((160, 200), np.uint8)
    labels[40:72, 40:72] = 255
    write_png(path / "inklabels.png", labels)
    return open_segment(path), volume


def test_depth_window_is_centred_and_checked():
    assert depth_window(65, 16) == slice(24, 40)
    assert depth_window(65, 16, offset=-3) == slice(21, 37)
    with pytest.raises(SegmentError, match="outside the volume"):
        depth_window(65, 30, offset=20)
    with pytest.raises(SegmentError, match="outside the volume"):
        depth_window(65, 66)


def test_normalizations():
    patch = np.array([[0, 50, 125, 200, 255]], np.uint8)
    assert np.allclose(normalize_patch(patch, "range"), patch / 255.0)
    assert np.allclose(normalize_patch(patch, "clip"), [[0, 0, 0.5, 1, 1]])
    assert np.allclose(normalize_patch(patch.astype(np.uint16) * 257, "clip"), [[0, 0, 0.5, 1, 1]])
    z = normalize_patch(random_volume((4, 8, 8)), "zscore")
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-3
    with pytest.raises(ValueError, match="normalization"):
        normalize_patch(patch, "minmax")


def test_tile_origins_match_a_brute_force_reference(segment):
    segment, _ = segment
    tile, stride = 32, 16
    origins = tile_origins(segment, tile, stride, min_mask_fraction=0.75)
    expected = [
        (y, x)
        for y in range(0, 160 - tile + 1, stride)
        for x in range(0, 200 - tile + 1, stride)
        if segment.mask[y : y + tile, x : x + tile].mean() >= 0.75
    ]
    assert sorted(map(tuple, origins.tolist())) == expected
    inked = tile_origins(segment, tile, stride, min_mask_fraction=0.5, min_ink_fraction=0.25)
    assert len(inked) > 0
    assert all(segment.inklabels[y : y + tile, x : x + tile].mean() >= 0.25 for y, x in inked)


def test_tile_errors(segment):
    segment, _ = segment
    with pytest.raises(SegmentError, match="tile size 256 is larger"):
        tile_origins(segment, 256, 64)
    with pytest.raises(SegmentError, match="no 32×32 tile"):
        tile_origins(segment, 32, 16, region_yx=np.zeros((160, 200), bool))


def test_random_patches_are_deterministic_inside_the_mask_and_exact(segment):
    segment, volume = segment
    settings = InputSettings(depth=16, tile_size=32)
    dataset = RandomPatchDataset([segment], settings, samples_per_epoch=50, seed=3)
    again = RandomPatchDataset([segment], settings, samples_per_epoch=50, seed=3)
    positions = [dataset.sample_position(0, index) for index in range(50)]
    assert positions == [again.sample_position(0, index) for index in range(50)]
    assert positions != [dataset.sample_position(1, index) for index in range(50)]
    for index, (_, y, x) in enumerate(positions[:10]):
        patch = dataset[0, index]
        assert patch.shape == (1, 16, 32, 32) and patch.dtype == torch.float32
        assert torch.equal(patch[0], torch.from_numpy(volume[24:40, y : y + 32, x : x + 32] / np.float32(255)))
        assert segment.mask[y : y + 32, x : x + 32].mean() >= 0.5 - 8 * 32 / 32**2  # within one jitter step


def test_epoch_sampler_splits_each_epoch_between_ranks_and_carries_the_epoch():
    samplers = [EpochSampler(10, rank, world_size=3) for rank in range(3)]
    for sampler in samplers:
        sampler.set_epoch(4)
    shares = [list(sampler) for sampler in samplers]
    assert all(len(share) == len(sampler) == 3 for share, sampler in zip(shares, samplers))  # 10 // 3, as many each
    assert sorted(key for share in shares for key in share) == [(4, index) for index in range(9)]


def test_random_patches_from_several_segments(segment, tmp_path):
    segment, _ = segment
    other_volume = random_volume((65, 64, 64), seed=9)
    path = write_zarr_segment(tmp_path / "other.zarr", other_volume)
    write_png(path / "mask.png", np.full((64, 64), 255, np.uint8))
    dataset = RandomPatchDataset([segment, open_segment(path)], InputSettings(depth=8, tile_size=32), samples_per_epoch=200)
    drawn = {dataset.sample_position(0, index)[0] for index in range(200)}
    assert drawn == {0, 1}


def test_grid_tiles_with_labels_and_loader_workers(segment):
    segment, volume = segment
    dataset = GridTileDataset(segment, InputSettings(depth=8, tile_size=32, normalization="range"), stride=32,
                              min_mask_fraction=1.0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    seen = 0
    for batch in loader:
        for volume_tile, label, (y, x) in zip(batch["volume"], batch["label"], batch["origin"].tolist()):
            assert torch.equal(volume_tile[0], torch.from_numpy(volume[28:36, y : y + 32, x : x + 32] / np.float32(255)))
            assert torch.equal(label, torch.from_numpy(segment.inklabels[y : y + 32, x : x + 32].astype(np.float32)))
            seen += 1
    assert seen == len(dataset) == 3 * 2  # y in {32, 64, 96}, x in {32, 64}: the tiles fully inside the mask


MEMORY_PROBE = r"""
import resource, sys
import numpy as np, zarr
from pretrain.data.patches import InputSettings, RandomPatchDataset
from pretrain.data.segment import open_segment
path = sys.argv[1]
segment = open_segment(path, lru_bytes=64 * 2**20)
baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dataset = RandomPatchDataset([segment], InputSettings(depth=32, tile_size=128), samples_per_epoch=300, seed=0)
checksum = sum(float(dataset[0, index].sum()) for index in range(300))
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(baseline_kib, peak_kib, segment.volume.nbytes, segment.volume.decoded_chunks)
"""


def test_sampling_memory_is_bounded_by_the_lru_not_the_segment(tmp_path):
    # A 65 × 4096 × 4096 segment (1 GiB of voxels), written chunk by chunk; compressible content keeps
    # the file small, but every chunk decodes to its full size when read.
    import zarr

    root = zarr.open_group(tmp_path / "big.zarr", mode="w")
    array = root.create_array("0", shape=(65, 4096, 4096), chunks=(65, 256, 256), dtype="uint8")
    pattern = np.tile(np.arange(256, dtype=np.uint8), (65, 256, 1))
    for y in range(0, 4096, 256):
        array[:, y : y + 256, :] = np.tile(pattern, (1, 1, 16))
    write_png(tmp_path / "big.zarr" / "mask.png", rectangle_mask((4096, 4096), margin=64))
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "big.zarr")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300, env=os.environ)
    assert result.returncode == 0, result.stderr
    baseline_kib, peak_kib, volume_bytes, decoded_chunks = map(int, result.stdout.split())
    growth = (peak_kib - baseline_kib) * 1024
    assert decoded_chunks > 100  # it really read all over the segment
    assert growth < 200 * 2**20, f"sampling grew RSS by {growth / 2**20:.0f} MiB"
    assert growth < volume_bytes / 5


def sheet_volume(shape, surface_yx, seed=0):
    """uint8 (Z, Y, X): air (40) above a papyrus sheet (140) whose top lies at the fractional layer
    surface_yx (partial-volume edge), a thin bright layer (+60) one layer below it, and mild noise."""
    layers = np.arange(shape[0], dtype=np.float32)[:, None, None]
    depth_in_sheet = layers - surface_yx[None]
    sheet = 1 / (1 + np.exp(-depth_in_sheet / 0.5))
    marker = 60 * np.exp(-0.5 * ((depth_in_sheet - 1.0) / 0.4) ** 2)
    noise = np.random.default_rng(seed).normal(0, 3, shape)
    return np.clip(40 + 100 * sheet + marker + noise, 0, 255).astype(np.uint8)


def test_surface_depth_finds_a_tilted_surface():
    from pretrain.data.patches import surface_depth

    y_yx, x_yx = np.mgrid[0:64, 0:64].astype(np.float32)
    true_surface = 10.0 + 0.06 * x_yx + 0.03 * y_yx  # 10 to 15.7 layers
    slab = sheet_volume((32, 64, 64), true_surface).astype(np.float32) / 255
    found = surface_depth(slab)
    inside = (slice(8, -8), slice(8, -8))  # away from the in-plane smoothing's border
    assert np.abs(found - true_surface)[inside].max() < 0.5
    # No contrast at all: the middle layer, not an error.
    assert np.allclose(surface_depth(np.full((20, 16, 16), 0.5, np.float32)), 9.5)


@pytest.mark.parametrize("offset", [0, 2])
def test_surface_window_keeps_the_layer_under_the_surface_at_one_input_layer(tmp_path, offset):
    height = width = 96
    y_yx, x_yx = np.mgrid[0:height, 0:width].astype(np.float32)
    true_surface = 32 + 4.5 * np.sin(x_yx / 15) * np.cos(y_yx / 20)  # wanders ±4.5 layers
    volume = sheet_volume((65, height, width), true_surface)
    path = write_zarr_segment(tmp_path / "warped.zarr", volume)
    write_png(path / "mask.png", np.full((height, width), 255, np.uint8))
    segment = open_segment(path)
    depth = 16
    fixed_settings = InputSettings(depth=depth, tile_size=32, depth_offset=offset)
    following = GridTileDataset(segment, dataclasses.replace(fixed_settings, follow_surface=True), stride=32)
    fixed = GridTileDataset(segment, fixed_settings, stride=32)
    assert len(following) == len(fixed) == 9
    marker_layer = depth // 2 - offset + 1  # the bright layer lies one layer below the surface
    for index in range(len(following)):
        tile_dhw = following[index]["volume"][0].numpy()
        assert tile_dhw.shape == (depth, 32, 32)
        # In (nearly) every column, the brightest layer is the marker's, to within the one layer that
        # interpolating the marker between two input layers allows: the window follows the surface.
        assert np.mean(np.abs(tile_dhw.argmax(axis=0) - marker_layer) <= 1) > 0.95
    # The fixed window sees the marker at whatever layer the warp puts it.
    brightest_fixed = np.concatenate([fixed[index]["volume"][0].numpy().argmax(axis=0).ravel() for index in range(9)])
    assert np.mean(np.abs(brightest_fixed - marker_layer) <= 1) < 0.6


def test_surface_window_views_and_random_patches_take_the_same_layers(tmp_path):
    from pretrain.data.views import TwoViewDataset

    height = width = 96
    y_yx, x_yx = np.mgrid[0:height, 0:width].astype(np.float32)
    volume = sheet_volume((65, height, width), 30 + 3 * np.sin(x_yx / 25))
    path = write_zarr_segment(tmp_path / "warped.zarr", volume)
    write_png(path / "mask.png", np.full((height, width), 255, np.uint8))
    segment = open_segment(path)
    settings = InputSettings(depth=16, tile_size=32, follow_surface=True)
    patches = RandomPatchDataset([segment], settings, samples_per_epoch=4)
    views = TwoViewDataset([segment], settings, samples_per_epoch=4, augment=False)
    for index in range(4):
        assert patches[0, index].shape == (1, 16, 32, 32)
        for view in views[0, index]:
            assert view.shape == (1, 16, 32, 32)
            # The marker is at input layer 9 (10 where interpolation splits it) without a depth offset;
            # offsets of 0-2 layers move it up by as much.
            assert 7 <= np.median(view[0].numpy().argmax(axis=0)) <= 10
