"""Shared fixtures. Also puts the repository root on sys.path so tests import `pretrain.*` package-qualified."""
import pathlib
import sys

import cv2
import numpy as np
import pytest
import zarr

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SERVER_SEGMENTS = "other/dev/scrolls/1/segments/54keV_7.91um"


def random_volume(shape=(65, 200, 170), seed=0, dtype=np.uint8) -> np.ndarray:
    maximum = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, maximum, shape, dtype=dtype)


def write_zarr_segment(path: pathlib.Path, volume: np.ndarray, zarr_format: int = 3, group: bool = True,
                       chunks=(32, 64, 64), slash_keys: bool = False) -> pathlib.Path:
    """A segment zarr: a group with level "0" (OME-Zarr style) or a bare array."""
    options = {}
    if zarr_format == 2 and slash_keys:
        options["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    if group:
        root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
        array = root.create_array("0", shape=volume.shape, chunks=chunks, dtype=volume.dtype, **options)
    else:
        array = zarr.create_array(path, shape=volume.shape, chunks=chunks, dtype=volume.dtype,
                                  zarr_format=zarr_format, **options)
    array[:] = volume
    return path


def write_png(path: pathlib.Path, image: np.ndarray) -> pathlib.Path:
    assert cv2.imwrite(str(path), image)
    return path


def rectangle_mask(shape_yx, margin=10) -> np.ndarray:
    mask = np.zeros(shape_yx, np.uint8)
    mask[margin:-margin, margin:-margin] = 255
    return mask


@pytest.fixture
def server_mirror(tmp_path):
    """A folder laid out like the data server holding one v2 OME-Zarr segment (slash chunk keys, as the
    server's) with `{id}_mask.png` and `{id}_inklabels.png` inside the zarr. Returns (root, id, volume)."""
    segment_id = "20230827161847"
    volume = random_volume((65, 200, 170), seed=1)
    zarr_path = tmp_path / "mirror" / SERVER_SEGMENTS / f"{segment_id}.zarr"
    write_zarr_segment(zarr_path, volume, zarr_format=2, slash_keys=True)
    write_png(zarr_path / f"{segment_id}_mask.png", rectangle_mask(volume.shape[1:]))
    labels = np.zeros(volume.shape[1:], np.uint8)
    labels[50:80, 40:120] = 255
    write_png(zarr_path / f"{segment_id}_inklabels.png", labels)
    return tmp_path / "mirror", segment_id, volume
