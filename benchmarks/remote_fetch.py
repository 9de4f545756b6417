"""How many requests does the chunk cache make: random sampling (each chunk once, a warm rerun nothing), and
opening a segment laid out as on the real data server (cold and warm)?

    python benchmarks/remote_fetch.py                       # 400 random 32 × 128² crops from a 65 × 2048² segment
    python benchmarks/remote_fetch.py --side 4096 --samples 1000
    python benchmarks/remote_fetch.py --open                # requests to open a real-layout segment, cold and warm
    PYTHONPATH=/tmp/before python benchmarks/remote_fetch.py --open --exact_labels   # another checkout's pretrain/

A loopback HTTP server (127.0.0.1) serves a generated segment in the data server's layout (v2 OME-Zarr,
slash-separated chunk keys). Pretraining-style random crops are drawn through `open_segment`; the
server counts requests and bytes. Over-fetch = bytes sent ÷ bytes of the unique chunks the crops need
(computed from the crop positions). A second pass through a fresh segment handle (empty in-process LRU)
on the warm disk cache must fetch nothing; tests/test_remote.py checks the same from a second process.
Writes benchmarks/results/remote_fetch.json and prints a Markdown table.

`--open` lays the segment out as the real server does (tests/synthetic.py `write_server_segment`:
(4, 512, 512) Blosc-zstd chunks, ink labels beside the zarr padded to whole 256-px tiles, the mask only in
the volume package), opens it three times on one cache (cold, then warm twice) and counts the requests
of each open by kind (zarr metadata, images, chunks; 404s among them). `--exact_labels` serves labels of
the volume's own size (code from before the padding rule refuses padded ones); `PYTHONPATH=DIR` imports
`pretrain` from DIR ahead of the installed repository (`git archive COMMIT pretrain | tar -x -C /tmp/before`;
notes/performance.md names the commit). Writes benchmarks/results/remote_open.json.
"""
import argparse
import itertools
import json
import pathlib
import tempfile
import time
import warnings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np

import pretrain
from pretrain.data.patches import InputSettings, RandomPatchDataset
from pretrain.data.segment import open_segment
from tests.loopback_server import LoopbackServer
from tests.synthetic import (SERVER_SEGMENTS, rectangle_mask, server_folder, write_png,
                             write_server_segment)
from pretrain.utils import errors  # noqa: E402

SEGMENT_ID = "20230827161847"
# Where `pretrain` was imported from: this checkout, or DIR with `PYTHONPATH=DIR` (another checkout's code).
CODE_ROOT = pathlib.Path(pretrain.__file__).resolve().parents[1]


def build_mirror(root: pathlib.Path, side: int, chunks: tuple[int, int, int]) -> pathlib.Path:
    import zarr

    zarr_path = root / SERVER_SEGMENTS / f"{SEGMENT_ID}.zarr"
    group = zarr.open_group(zarr_path, mode="w", zarr_format=2)
    array = group.create_array("0", shape=(65, side, side), chunks=chunks, dtype="uint8",
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    rng = np.random.default_rng(0)
    for y in range(0, side, chunks[1]):
        array[:, y : y + chunks[1], :] = rng.integers(0, 255, (65, min(chunks[1], side - y), side), dtype=np.uint8)
    # Where the server keeps a segment's mask: its volume package (a mask inside the zarr is not looked for).
    write_png(server_folder(root, SEGMENT_ID) / f"{SEGMENT_ID}_mask.png",
              rectangle_mask((side, side), margin=side // 16))
    return zarr_path


def needed_chunk_keys(dataset: RandomPatchDataset, samples: int, chunks: tuple[int, int, int]) -> set[str]:
    layers = dataset.windows[0].layers
    keys = set()
    for index in range(samples):
        _, y, x = dataset.sample_position(0, index)
        ranges = [range(start // size, (stop - 1) // size + 1) for start, stop, size in
                  ((layers.start, layers.stop, chunks[0]), (y, y + dataset.tile_size, chunks[1]),
                   (x, x + dataset.tile_size, chunks[2]))]
        keys.update("0/" + "/".join(map(str, coordinates)) for coordinates in itertools.product(*ranges))
    return keys


def sample(server_url: str, cache: pathlib.Path, args) -> tuple[RandomPatchDataset, float]:
    segment = open_segment(SEGMENT_ID, cache_dir=cache, data_url=server_url, http_concurrency=args.concurrency,
                           lru_bytes=args.lru_mb * 2**20)
    dataset = RandomPatchDataset([segment], InputSettings(depth=args.depth, tile_size=args.tile),
                                 samples_per_epoch=args.samples, seed=0)
    started = time.perf_counter()
    for index in range(args.samples):
        dataset[0, index]
    return dataset, time.perf_counter() - started


def build_real_layout(root: pathlib.Path, side: int, exact_labels: bool) -> tuple[int, int]:
    """A segment as the real server lays it out; returns its (Y, X). Not a multiple of the 256-px tile, so the
    served labels are padded, as label tools pad them. The voxels are constant: request counts do not depend
    on them, and constant chunks compress to almost nothing, so building is quick."""
    shape_yx = (side - 100, side - 60)
    volume = np.full((65, *shape_yx), 100, np.uint8)
    labels = np.zeros(shape_yx, np.uint8)
    labels[side // 3 : side // 2, side // 4 : side // 2] = 255
    zarr_path = write_server_segment(root, SEGMENT_ID, volume, rectangle_mask(shape_yx, margin=side // 16), labels)
    if exact_labels:
        write_png(zarr_path.parent / f"{SEGMENT_ID}_inklabels.png", labels)
    return shape_yx


def measure_open(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        shape_yx = build_real_layout(folder / "mirror", args.side, args.exact_labels)
        with LoopbackServer(folder / "mirror") as server:
            for run in ("cold", "warm", "warm"):
                server.reset_counts()
                started = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        segment = open_segment(SEGMENT_ID, cache_dir=folder / "cache", data_url=server.url)
                        outcome = "mask derived from the voxels" if any(
                            "no mask found" in str(warning.message) for warning in caught) else "official mask"
                        outcome += ", labels" if segment.inklabels is not None else ", no labels"
                    except ValueError as error:
                        outcome = f"error: {error}"
                rows.append({"run": run, **server.requests_by_kind(), "requests": sum(server.requests.values()),
                             "bytes": server.bytes_sent, "seconds": time.perf_counter() - started, "outcome": outcome,
                             "paths": dict(server.requests)})
    result = {"settings": {key: str(value) for key, value in vars(args).items()}, "opens": rows}
    output = REPO_ROOT / "benchmarks" / "results" / "remote_open.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    shape = f"65 × {shape_yx[0]} × {shape_yx[1]}"
    print("| code | segment | open | requests | zarr metadata | images | chunks | of them 404 | bytes | outcome |")
    for row in rows:
        print(f"| {CODE_ROOT} | {shape} | {row['run']} | {row['requests']} | {row['metadata']} | {row['image']} | "
              f"{row['chunk']} | {row['not_found']} | {row['bytes']} | {row['outcome']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--lru_mb", type=int, default=64, help="small on purpose: evicted chunks must come from disk")
    parser.add_argument("--open", action="store_true", help="count the requests of opening a real-layout segment")
    parser.add_argument("--exact_labels", action="store_true", help="with --open: labels of the volume's size")
    args = parser.parse_args()
    if args.open:
        measure_open(args)
        return
    chunks = (16, 128, 128)
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        zarr_path = build_mirror(folder / "mirror", args.side, chunks)
        with LoopbackServer(folder / "mirror") as server:
            dataset, cold_seconds = sample(server.url, folder / "cache", args)
            keys = needed_chunk_keys(dataset, args.samples, chunks)
            needed_bytes = sum((zarr_path / key).stat().st_size for key in keys)
            cold = {"requests": sum(server.requests.values()), "chunk_requests": server.chunk_requests(),
                    "bytes": server.bytes_sent, "max_concurrent": server.max_active}
            chunk_bytes_sent = sum((zarr_path / key.split(".zarr/", 1)[1]).stat().st_size * count
                                   for key, count in server.requests.items() if server._is_chunk(key))
            server.requests.clear()
            server.bytes_sent = 0
            _, warm_seconds = sample(server.url, folder / "cache", args)
            warm = {"chunk_requests": server.chunk_requests(), "bytes": server.bytes_sent}
    result = {
        "settings": {**vars(args), "code": str(CODE_ROOT)}, "unique_chunks_needed": len(keys),
        "unique_chunk_bytes": needed_bytes,
        "cold": cold, "cold_chunk_bytes": chunk_bytes_sent, "overfetch": chunk_bytes_sent / needed_bytes,
        "warm": warm, "cold_seconds": cold_seconds, "warm_seconds": warm_seconds,
    }
    output = REPO_ROOT / "benchmarks" / "results" / "remote_fetch.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print("| segment | crops | unique chunks needed | chunk requests (cold) | over-fetch | max concurrent | warm rerun |")
    print(f"| 65 × {args.side}² | {args.samples} × {args.depth}×{args.tile}² | {len(keys)} ({needed_bytes / 2**20:.1f} MiB) | "
          f"{cold['chunk_requests']} | {result['overfetch']:.3f}× | {cold['max_concurrent']} (limit {args.concurrency}) | "
          f"{warm['chunk_requests']} requests, {warm['bytes']} bytes |")


if __name__ == "__main__":
    errors.install(__file__)
    main()
