"""Lazy (Z, Y, X) volumes: chunk-aligned reads through a byte-bounded LRU of decompressed chunks.

Every segment source (remote zarr, local zarr, TIFF/JPG/PNG layer folder) ends up as a
`ChunkCachedVolume`. It never holds the volume: a read decodes only the chunks it touches and keeps
the most recently used ones, up to `lru_bytes`, so overlapping tiles (inference strides, random crops
near each other) decode each chunk once while memory stays bounded whatever the segment size.

The backend is opened lazily and again in every process (a DataLoader worker must not reuse its
parent's HTTP session or file handles), from a picklable `opener` callable.
"""
import collections
import itertools
import os
import pathlib
import shutil
import threading
from collections.abc import Callable

import numpy as np
import tifffile
import zarr
import zarr.storage

from pretrain.data.images import decode_image, image_header
from pretrain.utils import temporaries
from pretrain.utils.errors import OneLineError

DEFAULT_LRU_BYTES = 512 * 2**20


class UndecodableChunkError(OneLineError, ValueError):
    """A chunk of a zarr on disk that its codec cannot decode (a truncated or damaged file); the message names it."""


def _normalise_index(key, shape: tuple[int, ...]) -> tuple[list[slice], list[int]]:
    """Turn an index of ints/slices (step 1) into in-bounds slices; also the axes to squeeze."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(item is Ellipsis for item in key):
        position = key.index(Ellipsis)
        key = key[:position] + (slice(None),) * (len(shape) - len(key) + 1) + key[position + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for a volume of shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    slices, squeeze_axes = [], []
    for axis, (item, size) in enumerate(zip(key, shape)):
        if isinstance(item, (int, np.integer)):
            index = int(item) + size if item < 0 else int(item)
            if not 0 <= index < size:
                raise IndexError(f"index {item} is out of bounds for axis {axis} of size {size}")
            slices.append(slice(index, index + 1))
            squeeze_axes.append(axis)
        elif isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step != 1:
                raise IndexError("volumes support only contiguous slices (step 1)")
            slices.append(slice(start, max(start, stop)))
        else:
            raise IndexError(f"unsupported index {item!r}: use ints and slices")
    return slices, squeeze_axes


class ChunkCachedVolume:
    """A read-only (Z, Y, X) array-like over a chunked backend with an LRU of decoded chunks.

    `opener()` returns the backend: anything with `shape`, `dtype`, `chunks` and numpy slicing.
    """

    def __init__(self, opener: Callable, lru_bytes: int = DEFAULT_LRU_BYTES) -> None:
        self.opener = opener
        self.lru_bytes = lru_bytes
        backend = opener()
        self.shape = tuple(int(size) for size in backend.shape)
        self.dtype = np.dtype(backend.dtype)
        self.chunks = tuple(int(size) for size in backend.chunks)
        self.ndim = len(self.shape)
        self._reset(backend)

    def _reset(self, backend) -> None:
        self._backend = backend
        self._pid = os.getpid()
        self._lru: collections.OrderedDict[tuple[int, ...], np.ndarray] = collections.OrderedDict()
        self._lru_used = 0
        self._lock = threading.Lock()
        self.decoded_chunks = 0  # chunks read from the backend (LRU misses), for tests and benchmarks

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_backend", "_lru", "_lock"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset(None)

    def _get_backend(self):
        if self._backend is None or self._pid != os.getpid():
            self._reset(self.opener())
        return self._backend

    @property
    def backend(self):
        """What the volume reads from (a zarr array, a LayerStack), opened in this process."""
        with self._lock:
            return self._get_backend()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        array = self[...]
        return array if dtype is None else array.astype(dtype)

    def _chunk_bounds(self, chunk_index: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(
            slice(index * size, min((index + 1) * size, total))
            for index, size, total in zip(chunk_index, self.chunks, self.shape)
        )

    def _read_chunks(self, chunk_indices: list[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
        """Read missing chunks with one backend call over their bounding box (remote reads overlap)."""
        backend = self._get_backend()
        low = [min(index[axis] for index in chunk_indices) for axis in range(self.ndim)]
        high = [max(index[axis] for index in chunk_indices) for axis in range(self.ndim)]
        box = self._chunk_bounds(tuple(low))
        box = tuple(
            slice(start.start, self._chunk_bounds(tuple(high))[axis].stop) for axis, start in enumerate(box)
        )
        try:
            block = np.asarray(backend[box])
        except (RuntimeError, ValueError) as error:  # the codec's words for a damaged body (Zstd, Blosc)
            # A remote chunk is checked where it enters the cache (pretrain.data.remote); a local zarr's only here.
            if not (isinstance(backend, zarr.Array) and isinstance(backend.store, zarr.storage.LocalStore)) \
                    or isinstance(error, OneLineError):
                raise
            raise UndecodableChunkError(self._undecodable(backend, chunk_indices, error)) from error
        chunks = {}
        for chunk_index in chunk_indices:
            bounds = self._chunk_bounds(chunk_index)
            local = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(bounds, box))
            chunks[chunk_index] = np.ascontiguousarray(block[local])
        self.decoded_chunks += len(chunk_indices)
        return chunks

    def _undecodable(self, backend: zarr.Array, chunk_indices: list[tuple[int, ...]], error: Exception) -> str:
        """The line naming the first chunk of `chunk_indices` that does not decode, found by reading each alone."""
        for chunk_index in chunk_indices:
            try:
                backend[self._chunk_bounds(chunk_index)]
            except (RuntimeError, ValueError) as chunk_error:
                return (f"{backend.store_path}/{backend.metadata.encode_chunk_key(chunk_index)}: chunk {chunk_index} "
                        f"cannot be decoded ({chunk_error}): the file is truncated or damaged; copy or download the "
                        "segment again")
        return f"{backend.store_path}: chunks {chunk_indices} cannot be decoded ({error})"

    def _remember(self, chunk_index: tuple[int, ...], chunk: np.ndarray) -> None:
        if chunk.nbytes > self.lru_bytes:
            return
        self._lru[chunk_index] = chunk
        self._lru_used += chunk.nbytes
        while self._lru_used > self.lru_bytes:
            _, evicted = self._lru.popitem(last=False)
            self._lru_used -= evicted.nbytes

    def __getitem__(self, key) -> np.ndarray:
        slices, squeeze_axes = _normalise_index(key, self.shape)
        output = np.zeros(tuple(s.stop - s.start for s in slices), dtype=self.dtype)
        if output.size == 0:
            return output.squeeze(axis=tuple(squeeze_axes))
        chunk_ranges = [
            range(s.start // size, (s.stop - 1) // size + 1) for s, size in zip(slices, self.chunks)
        ]
        chunk_indices = list(itertools.product(*chunk_ranges))
        with self._lock:
            self._get_backend()
            found = {index: self._lru[index] for index in chunk_indices if index in self._lru}
            for index in found:
                self._lru.move_to_end(index)
            missing = [index for index in chunk_indices if index not in found]
            if missing:
                fresh = self._read_chunks(missing)
                for index, chunk in fresh.items():
                    self._remember(index, chunk)
                found.update(fresh)
        for chunk_index, chunk in found.items():
            bounds = self._chunk_bounds(chunk_index)
            overlap = [slice(max(b.start, s.start), min(b.stop, s.stop)) for b, s in zip(bounds, slices)]
            source = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(overlap, bounds))
            target = tuple(slice(o.start - s.start, o.stop - s.start) for o, s in zip(overlap, slices))
            output[target] = chunk[source]
        return output.squeeze(axis=tuple(squeeze_axes)) if squeeze_axes else output


class LayerStack:
    """Kaggle / Grand Prize layer folder (`layers/00.tif … 64.tif`) as a (Z, Y, X) backend.

    TIFFs are read per window: uncompressed ones memory-mapped, others through tifffile's zarr view
    (decoding only the strips/tiles a window touches). JPG/PNG cannot be read by window, so a chunk
    there is one whole layer (decoded once, then kept by the volume's LRU while it fits).
    """

    TILE = 256

    def __init__(self, layer_paths: list[pathlib.Path]) -> None:
        self.layer_paths = [pathlib.Path(path) for path in layer_paths]
        self._layers: dict[int, object] = {}
        first = self._open_layer(0)
        height, width = first.shape[:2]
        self.dtype = np.dtype(first.dtype)
        for index, path in enumerate(self.layer_paths[1:], start=1):
            layer = self._open_layer(index)
            if tuple(layer.shape[:2]) != (height, width) or np.dtype(layer.dtype) != self.dtype:
                raise ValueError(
                    f"layer {path} is {layer.shape[:2]} {layer.dtype}, but {self.layer_paths[0].name} "
                    f"is {(height, width)} {self.dtype}: all layers must match"
                )
        self.shape = (len(self.layer_paths), height, width)
        whole_layers = self.layer_paths[0].suffix.lower() not in (".tif", ".tiff")
        self.chunks = (1, height, width) if whole_layers else (1, min(self.TILE, height), min(self.TILE, width))

    def _open_layer(self, index: int):
        if index in self._layers:
            return self._layers[index]
        path = self.layer_paths[index]
        try:
            if path.suffix.lower() in (".tif", ".tiff"):
                try:
                    layer = tifffile.memmap(path, mode="r")
                except ValueError:  # compressed or tiled: not memory-mappable
                    layer = zarr.open_array(tifffile.imread(path, aszarr=True), mode="r")
            else:
                layer = _DecodedImage(path)
        except Exception as error:  # noqa: BLE001 - any decoder failure is the same user-facing problem
            raise ValueError(f"cannot read layer image {path}: {error}") from error
        if len(layer.shape) != 2:
            raise ValueError(f"layer image {path} has shape {tuple(layer.shape)}; expected one grey (Y, X) image")
        self._layers[index] = layer
        return layer

    def __getitem__(self, key) -> np.ndarray:
        z_slice, y_slice, x_slice = key
        return np.stack([np.asarray(self._open_layer(z)[y_slice, x_slice]) for z in range(*z_slice.indices(self.shape[0]))])


class _DecodedImage:
    """A JPG/PNG layer: shape and dtype from the header, pixels decoded on access.

    Its size is the one its header declares (real layers exceed PIL's bomb guard, so none is applied: see
    `pretrain.data.images`); LayerStack holds every layer to the first one's size before any is decoded, and a
    decode checks the header again, so a layer that declares another size is refused, never decoded.
    """

    DTYPES = {"L": np.uint8, "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16}

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        header = image_header(path)
        if header.mode not in self.DTYPES:
            raise ValueError(f"image mode {header.mode} is not a grey 8- or 16-bit layer")
        self.dtype = np.dtype(self.DTYPES[header.mode])
        self.shape = header.shape_yx

    def __getitem__(self, key) -> np.ndarray:
        try:
            return decode_image(self.path, self.shape)[key]
        except ValueError as error:
            raise ValueError(f"layer image {self.path} {error}") from error


PROGRESS_FILE = "layers_done"


def convert_layers_to_zarr(layer_paths: list[pathlib.Path], target: pathlib.Path, chunks: tuple[int, int, int],
                           on_layers: Callable[[int], None] | None = None) -> None:
    """Write a layer stack (TIFF/JPG/PNG files, all of one shape and dtype) into a zarr group with level "0"
    at `target`, `chunks[0]` layers at a time, so memory holds a band of those layers, never the volume.

    Built as `{target}.partial`, renamed to `target` only when complete; a killed conversion resumes
    from the last finished band of layers (recorded in the partial zarr's `layers_done`). Raises
    ValueError when the layers do not match. The caller keeps one process per target at a time.
    """
    stack = LayerStack(layer_paths)  # opens every layer: shapes and dtypes are checked before anything is written
    depth, height, width = stack.shape
    partial = target.with_name(target.name + ".partial")
    progress_file = partial / PROGRESS_FILE
    if progress_file.is_file():
        temporaries.remove_dead_temporaries(partial.iterdir())  # a kill while the progress record was written
        layers_done = int(progress_file.read_text())
        array = zarr.open_array(partial, path="0", mode="r+")
    else:
        shutil.rmtree(partial, ignore_errors=True)
        group = zarr.open_group(partial, mode="w")
        array = group.create_array("0", shape=stack.shape, chunks=chunks, dtype=stack.dtype)
        layers_done = 0
    if on_layers is not None:
        on_layers(layers_done)
    # A JPG/PNG layer decodes whole, so it is read once per band of layers; a TIFF by rows of chunks.
    rows = height if stack.chunks[1:] == (height, width) else chunks[1]
    for z_start in range(layers_done, depth, chunks[0]):
        z_stop = min(z_start + chunks[0], depth)
        for y_start in range(0, height, rows):
            y_stop = min(y_start + rows, height)
            array[z_start:z_stop, y_start:y_stop] = stack[z_start:z_stop, y_start:y_stop, 0:width]
        # Bands start on chunk boundaries, so a band cut short by a kill is rewritten whole on resume.
        temporaries.write_atomic(progress_file, lambda temporary: temporary.write_text(str(z_stop)))
        if on_layers is not None:
            on_layers(z_stop - z_start)
    # Renamed with its progress record, then the record deleted: a kill in between leaves a complete zarr
    # (whose leftovers `pretrain.data.segment` deletes on reopening), never a finished conversion to redo.
    os.rename(partial, target)
    (target / PROGRESS_FILE).unlink()
