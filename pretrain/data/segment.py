"""The one way every script gets segment data: `open_segment(spec)`.

A segment is a flattened papyrus surface volume (Z ≈ 65 layers of Y × X images) with a mask of where
the papyrus is and, sometimes, ink labels. `spec` may be:

1. a segment ID (`20230827161847`): the zarr on the Vesuvius data server,
   `{root}/other/dev/scrolls/{scroll}/segments/{energy}keV_{res}um/{id}.zarr/`, read through a
   persistent chunk cache (`pretrain.data.remote`); `root` is `VESUVIUS_DATA_URL` or the public server;
2. a local zarr path (v2 or v3; a group with level "0", or a bare array);
3. a layer folder in the Kaggle / Grand Prize layout (`layers/00.tif …`, `mask.png`, `inklabels.png`);
4. `demo` or `demo:<seed>`: the generated demo segment, built once and cached as a local zarr;
5. a list of any of these (returns a list of segments).

Why not the `vesuvius` package: it pins zarr<3 and numcodecs<0.16, its `Volume` keeps no chunk cache on
disk, and `Volume(...)` without `domain=`/`path=` probes the cloud metadata address 169.254.169.254.
The URL layout above is the server's own, so no package is needed to find a segment.
"""
import dataclasses
import functools
import os
import pathlib
import re
import shutil
import uuid
import warnings

import cv2
import numpy as np
import zarr
import zarr.core.sync

from pretrain.data.remote import CachedHTTPStore, RemoteReadError, default_cache_dir
from pretrain.data.volume import DEFAULT_LRU_BYTES, ChunkCachedVolume, LayerStack

DEFAULT_DATA_URL = "https://dl.ash2txt.org"
# Scan setting of each scroll's segments on the server: the `{energy}keV_{res}um` folder.
SCROLL_SCANS = {
    "1": "54keV_7.91um",
    "5": "53keV_7.91um",
}
LAYER_FOLDER_NAMES = ("layers", "surface_volume")
LAYER_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
SEGMENT_ID_PATTERN = re.compile(r"\d{8,}(_[\w-]+)?")


class SegmentError(ValueError):
    """A segment cannot be opened as asked; the message names the file, URL, shape or setting."""


@dataclasses.dataclass
class Segment:
    volume: ChunkCachedVolume  # (Z, Y, X) uint8 or uint16, lazy: slice it, never load it whole
    mask: np.ndarray  # (Y, X) bool: where the papyrus is
    inklabels: np.ndarray | None  # (Y, X) uint8 in {0, 1}, or None when the segment has no labels
    name: str
    source: str  # "remote", "zarr", "layers" or "demo"
    location: str  # URL or path the volume is read from
    voxel_size_um: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    @property
    def dtype(self) -> np.dtype:
        return self.volume.dtype

    def __repr__(self) -> str:
        labels = "with labels" if self.inklabels is not None else "no labels"
        return f"Segment({self.name!r}, {self.source}, shape={self.shape}, {self.dtype}, {labels})"


def open_segment(
    spec,
    scroll: str = "1",
    cache_dir: str | os.PathLike | None = None,
    lru_bytes: int = DEFAULT_LRU_BYTES,
    data_url: str | None = None,
    http_retries: int = 5,
    http_backoff_seconds: float = 0.5,
    http_concurrency: int = 8,
):
    """Open a segment (or a list of segments) from any source; see the module docstring for `spec`."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SegmentError("the list of segments is empty")
        return [
            open_segment(item, scroll, cache_dir, lru_bytes, data_url, http_retries, http_backoff_seconds, http_concurrency)
            for item in spec
        ]
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec = str(spec).strip()
    if spec == "demo" or spec.startswith("demo:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise SegmentError(f"demo segment spec {spec!r}: the seed after 'demo:' must be a whole number")
        return _open_demo(int(seed_text), cache_dir, lru_bytes)
    path = pathlib.Path(spec).expanduser()
    if path.exists():
        if _find_layer_folder(path) is not None:
            return _open_layer_folder(path, lru_bytes)
        return _open_local_zarr(path, lru_bytes)
    if SEGMENT_ID_PATTERN.fullmatch(spec):
        store_options = dict(max_concurrency=http_concurrency, retries=http_retries, backoff_seconds=http_backoff_seconds)
        return _open_remote(spec, str(scroll), cache_dir, lru_bytes, data_url, store_options)
    raise SegmentError(
        f"segment {spec!r} is neither an existing path, a segment ID (digits such as 20230827161847), nor 'demo'"
    )


# ---------------------------------------------------------------- labels and mask


def read_label_image(data: bytes, description: str, expected_shape: tuple[int, int]) -> np.ndarray:
    """Decode a mask / ink-label PNG into (Y, X) uint8 in {0, 1}: RGB(A) → grey, 0/255 → 0/1."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SegmentError(f"{description} is not a readable image")
    if image.ndim == 3:
        # Painted labels come as RGB(A): ink is wherever any colour channel is lit.
        image = image[..., :3].max(axis=-1)
    if image.shape != tuple(expected_shape):
        raise SegmentError(
            f"{description} has shape (Y, X) = {image.shape}, but the volume's (Y, X) is {tuple(expected_shape)}"
        )
    threshold = 1 if image.max() <= 1 else (np.iinfo(image.dtype).max + 1) // 2
    return (image >= threshold).astype(np.uint8)


def _mask_from_voxels(volume: ChunkCachedVolume, description: str) -> np.ndarray:
    warnings.warn(f"{description}: no mask found; deriving it from the non-zero voxels of the middle layer")
    return volume[volume.shape[0] // 2] > 0


def _finish_segment(volume, mask_bytes, label_bytes, name, source, location, voxel_size_um=None) -> Segment:
    if volume.ndim != 3:
        raise SegmentError(f"{location} holds an array of shape {volume.shape}; a segment is (Z, Y, X)")
    expected = volume.shape[1:]
    if mask_bytes is None:
        mask = _mask_from_voxels(volume, location)
    else:
        mask = read_label_image(mask_bytes[1], f"mask {mask_bytes[0]}", expected).astype(bool)
    if not mask.any():
        raise SegmentError(f"the mask of segment {name} ({location}) is empty: nothing to sample")
    inklabels = None
    if label_bytes is not None:
        inklabels = read_label_image(label_bytes[1], f"ink labels {label_bytes[0]}", expected)
    return Segment(volume, mask, inklabels, name, source, location, voxel_size_um)


def _first_existing(paths: list[pathlib.Path]) -> tuple[str, bytes] | None:
    for path in paths:
        if path.is_file():
            return str(path), path.read_bytes()
    return None


def _label_candidates(folders: list[pathlib.Path], segment_id: str, kind: str) -> list[pathlib.Path]:
    return [folder / name for folder in folders for name in (f"{kind}.png", f"{segment_id}_{kind}.png")]


# ---------------------------------------------------------------- zarr sources


def _level_zero(node, location: str):
    """Level "0" of an OME-Zarr-style group, or the array itself."""
    if isinstance(node, zarr.Array):
        return node
    try:
        level = node["0"]
    except KeyError:
        raise SegmentError(f"zarr group {location} has no level '0' array (expected OME-Zarr style levels)") from None
    if not isinstance(level, zarr.Array):
        raise SegmentError(f"zarr group {location}: '0' is a group, not an array")
    return level


def _open_local_array(path: str):
    return _level_zero(zarr.open(path, mode="r"), path)


def _open_local_zarr(path: pathlib.Path, lru_bytes: int, name: str | None = None, source: str = "zarr") -> Segment:
    try:
        volume = ChunkCachedVolume(functools.partial(_open_local_array, str(path)), lru_bytes)
    except SegmentError:
        raise
    except Exception as error:  # noqa: BLE001 - zarr raises many kinds for a malformed store
        raise SegmentError(f"{path} is not a readable zarr array or group: {type(error).__name__}: {error}") from error
    segment_id = name or path.name.removesuffix(".zarr")
    folders = [path, path.parent]
    mask = _first_existing(_label_candidates(folders, segment_id, "mask"))
    labels = _first_existing(_label_candidates(folders, segment_id, "inklabels"))
    return _finish_segment(volume, mask, labels, segment_id, source, str(path))


def _open_remote_array(zarr_url: str, cache_dir: str, store_options: dict):
    store = CachedHTTPStore(zarr_url, pathlib.Path(cache_dir), **store_options)
    return _level_zero(zarr.open(store=store, mode="r"), zarr_url)


def segment_zarr_url(segment_id: str, scroll: str, data_url: str | None = None) -> str:
    if scroll not in SCROLL_SCANS:
        raise SegmentError(f"scroll {scroll!r} is unknown; known scrolls: {', '.join(sorted(SCROLL_SCANS))}")
    root = (data_url or os.environ.get("VESUVIUS_DATA_URL") or DEFAULT_DATA_URL).rstrip("/")
    return f"{root}/other/dev/scrolls/{scroll}/segments/{SCROLL_SCANS[scroll]}/{segment_id}.zarr"


def _open_remote(segment_id, scroll, cache_dir, lru_bytes, data_url, store_options) -> Segment:
    zarr_url = segment_zarr_url(segment_id, scroll, data_url)
    opener = functools.partial(_open_remote_array, zarr_url, str(cache_dir), store_options)
    try:
        volume = ChunkCachedVolume(opener, lru_bytes)
    except RemoteReadError as error:
        raise SegmentError(str(error)) from error
    except (FileNotFoundError, KeyError, zarr.errors.NodeNotFoundError) as error:
        raise SegmentError(
            f"segment {segment_id} not found at {zarr_url}/ (scroll={scroll}, scan {SCROLL_SCANS[scroll]}); "
            "check the segment ID and the scroll setting"
        ) from error
    # Labels sit inside the zarr folder or beside it. Their absence is not remembered (labels get added
    # to the server later), so a cached segment without them asks again, and works offline with a warning.
    store = CachedHTTPStore(zarr_url, cache_dir, **store_options)
    segments_url = zarr_url.rsplit("/", 1)[0]

    def fetch_first(kind: str) -> tuple[str, bytes] | None:
        for url in (f"{zarr_url}/{segment_id}_{kind}.png", f"{segments_url}/{segment_id}_{kind}.png"):
            try:
                data = zarr.core.sync.sync(store.fetch_url(url, remember_absent=False))
            except RemoteReadError as error:
                warnings.warn(f"segment {segment_id}: no {kind} PNG in the cache and the server did not answer ({error})")
                return None
            if data is not None:
                return url, data
        return None

    return _finish_segment(
        volume, fetch_first("mask"), fetch_first("inklabels"), segment_id, "remote", zarr_url,
        voxel_size_um=float(SCROLL_SCANS[scroll].split("_")[1].removesuffix("um")),
    )


# ---------------------------------------------------------------- layer folders


def _find_layer_folder(path: pathlib.Path) -> pathlib.Path | None:
    for name in LAYER_FOLDER_NAMES:
        if (path / name).is_dir():
            return path / name
    return None


def _layer_number(path: pathlib.Path) -> int:
    return int(path.stem) if path.stem.isdigit() else -1


def _open_layer_stack(layer_paths: list[str]) -> LayerStack:
    return LayerStack([pathlib.Path(path) for path in layer_paths])


def _open_layer_folder(path: pathlib.Path, lru_bytes: int) -> Segment:
    layer_folder = _find_layer_folder(path)
    layer_paths = sorted(
        (p for p in layer_folder.iterdir() if p.suffix.lower() in LAYER_SUFFIXES and p.stem.isdigit()),
        key=_layer_number,
    )
    if not layer_paths:
        raise SegmentError(f"{layer_folder} holds no numbered layer images (00.tif, 01.tif, ...)")
    try:
        volume = ChunkCachedVolume(functools.partial(_open_layer_stack, [str(p) for p in layer_paths]), lru_bytes)
    except ValueError as error:
        raise SegmentError(str(error)) from error
    segment_id = path.name
    mask = _first_existing(_label_candidates([path], segment_id, "mask"))
    labels = _first_existing(_label_candidates([path], segment_id, "inklabels"))
    return _finish_segment(volume, mask, labels, segment_id, "layers", str(layer_folder))


# ---------------------------------------------------------------- demo


def demo_segment_path(seed: int, cache_dir: pathlib.Path) -> pathlib.Path:
    """Build the demo segment of `seed` once (atomically: build aside, then rename) and return its path."""
    from pretrain.data import demo  # deferred: only the demo needs the generator

    target = pathlib.Path(cache_dir) / "demo" / f"seed{seed}-v{demo.GENERATOR_VERSION}.zarr"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.parent / f".building-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        demo.build_demo_segment(building, seed=seed)
        os.rename(building, target)
    except OSError:
        if not target.is_dir():  # not a lost race with another process building the same seed
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _open_demo(seed: int, cache_dir: pathlib.Path, lru_bytes: int) -> Segment:
    return _open_local_zarr(demo_segment_path(seed, cache_dir), lru_bytes, name=f"demo:{seed}", source="demo")
