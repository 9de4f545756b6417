"""Does random sampling through the chunk cache fetch each chunk once, and a warm rerun nothing?

    python benchmarks/remote_fetch.py                       # 400 random 32 × 128² crops from a 65 × 2048² segment
    python benchmarks/remote_fetch.py --side 4096 --samples 1000

A loopback HTTP server (127.0.0.1) serves a generated segment in the data server's layout (v2 OME-Zarr,
slash-separated chunk keys). Pretraining-style random crops are drawn through `open_segment`; the
server counts requests and bytes. Over-fetch = bytes sent ÷ bytes of the unique chunks the crops need
(computed from the crop positions). A second pass through a fresh segment handle (empty in-process LRU)
on the warm disk cache must fetch nothing; tests/test_remote.py checks the same from a second process.
Writes benchmarks/results/remote_fetch.json and prints a Markdown table.
"""
import argparse
import itertools
import json
import pathlib
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from pretrain.data.patches import RandomPatchDataset  # noqa: E402
from pretrain.data.segment import open_segment  # noqa: E402
from tests.conftest import SERVER_SEGMENTS, rectangle_mask, write_png  # noqa: E402
from tests.loopback_server import LoopbackServer  # noqa: E402

SEGMENT_ID = "20230827161847"


def build_mirror(root: pathlib.Path, side: int, chunks: tuple[int, int, int]) -> pathlib.Path:
    import zarr

    zarr_path = root / SERVER_SEGMENTS / f"{SEGMENT_ID}.zarr"
    group = zarr.open_group(zarr_path, mode="w", zarr_format=2)
    array = group.create_array("0", shape=(65, side, side), chunks=chunks, dtype="uint8",
                               chunk_key_encoding={"name": "v2", "separator": "/"})
    rng = np.random.default_rng(0)
    for y in range(0, side, chunks[1]):
        array[:, y : y + chunks[1], :] = rng.integers(0, 255, (65, min(chunks[1], side - y), side), dtype=np.uint8)
    write_png(zarr_path / f"{SEGMENT_ID}_mask.png", rectangle_mask((side, side), margin=side // 16))
    return zarr_path


def needed_chunk_keys(dataset: RandomPatchDataset, samples: int, chunks: tuple[int, int, int]) -> set[str]:
    layers = dataset.windows[0].layers
    keys = set()
    for index in range(samples):
        _, y, x = dataset.sample_position(index)
        ranges = [range(start // size, (stop - 1) // size + 1) for start, stop, size in
                  ((layers.start, layers.stop, chunks[0]), (y, y + dataset.tile_size, chunks[1]),
                   (x, x + dataset.tile_size, chunks[2]))]
        keys.update("0/" + "/".join(map(str, coordinates)) for coordinates in itertools.product(*ranges))
    return keys


def sample(server_url: str, cache: pathlib.Path, args) -> tuple[RandomPatchDataset, float]:
    segment = open_segment(SEGMENT_ID, cache_dir=cache, data_url=server_url, http_concurrency=args.concurrency,
                           lru_bytes=args.lru_mb * 2**20)
    dataset = RandomPatchDataset([segment], depth=args.depth, tile_size=args.tile, samples_per_epoch=args.samples, seed=0)
    started = time.perf_counter()
    for index in range(args.samples):
        dataset[index]
    return dataset, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--lru_mb", type=int, default=64, help="small on purpose: evicted chunks must come from disk")
    args = parser.parse_args()
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
        "settings": vars(args), "unique_chunks_needed": len(keys), "unique_chunk_bytes": needed_bytes,
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
    main()
