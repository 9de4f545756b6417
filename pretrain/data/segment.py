"""The one way every script gets segment data: `open_segment(spec)`.

A segment is a flattened papyrus surface volume (Z ≈ 65 layers of Y × X images) with a mask of where
the papyrus is and, sometimes, ink labels. `spec` may be:

1. a segment ID (`20230827161847`) on the Vesuvius data server (`root` is `VESUVIUS_DATA_URL` or the
   public server), laid out per scroll as `SCROLLS` says (shared/REFERENCES.md, "The data server as it is"):
   - the volume: the segment zarr `{root}/other/dev/scrolls/{scroll}/segments/{scan}/{id}.zarr/` (scrolls
     1 and 5), read chunk by chunk through a persistent cache (`pretrain.data.remote`); else the layer
     images of the volume package, `{root}/full-scrolls/{volpkg}/paths/{id}/layers/00.tif … 64.tif`
     (every scroll; `.jpg` too), downloaded once and converted into a chunked zarr in the cache;
   - the mask: `paths/{id}/{id}_mask.png` in the volume package (older segments: `paths/{id}_superseded/`),
     else beside the zarr, else derived from the voxels with a warning;
   - the ink labels: `{id}_inklabels.png` beside the zarr (or in the volume package folder the layers came from),
     and, where a label set has them, `{id}_negatives.png` (pixels painted as not ink) beside them;
2. a local zarr path (v2 or v3; a group with level "0", or a bare array);
3. a layer folder in the Kaggle / Grand Prize layout (`layers/00.tif …`, `mask.png`, `inklabels.png`,
   `negatives.png`);
4. `demo` or `demo:<seed>`: the generated demo segment, built once and cached as a local zarr;
5. `scroll<N>:<id>` (`scroll4:20231107190228`): the segment ID of scroll N, whatever `scroll` says. A bare ID is
   of `scroll` (pretraining's `--scroll`; 1 by default), so only segments of other scrolls need the prefix;
6. a list of any of these, scrolls, zarrs, layer folders and demos mixed (returns a list of segments).

One segment has many spellings (`demo:1` and `demo:01`, an ID bare and as `scroll1:<id>`, a path relative or absolute,
with or without a trailing slash): `segment_identity(spec)` is its one name, and every script compares, deduplicates,
names and caches segments by it.

Label and mask images may be padded at the bottom and right, as the villa and Grand Prize tools pad
them to whole tiles: `read_label_image` crops or pads them to the volume, with a warning.

Why not the `vesuvius` package: it pins zarr<3 and numcodecs<0.16, its `Volume` keeps no chunk cache on
disk, and `Volume(...)` without `domain=`/`path=` probes the cloud metadata address 169.254.169.254.
The URL layout above is the server's own, so no package is needed to find a segment.
"""
import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os
import pathlib
import re
import shutil
import socket
import uuid
import warnings

import numpy as np
import tqdm
import zarr
import zarr.core.sync

from pretrain.data import cache
from pretrain.data.images import decode_image, image_header
from pretrain.data.remote import (
    CachedHTTPStore,
    RemoteAuthError,
    RemoteReadError,
    cache_path_for_url,
    default_cache_dir,
    split_credentials,
)
from pretrain.data.volume import (
    DEFAULT_LRU_BYTES,
    PROGRESS_FILE,
    ChunkCachedVolume,
    LayerStack,
    convert_layers_to_zarr,
)
from pretrain.utils.errors import ENVIRONMENT_ERRNOS, OneLineError

DEFAULT_DATA_URL = "https://dl.ash2txt.org"


@dataclasses.dataclass(frozen=True)
class ScrollOnServer:
    """Where one scroll's segments are on the data server."""

    volume_package: str  # under `{root}/full-scrolls/`; its `paths/{id}/` holds each segment's mask and layer images
    segment_scan: str | None  # `{energy}keV_{res}um` folder of its segment zarrs; None: the server has none

    @property
    def voxel_size_um(self) -> float | None:
        return float(self.segment_scan.split("_")[1].removesuffix("um")) if self.segment_scan else None


# Every scroll's place on the data server, in one table (edit it when the server changes). Only scrolls 1
# and 5 have segment zarrs; the segments of 2, 3 and 4 exist as layer images in their volume package.
SCROLLS = {
    "1": ScrollOnServer("Scroll1/PHercParis4.volpkg", "54keV_7.91um"),
    "2": ScrollOnServer("Scroll2/PHercParis3.volpkg", None),
    "3": ScrollOnServer("Scroll3/PHerc332.volpkg", None),
    "4": ScrollOnServer("Scroll4/PHerc1667.volpkg", None),
    "5": ScrollOnServer("Scroll5/PHerc172.volpkg", "53keV_7.91um"),
}
SEGMENT_LAYERS = 65  # a server segment's layer images: 00 … 64
SERVER_LAYER_SUFFIXES = (".tif", ".jpg")
# Chunks of the zarr that server layer images are converted into: those of the server's segment zarrs.
CONVERTED_CHUNKS = (4, 512, 512)
LAYER_FOLDER_NAMES = ("layers", "surface_volume")
LAYER_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
SEGMENT_ID_PATTERN = re.compile(r"\d{8,}(_[\w-]+)?")
# `scroll4:20231107190228`: the scroll travels with its ID, so one list mixes scrolls. Written like `demo:7`, and read
# before any path is looked for, so a file of that name cannot shadow it.
SCROLL_SPEC_PATTERN = re.compile(r"scroll([^:/\s]*):(.*)", re.IGNORECASE)
# Label tools and the villa / Grand Prize loaders pad images at the bottom and right to whole tiles of this size.
LABEL_PADDING_TILE = 256


class SegmentError(OneLineError, ValueError):
    """A segment cannot be opened as asked; the message names the file, URL, shape or setting."""


@dataclasses.dataclass
class Segment:
    volume: ChunkCachedVolume  # (Z, Y, X) uint8, uint16 or float, lazy: slice it, never load it whole
    mask: np.ndarray  # (Y, X) bool: where the papyrus is
    inklabels: np.ndarray | None  # (Y, X) uint8 in {0, 1}, or None when the segment has no labels
    name: str
    source: str  # "remote", "zarr", "layers" or "demo"
    location: str  # URL (never with credentials) or path the volume is read from
    voxel_size_um: float | None = None
    # (Y, X) uint8 in {0, 1}: pixels painted as *not* ink (`{id}_negatives.png`, as community label sets ship
    # beside the ink labels), or None. With it, pixels neither ink nor not ink are unknown, not background.
    negatives: np.ndarray | None = None
    identity: str = ""  # segment_identity of the spec it was opened by: what tells two segments apart

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
    recheck_absent: bool = False,
):
    """Open a segment (or a list of segments) from any source; see the module docstring for `spec`.

    `recheck_absent` (what `download_segment.sh` sets) asks the server again about every file the cache
    remembers as absent (mask, labels), in case an earlier answer was wrong or the file was added since.
    """
    options = dict(scroll=scroll, cache_dir=cache_dir, lru_bytes=lru_bytes, data_url=data_url,
                   http_retries=http_retries, http_backoff_seconds=http_backoff_seconds,
                   http_concurrency=http_concurrency, recheck_absent=recheck_absent)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise SegmentError("the list of segments is empty")
        return [open_segment(item, **options) for item in spec]
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parsed = parse_spec(spec, scroll, data_url)
    if parsed.kind == "demo":
        segment = _open_demo(parsed.seed, cache_dir, lru_bytes)
    elif parsed.kind == "path":
        if _find_layer_folder(parsed.path) is not None:
            segment = _open_layer_folder(parsed.path, lru_bytes)
        else:
            segment = _open_local_zarr(parsed.path, lru_bytes)
    else:
        store_options = dict(max_concurrency=http_concurrency, retries=http_retries, backoff_seconds=http_backoff_seconds)
        segment = _open_remote(parsed.segment_id, parsed.scroll, cache_dir, lru_bytes, data_url, store_options,
                               recheck_absent)
    segment.identity = parsed.identity
    return segment


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """What a spec names, whatever its spelling: a demo seed, a local path, or a segment ID of a scroll."""

    kind: str  # "demo", "path" or "server"
    seed: int | None = None  # "demo"
    path: pathlib.Path | None = None  # "path": as given (user folder expanded), for opening and for messages
    scroll: str | None = None  # "server"
    segment_id: str | None = None  # "server"

    @property
    def identity(self) -> str:
        """`demo:<seed>` (the seed as a number), `scroll<N>:<id>`, or the path resolved (absolute, symbolic links
        followed, no trailing slash)."""
        if self.kind == "demo":
            return f"demo:{self.seed}"
        if self.kind == "server":
            return f"scroll{self.scroll}:{self.segment_id}"
        return str(self.path.resolve())


def parse_spec(spec, scroll: str = "1", data_url: str | None = None) -> SegmentSpec:
    """What `spec` names, read by the rules open_segment opens it by (a bare ID is of `scroll`); a spec it could
    not open for its form (a demo seed that is no number, an unknown scroll, neither a path nor an ID) is an error."""
    spec = str(spec).strip()
    if spec == "demo" or spec.startswith("demo:"):
        seed_text = spec.partition(":")[2] or "0"
        if not seed_text.isdigit():
            raise SegmentError(f"demo segment spec {spec!r}: the seed after 'demo:' must be a whole number")
        return SegmentSpec("demo", seed=int(seed_text))
    named_scroll = SCROLL_SPEC_PATTERN.fullmatch(spec)
    if named_scroll:
        scroll, spec = named_scroll.groups()
        if scroll not in SCROLLS:
            raise SegmentError(f"segment spec {named_scroll.string!r}: the data server {_server_root(data_url)[0]} has "
                               f"no scroll {scroll!r} in SCROLLS (pretrain/data/segment.py); known scrolls: "
                               f"{', '.join(sorted(SCROLLS))}")
        if not SEGMENT_ID_PATTERN.fullmatch(spec):
            raise SegmentError(f"segment spec {named_scroll.string!r}: {spec!r} after 'scroll{scroll}:' is not a segment "
                               "ID (digits such as 20231107190228)")
    path = pathlib.Path(spec).expanduser()
    if named_scroll is None and path.exists():
        return SegmentSpec("path", path=path)
    if SEGMENT_ID_PATTERN.fullmatch(spec):
        return SegmentSpec("server", scroll=str(scroll), segment_id=spec)
    raise SegmentError(
        f"segment {spec!r} is neither an existing path, a segment ID (digits such as 20230827161847), nor 'demo'"
    )


def segment_identity(spec, scroll: str = "1", data_url: str | None = None) -> str:
    """The one name of the segment `spec` names, however it is spelled: `demo:1` for demo:1 and demo:01,
    `scroll1:20230827161847` for that ID bare (of `scroll`) or with its scroll, and a local path resolved
    (`/data/seg.zarr` for seg.zarr, ./seg.zarr/ and /data/seg.zarr/ in /data). Whatever compares, deduplicates,
    names or caches segments compares these, never the spellings. Opens nothing, and asks no server."""
    return parse_spec(spec, scroll, data_url).identity


# ---------------------------------------------------------------- labels and mask


def _label_fit(shape_yx: tuple[int, int], description: str, expected_yx: tuple[int, int]) -> str:
    """How a label image of `shape_yx` fits the volume: "exact", "crop" (larger by less than a tile at the
    bottom/right: padding) or "pad" (smaller by less than a tile); any other shape is an error naming both."""
    if shape_yx == expected_yx:
        return "exact"
    extra_height, extra_width = shape_yx[0] - expected_yx[0], shape_yx[1] - expected_yx[1]
    if 0 <= extra_height < LABEL_PADDING_TILE and 0 <= extra_width < LABEL_PADDING_TILE:
        return "crop"
    if -LABEL_PADDING_TILE < extra_height <= 0 and -LABEL_PADDING_TILE < extra_width <= 0:
        return "pad"
    raise SegmentError(f"{description} has shape (Y, X) = {shape_yx}, but the volume's (Y, X) is {expected_yx}")


def _fit_to_volume(image_yx: np.ndarray, description: str, expected_yx: tuple[int, int]) -> np.ndarray:
    """Crop bottom/right padding that holds nothing, or pad a slightly smaller image; refuse anything else."""
    fit = _label_fit(image_yx.shape, description, expected_yx)
    if fit == "exact":
        return image_yx
    (height, width), (expected_height, expected_width) = image_yx.shape, expected_yx
    both_shapes = f"{description} has shape (Y, X) = {image_yx.shape}, but the volume's (Y, X) is {expected_yx}"
    if fit == "crop":
        if image_yx[expected_height:].any() or image_yx[:, expected_width:].any():
            raise SegmentError(f"{both_shapes}; its extra rows or columns are not empty, so they are not padding")
        warnings.warn(f"{both_shapes}: cropped its bottom/right padding (which holds nothing)")
        return image_yx[:expected_height, :expected_width]
    warnings.warn(f"{both_shapes}: padded it with zeros at the bottom/right")
    return np.pad(image_yx, ((0, expected_height - height), (0, expected_width - width)))


def read_label_image(data: bytes, description: str, expected_shape: tuple[int, int]) -> np.ndarray:
    """Decode a mask / ink-label PNG into (Y, X) uint8 in {0, 1}: RGB(A) → grey, 0/255 → 0/1.

    An image larger than the volume by less than a tile (`LABEL_PADDING_TILE`) at the bottom/right, with
    nothing in the extra rows and columns, is cropped; one smaller by less than a tile is padded with
    zeros (each with a warning naming both shapes). Any other shape is an error naming both, from the
    image's header, before a pixel is decoded (`pretrain.data.images`: a small file can declare a huge image).
    """
    expected_shape = tuple(expected_shape)
    try:
        header = image_header(data)
        _label_fit(header.shape_yx, description, expected_shape)
        image = decode_image(data, header.shape_yx)
    except SegmentError:
        raise
    except ValueError as error:
        raise SegmentError(f"{description} {error}") from error
    if image.ndim == 3:
        # Painted labels come as RGB(A): ink is wherever any colour channel is lit.
        image = image[..., :3].max(axis=-1)
    threshold = 1 if image.max() <= 1 else (np.iinfo(image.dtype).max + 1) // 2
    return _fit_to_volume((image >= threshold).astype(np.uint8), description, tuple(expected_shape))


def is_supported_dtype(dtype: np.dtype) -> bool:
    """uint8 and uint16 voxels, which normalisation scales by their maximum, or float ones, which it scales by a
    stated range (`pretrain.data.patches.check_voxel_dtype`). Others would train silently on wrong values:
    int8 scaled to [-1, 1], uint32 to a sliver near 0."""
    return (dtype.kind == "u" and dtype.itemsize <= 2) or dtype.kind == "f"


def _mask_from_voxels(volume: ChunkCachedVolume, description: str) -> np.ndarray:
    warnings.warn(f"{description}: no mask found; deriving it from the non-zero voxels of the middle layer")
    return volume[volume.shape[0] // 2] > 0


def check_negatives(inklabels_yx: np.ndarray | None, negatives_yx: np.ndarray, description: str) -> None:
    """A pixel cannot be painted both ink and not ink: an error naming how many are."""
    overlap = 0 if inklabels_yx is None else int(np.count_nonzero((inklabels_yx > 0) & (negatives_yx > 0)))
    if overlap:
        raise SegmentError(f"{description} overlaps the ink labels in {overlap} pixels: a pixel cannot be both ink and "
                           "not ink")


def _finish_segment(volume, mask_bytes, label_bytes, name, source, location, voxel_size_um=None,
                    negatives_bytes=None) -> Segment:
    if volume.ndim != 3:
        raise SegmentError(f"{location} holds an array of shape {volume.shape}; a segment is (Z, Y, X)")
    if not is_supported_dtype(volume.dtype):
        raise SegmentError(f"segment {name} ({location}) holds {volume.dtype.name} voxels: only uint8 and uint16 "
                           "are read, and float with its range stated (float_range); convert it to uint8 or uint16")
    expected = volume.shape[1:]
    if mask_bytes is None:
        mask = _mask_from_voxels(volume, location)
    else:
        mask = read_label_image(mask_bytes[1], f"mask {mask_bytes[0]}", expected).astype(bool)
    if not mask.any():
        raise SegmentError(f"the mask of segment {name} ({location}) is empty: nothing to sample")
    inklabels = negatives = None
    if label_bytes is not None:
        inklabels = read_label_image(label_bytes[1], f"ink labels {label_bytes[0]}", expected)
    if negatives_bytes is not None:
        negatives = read_label_image(negatives_bytes[1], f"negatives {negatives_bytes[0]}", expected)
        check_negatives(inklabels, negatives, f"negatives {negatives_bytes[0]}")
    return Segment(volume, mask, inklabels, name, source, location, voxel_size_um, negatives)


def _first_existing(paths: list[pathlib.Path]) -> tuple[str, bytes] | None:
    for path in paths:
        if path.is_file():
            return str(path), path.read_bytes()
    return None


def _label_candidates(folders: list[pathlib.Path], segment_id: str, kind: str) -> list[pathlib.Path]:
    return [folder / name for folder in folders for name in (f"{kind}.png", f"{segment_id}_{kind}.png")]


# ---------------------------------------------------------------- local zarr


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


def _open_converted_array(path: str):
    cache.hold_converted(pathlib.Path(path))  # in every process that reads it: never evicted under a reader
    return _open_local_array(path)


def _open_local_zarr(path: pathlib.Path, lru_bytes: int, name: str | None = None, source: str = "zarr") -> Segment:
    try:
        volume = ChunkCachedVolume(functools.partial(_open_local_array, str(path)), lru_bytes)
    except SegmentError:
        raise
    except Exception as error:  # noqa: BLE001 - zarr raises many kinds for a malformed store
        raise SegmentError(f"{path} is not a readable zarr array or group: {type(error).__name__}: {error}") from error
    segment_id = name or path.name.removesuffix(".zarr")
    # Local conventions: ScrollMAE keeps `{id}_mask.png` inside its `.zarr`, Kaggle folders `mask.png` beside.
    folders = [path, path.parent]
    mask = _first_existing(_label_candidates(folders, segment_id, "mask"))
    labels = _first_existing(_label_candidates(folders, segment_id, "inklabels"))
    negatives = _first_existing(_label_candidates(folders, segment_id, "negatives"))
    return _finish_segment(volume, mask, labels, segment_id, source, str(path), negatives_bytes=negatives)


# ---------------------------------------------------------------- the data server


def scroll_on_server(scroll: str) -> ScrollOnServer:
    if scroll not in SCROLLS:
        raise SegmentError(f"scroll {scroll!r} is unknown; known scrolls: {', '.join(sorted(SCROLLS))}")
    return SCROLLS[scroll]


def _server_root(data_url: str | None):
    """(root URL without credentials, Credentials or None) of the data server."""
    root, credentials = split_credentials(data_url or os.environ.get("VESUVIUS_DATA_URL") or DEFAULT_DATA_URL)
    return root.rstrip("/"), credentials


def segment_zarr_url(segment_id: str, scroll: str, data_url: str | None = None) -> str | None:
    """The segment zarr's URL (without credentials), or None for a scroll whose segments have no zarrs."""
    scan = scroll_on_server(scroll).segment_scan
    if scan is None:
        return None
    return f"{_server_root(data_url)[0]}/other/dev/scrolls/{scroll}/segments/{scan}/{segment_id}.zarr"


def segment_folder_urls(segment_id: str, scroll: str, data_url: str | None = None) -> list[str]:
    """The segment's folders in its scroll's volume package: `paths/{id}`, then the older `paths/{id}_superseded`."""
    paths_url = f"{_server_root(data_url)[0]}/full-scrolls/{scroll_on_server(scroll).volume_package}/paths"
    return [f"{paths_url}/{segment_id}", f"{paths_url}/{segment_id}_superseded"]


def _open_remote_array(zarr_url: str, cache_dir: str, store_options: dict, zarr_format: int):
    store = CachedHTTPStore(zarr_url, pathlib.Path(cache_dir), **store_options)
    return zarr.open_array(store=store, path="0", mode="r", zarr_format=zarr_format)


def _level_zero_metadata(zarr_format: int) -> str:
    return "0/.zarray" if zarr_format == 2 else "0/zarr.json"


def _find_remote_zarr(fetcher: CachedHTTPStore, zarr_url: str, tried: list[str], cached_only: bool) -> int | None:
    """The zarr format (2, the server's, or 3) of the segment zarr's level 0, or None where there is none.

    Whether it exists is never remembered as absent: a wrong answer must not hide a segment for good.
    """
    for zarr_format in (2, 3):
        url = f"{zarr_url}/{_level_zero_metadata(zarr_format)}"
        if cached_only:
            if cache_path_for_url(fetcher.cache_dir, url).is_file():
                return zarr_format
            continue
        tried.append(url)
        if zarr.core.sync.sync(fetcher.fetch_url(url, remember_absent=False)) is not None:
            return zarr_format
    return None


def _converted_zarr_path(cache_dir: pathlib.Path, layers_url: str) -> pathlib.Path:
    """Where a server layer folder lives in the cache once converted: `…/paths/{id}/layers.zarr`."""
    return cache_path_for_url(cache_dir, layers_url + ".zarr")


@contextlib.contextmanager
def _exclusive_lock(cache_dir: pathlib.Path, url: str):
    """Hold a lock named after `url` (another process fetching the same segment, e.g. a second torchrun rank,
    waits for this one). The lock files live in `{cache_dir}/.locks`, away from the cached data."""
    lock_dir = pathlib.Path(cache_dir) / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / hashlib.sha1(url.encode()).hexdigest(), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _download_layers(fetcher: CachedHTTPStore, segment_id: str, layers_url: str, suffix: str) -> list[pathlib.Path]:
    """Every layer image of a server layer folder into the cache (those already there are kept: resumable)."""
    urls = [f"{layers_url}/{index:02d}{suffix}" for index in range(SEGMENT_LAYERS)]
    cached = sum(cache_path_for_url(fetcher.cache_dir, url).is_file() for url in urls)
    with tqdm.tqdm(total=len(urls), initial=cached, unit="layer", desc=f"downloading {segment_id}") as progress:

        async def download(url: str) -> pathlib.Path | None:
            if cache_path_for_url(fetcher.cache_dir, url).is_file():
                return cache_path_for_url(fetcher.cache_dir, url)
            path = await fetcher.download_url(url)
            if path is None:  # believed when it repeats, as for chunks
                path = await fetcher.download_url(url)
            progress.update(1)
            return path

        async def download_all() -> list:
            return await asyncio.gather(*(download(url) for url in urls), return_exceptions=True)

        results = zarr.core.sync.sync(download_all())
    for result in results:
        if isinstance(result, BaseException):
            raise result
    missing = [url.rsplit("/", 1)[1] for url, path in zip(urls, results) if path is None]
    if missing:
        raise SegmentError(
            f"segment {segment_id}: layer folder {layers_url}/ lacks {', '.join(missing)} "
            f"(a segment has {SEGMENT_LAYERS} layers, 00{suffix} … {SEGMENT_LAYERS - 1}{suffix})"
        )
    return results


def _fetch_layer_segment(fetcher: CachedHTTPStore, segment_id: str, layers_url: str, suffix: str) -> pathlib.Path:
    """Download a server layer folder and convert it into a chunked zarr in the cache; its path.

    Both steps resume where a killed run stopped, and the zarr gets its final name only when complete.
    Once converted, the downloaded layer images are deleted: the zarr holds the same voxels. On a bad
    folder (missing layers, layers of different sizes) nothing of it is left in the cache.
    """
    converted = _converted_zarr_path(fetcher.cache_dir, layers_url)
    raw_folder = cache_path_for_url(fetcher.cache_dir, layers_url)
    with _exclusive_lock(fetcher.cache_dir, layers_url):
        if not converted.is_dir():  # else another process finished it while this one waited
            try:
                layer_paths = _download_layers(fetcher, segment_id, layers_url, suffix)
                with tqdm.tqdm(total=SEGMENT_LAYERS, unit="layer", desc=f"converting {segment_id}") as progress:
                    convert_layers_to_zarr(layer_paths, converted, CONVERTED_CHUNKS, on_layers=progress.update)
            except (SegmentError, ValueError) as error:
                shutil.rmtree(raw_folder, ignore_errors=True)
                shutil.rmtree(converted.with_name(converted.name + ".partial"), ignore_errors=True)
                if isinstance(error, SegmentError):
                    raise
                raise SegmentError(f"segment {segment_id} ({layers_url}/): {error}") from error
            except RemoteReadError:
                raise
            except OSError as error:  # the disk's (a full one while converting), not the server's; a rerun resumes
                layer_bytes = sum(path.stat().st_size for path in raw_folder.glob("*") if path.is_file())
                raise fetcher.cache_write_error(error, f"the zarr converted from {layers_url}/ (at most about the "
                                                "size of its layer images)", layer_bytes) from None
        # Inside the lock whoever converted it: this process's probe may have fetched a layer meanwhile.
        _remove_conversion_leftovers(converted, raw_folder)
    cache.hold_converted(converted)  # before the bound is enforced: it must not evict what it is opening
    bound = cache.max_bytes()
    if bound is not None:
        cache.enforce_bound(fetcher.cache_dir, bound)  # the writes of a conversion are not counted one by one
    return converted


def _remove_conversion_leftovers(converted: pathlib.Path, raw_folder: pathlib.Path) -> None:
    """Delete what a conversion leaves once `converted` is complete (a kill can come between the rename and
    this): the downloaded layer images and the progress record."""
    shutil.rmtree(raw_folder, ignore_errors=True)
    (converted / PROGRESS_FILE).unlink(missing_ok=True)


def _cached_layer_zarr(cache_dir: pathlib.Path, folder_urls: list[str]):
    """(converted zarr path, layers URL) of a server layer folder converted by an earlier run, or (None, None).
    What that run's conversion left beside it (killed before its clean-up) is deleted here."""
    for folder_url in folder_urls:
        layers_url = f"{folder_url}/layers"
        converted = _converted_zarr_path(cache_dir, layers_url)
        if converted.is_dir():
            raw_folder = cache_path_for_url(cache_dir, layers_url)
            if raw_folder.exists() or (converted / PROGRESS_FILE).exists():
                with _exclusive_lock(cache_dir, layers_url):
                    _remove_conversion_leftovers(converted, raw_folder)
            return converted, layers_url
    return None, None


def _find_remote_layers(fetcher: CachedHTTPStore, segment_id: str, folder_urls: list[str], tried: list[str]):
    """(converted zarr path, layers URL) of the segment's layer images in the volume package, or (None, None)."""
    for folder_url in folder_urls:
        layers_url = f"{folder_url}/layers"
        for suffix in SERVER_LAYER_SUFFIXES:
            first_url = f"{layers_url}/00{suffix}"
            tried.append(first_url)
            # The first layer is the probe: it is needed anyway, and a 404 leaves nothing in the cache.
            if zarr.core.sync.sync(fetcher.download_url(first_url)) is not None:
                return _fetch_layer_segment(fetcher, segment_id, layers_url, suffix), layers_url
    return None, None


def _open_remote(segment_id, scroll, cache_dir, lru_bytes, data_url, store_options, recheck_absent) -> Segment:
    layout = scroll_on_server(scroll)
    root, credentials = _server_root(data_url)
    store_options = {**store_options, "credentials": credentials}
    try:
        cache.max_bytes()  # a bad SEGMENT_CACHE_MAX_GB is one line now, not an error in the middle of a download
    except ValueError as error:
        raise SegmentError(str(error)) from None
    fetcher = CachedHTTPStore(root, cache_dir, **store_options)  # for whole files: probes, PNGs, layer images
    zarr_url = segment_zarr_url(segment_id, scroll, root)
    folder_urls = segment_folder_urls(segment_id, scroll, root)
    tried: list[str] = []
    try:
        # What the cache holds decides first, so that a cached segment opens offline; the zarr wins.
        zarr_format = _find_remote_zarr(fetcher, zarr_url, tried, cached_only=True) if zarr_url else None
        converted, layers_url = _cached_layer_zarr(cache_dir, folder_urls) if zarr_format is None else (None, None)
        if zarr_format is None and converted is None:
            if zarr_url:
                zarr_format = _find_remote_zarr(fetcher, zarr_url, tried, cached_only=False)
            if zarr_format is None:
                converted, layers_url = _find_remote_layers(fetcher, segment_id, folder_urls, tried)
    except RemoteReadError as error:
        raise SegmentError(str(error)) from error
    if zarr_format is not None:
        opener = functools.partial(_open_remote_array, zarr_url, str(cache_dir), store_options, zarr_format)
        location = zarr_url
    elif converted is not None:
        opener = functools.partial(_open_converted_array, str(converted))
        location = layers_url
    else:
        raise SegmentError(
            f"segment {segment_id} not found at {', '.join(tried)} (scroll={scroll}); "
            f"check the segment ID and the scroll setting (one segment of scroll N: scrollN:{segment_id})"
        )
    try:
        volume = ChunkCachedVolume(opener, lru_bytes)
    except RemoteReadError as error:
        raise SegmentError(str(error)) from error

    def fetch_first(urls: list[str], kind: str) -> tuple[str, bytes] | None:
        for url in urls:
            try:
                data = zarr.core.sync.sync(fetcher.fetch_url(url, recheck_absent=recheck_absent))
            except RemoteAuthError as error:
                raise SegmentError(str(error)) from error
            except RemoteReadError as error:
                warnings.warn(f"segment {segment_id}: no {kind} in the cache and the server did not answer ({error})")
                return None
            if data is not None:
                return url, data
        return None

    # Absences are remembered too (a warm open asks nothing); download_segment.sh asks again.
    beside_zarr = [zarr_url.rsplit("/", 1)[0]] if zarr_format is not None else []
    mask = fetch_first([f"{url}/{segment_id}_mask.png" for url in folder_urls + beside_zarr], "mask")
    label_folders = beside_zarr if zarr_format is not None else [layers_url.rsplit("/", 1)[0]]
    labels = fetch_first([f"{url}/{segment_id}_inklabels.png" for url in label_folders], "ink labels")
    negatives = fetch_first([f"{url}/{segment_id}_negatives.png" for url in label_folders], "negatives")
    return _finish_segment(volume, mask, labels, segment_id, "remote", location, voxel_size_um=layout.voxel_size_um,
                           negatives_bytes=negatives)


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
    negatives = _first_existing(_label_candidates([path], segment_id, "negatives"))
    return _finish_segment(volume, mask, labels, segment_id, "layers", str(layer_folder), negatives_bytes=negatives)


# ---------------------------------------------------------------- demo


def demo_cache_path(seed: int, cache_dir: pathlib.Path) -> pathlib.Path:
    """Where `demo:<seed>` lives in the segment cache (whatever built it: tests put small demos there)."""
    from pretrain.data import demo  # deferred: only the demo needs the generator

    return pathlib.Path(cache_dir) / "demo" / f"seed{seed}-v{demo.GENERATOR_VERSION}.zarr"


def demo_segment_path(seed: int, cache_dir: pathlib.Path) -> pathlib.Path:
    """Build the demo segment of `seed` once (atomically: build aside, then rename) and return its path."""
    from pretrain.data import demo  # deferred: only the demo needs the generator

    target = demo_cache_path(seed, cache_dir)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(target.parent)
    building = target.parent / f".building-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        demo.build_demo_segment(building, seed=seed)
        os.rename(building, target)
    except OSError as error:
        if target.is_dir():  # a lost race with another process building the same seed
            pass
        elif error.errno in ENVIRONMENT_ERRNOS:  # a full or read-only cache: zarr's error names no file
            free = shutil.disk_usage(target.parent).free / 2**20
            raise SegmentError(f"the demo segment demo:{seed} could not be built in {target.parent}: "
                               f"{error.strerror} ({free:.1f} MiB free there; SEGMENT_CACHE_DIR moves the cache)") from error
        else:
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _remove_dead_builds(folder: pathlib.Path) -> None:
    """Delete the half-built demos of this machine's processes that are gone: a build that failed (a full disk) can
    leave one, its zarr writes still landing after its own clean-up. (A shared cache's other machines keep theirs.)"""
    for building in folder.glob(f".building-{socket.gethostname()}-*-*"):
        process_id = building.name.rsplit("-", 2)[1]
        if process_id.isdigit() and not _process_alive(int(process_id)):
            shutil.rmtree(building, ignore_errors=True)


def _process_alive(process_id: int) -> bool:
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's, alive
        return True
    return True


def _open_demo(seed: int, cache_dir: pathlib.Path, lru_bytes: int) -> Segment:
    return _open_local_zarr(demo_segment_path(seed, cache_dir), lru_bytes, name=f"demo:{seed}", source="demo")
