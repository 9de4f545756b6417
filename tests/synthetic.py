"""Synthetic segments for tests and benchmarks: random volumes, masks, segment zarrs, and folders laid out like
the Vesuvius data server (which tests.loopback_server serves). Plain functions, no pytest: benchmarks import them."""
import pathlib

import cv2
import numpy as np
import zarr


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


# ---------------------------------------------------------------- the data server's layout (REFERENCES.md f)

SERVER_SEGMENTS = "other/dev/scrolls/1/segments/54keV_7.91um"  # scroll 1's segment zarrs and their labels
SERVER_PATHS = {  # each scroll's volume package `paths/`: masks and layer images
    "1": "full-scrolls/Scroll1/PHercParis4.volpkg/paths",
    "2": "full-scrolls/Scroll2/PHercParis3.volpkg/paths",
    "4": "full-scrolls/Scroll4/PHerc1667.volpkg/paths",
}
SERVER_CHUNKS = (4, 512, 512)  # the chunks of a real segment zarr
SERVER_SEGMENT_ID = "20230827161847"  # scroll 1, a segment zarr
SERVER_LAYER_SEGMENT_ID = "20231107190228"  # scroll 4, layer images only


def pad_to_tiles(image: np.ndarray, tile: int = 256) -> np.ndarray:
    """Zeros at the bottom and right up to whole tiles, as the villa / Grand Prize label tools pad."""
    height, width = image.shape[:2]
    return np.pad(image, ((0, -height % tile), (0, -width % tile)))


def write_server_zarr(path: pathlib.Path, volume: np.ndarray, chunks=SERVER_CHUNKS) -> pathlib.Path:
    """A segment zarr as the server has them: an OME-Zarr v2 group, level "0", Blosc zstd bit-shuffled
    chunks, '/' chunk keys. All-zero chunks are not written: they are absent, as on the server."""
    import numcodecs

    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": axis, "type": "space"} for axis in "zyx"],
                                   "datasets": [{"path": "0"}]}]
    array = group.create_array("0", shape=volume.shape, chunks=chunks, dtype=volume.dtype,
                               compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE),
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    array[:] = volume
    return path


def server_folder(root: pathlib.Path, segment_id: str, scroll: str = "1") -> pathlib.Path:
    """The segment's folder in its scroll's volume package, `paths/{id}/`."""
    folder = root / SERVER_PATHS[scroll] / segment_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_server_segment(root: pathlib.Path, segment_id: str, volume: np.ndarray, mask: np.ndarray | None,
                         labels: np.ndarray | None = None, chunks=SERVER_CHUNKS) -> pathlib.Path:
    """A scroll 1 segment laid out as on the server: the zarr, its ink labels beside it (padded to whole
    tiles), its mask only in the volume package. Returns the zarr's path."""
    zarr_path = write_server_zarr(root / SERVER_SEGMENTS / f"{segment_id}.zarr", volume, chunks)
    if labels is not None:
        write_png(zarr_path.parent / f"{segment_id}_inklabels.png", pad_to_tiles(labels))
    if mask is not None:
        write_png(server_folder(root, segment_id) / f"{segment_id}_mask.png", mask)
    return zarr_path


def write_server_layers(root: pathlib.Path, segment_id: str, volume: np.ndarray, mask: np.ndarray | None,
                        scroll: str = "4", suffix: str = ".tif") -> pathlib.Path:
    """A segment that exists only as layer images in the volume package (scrolls 2–4): `paths/{id}/layers/00.tif
    … 64.tif` and `paths/{id}/{id}_mask.png`. Returns the layers folder."""
    import tifffile

    folder = server_folder(root, segment_id, scroll)
    layers = folder / "layers"
    layers.mkdir()
    for index, layer in enumerate(volume):
        if suffix == ".tif":
            tifffile.imwrite(layers / f"{index:02d}.tif", layer)
        else:
            assert cv2.imwrite(str(layers / f"{index:02d}{suffix}"), layer, [cv2.IMWRITE_JPEG_QUALITY, 100])
    if mask is not None:
        write_png(folder / f"{segment_id}_mask.png", mask)
    return layers
