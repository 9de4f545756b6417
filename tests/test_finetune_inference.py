"""Whole-segment prediction: the tile grid covers every edge, and the stitched, streamed prediction equals
one computed on the volume loaded into RAM."""
import numpy as np
import pytest
import torch
import zarr

from finetune import inference
from finetune.model import build_ink_unet
from pretrain.data.patches import InputSettings, depth_window, normalize_patch
from pretrain.data.segment import open_segment
from tests.synthetic import random_volume, write_png, write_zarr_segment

SHAPE = (20, 150, 173)  # neither side a multiple of the tile or the stride
TILE, STRIDE, DEPTH = 32, 24, 8
SETTINGS = InputSettings(depth=DEPTH, tile_size=TILE)


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    path = write_zarr_segment(tmp_path_factory.mktemp("inference") / "segment.zarr", random_volume(SHAPE, seed=5),
                              chunks=(8, 48, 48))
    mask = np.zeros(SHAPE[1:], np.uint8)
    mask[5:, 3:] = 255  # reaches the bottom and right edges
    mask[60:90, 40:100] = 0
    write_png(path / "mask.png", mask)
    return open_segment(str(path))


class PixelModel(torch.nn.Module):
    """Logits from each pixel's own voxels only, so any correct tiling and blending reproduces the
    whole-image computation exactly."""

    def forward(self, volume_b1dhw):
        return (volume_b1dhw.mean(dim=2) - 0.5) * 8 + volume_b1dhw[:, :, 0] * 2  # (B, 1, H, W)


def in_ram_volume(segment):
    layers = depth_window(SHAPE[0], DEPTH)
    return normalize_patch(segment.volume[layers, :, :], "range")  # (D, Y, X), loaded whole


def test_grid_reaches_the_right_and_bottom_edges(segment):
    origins = inference.covering_origins(segment.mask, TILE, STRIDE)
    covered = np.zeros(SHAPE[1:], bool)
    for y, x in origins:
        covered[y:y + TILE, x:x + TILE] = True
    assert covered[segment.mask].all()
    assert origins[:, 0].max() == SHAPE[1] - TILE and origins[:, 1].max() == SHAPE[2] - TILE
    assert inference.grid_starts(100, 32, 32) == [0, 32, 64, 68]
    assert inference.grid_starts(96, 32, 32) == [0, 32, 64]


@pytest.mark.parametrize("tta", [False, True])
def test_pixelwise_model_stitches_to_the_whole_image_result(segment, tta):
    probabilities = inference.predict_segment(PixelModel(), segment, segment.mask, SETTINGS, STRIDE,
                                              batch_size=5, device=torch.device("cpu"), tta=tta)
    volume_dyx = torch.from_numpy(in_ram_volume(segment))[None, None]  # (1, 1, D, Y, X)
    expected = torch.sigmoid(PixelModel()(volume_dyx))[0, 0].numpy() * segment.mask
    assert probabilities.shape == SHAPE[1:] and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_ink_unet_streamed_prediction_equals_in_ram_reference(segment):
    torch.manual_seed(0)
    model = build_ink_unet("resnet18_3d_tiny").eval()
    region = segment.mask.copy()
    region[:, :60] = False  # a mask_path region within the segment mask
    probabilities = inference.predict_segment(model, segment, region, SETTINGS, STRIDE, batch_size=4,
                                              device=torch.device("cpu"), num_workers=1)
    # Reference: the volume in RAM, every tile by hand, Gaussian-weighted average.
    volume_dyx = in_ram_volume(segment)
    weights = inference.gaussian_weights(TILE)
    weighted, total = np.zeros(SHAPE[1:]), np.zeros(SHAPE[1:])
    with torch.no_grad():
        for y, x in inference.covering_origins(region, TILE, STRIDE):
            tile = torch.from_numpy(np.ascontiguousarray(volume_dyx[:, y:y + TILE, x:x + TILE]))[None, None]
            weighted[y:y + TILE, x:x + TILE] += weights * torch.sigmoid(model(tile))[0, 0].numpy()
            total[y:y + TILE, x:x + TILE] += weights
    expected = np.where(region, weighted / np.maximum(total, 1e-12), 0)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert not probabilities[~region].any() and probabilities[region].min() > 0


def test_rows_stream_into_a_zarr_map_with_gaps_between_tile_rows(segment, tmp_path):
    """Two strips far apart (rows between them and above the first touch no tile), written to a zarr array on
    disk band by band: the same map as the pixel-wise whole-image computation."""
    region = np.zeros(SHAPE[1:], bool)
    region[40:50, 10:90] = True
    region[120:130, 60:170] = True
    output = zarr.create_array(tmp_path / "map.zarr", shape=SHAPE[1:], chunks=(16, 64), dtype="float32",
                               fill_value=np.nan)  # NaN: a row the prediction forgot would show
    returned = inference.predict_segment(PixelModel(), segment, region, SETTINGS, STRIDE, batch_size=3,
                                         device=torch.device("cpu"), output_yx=output)
    assert returned is output
    volume_dyx = torch.from_numpy(in_ram_volume(segment))[None, None]
    expected = torch.sigmoid(PixelModel()(volume_dyx))[0, 0].numpy() * region
    np.testing.assert_allclose(output[:], expected, atol=1e-5)
    in_memory = inference.predict_segment(PixelModel(), segment, region, SETTINGS, STRIDE,
                                          batch_size=3, device=torch.device("cpu"))
    np.testing.assert_array_equal(output[:], in_memory)


def test_covering_origins_are_exactly_the_grid_tiles_holding_region():
    region = np.random.default_rng(2).random((150, 173)) > 0.997  # scattered single pixels
    expected = [(y, x) for y in inference.grid_starts(150, TILE, STRIDE) for x in inference.grid_starts(173, TILE, STRIDE)
                if region[y:y + TILE, x:x + TILE].any()]
    assert inference.covering_origins(region, TILE, STRIDE).tolist() == [list(origin) for origin in expected]
    assert inference.covering_origins(np.zeros((150, 173), bool), TILE, STRIDE).shape == (0, 2)
