"""What does the cache bound's bookkeeping cost on a warm read?

    python benchmarks/cache_warm_read.py            # 64 files of 1 MiB and 64 of 16 KiB, 20 rounds

A warm read of a cached file was `path.read_bytes()`; with the bound (`pretrain.data.cache.read_held`) it also
takes a shared flock while reading and, at most once a minute per file, sets its access time. Measured per
read, median of the rounds, on files in the page cache (a warm cache), for 1 MiB files (a real (4, 512, 512)
uint8 chunk) and 16 KiB ones (where a fixed cost weighs most):
- `read_bytes`: the read before;
- `read_held`: the read now (the access time fresh: no write);
- `read_held + utime`: the read now when the access time is set (the first read of a file each minute).
Then a whole warm read of a (65, 1024, 1024) segment served as the data server lays it out (68 chunks of
(4, 512, 512), Blosc-zstd), through `open_segment`, with no in-process LRU: what the bookkeeping is a part of.
Writes benchmarks/results/cache_warm_read.json and prints a Markdown table.
"""
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from pretrain.data import cache  # noqa: E402
from pretrain.data.segment import open_segment  # noqa: E402
from tests.loopback_server import LoopbackServer  # noqa: E402
from tests.synthetic import random_volume, rectangle_mask, write_server_segment  # noqa: E402
from pretrain.utils import errors  # noqa: E402

FILES = 64
ROUNDS = 20
SEGMENT_ID = "20230827161847"


def per_read_microseconds(items: list, reads: dict, round_count: int = ROUNDS) -> dict[str, float]:
    """Median over `round_count` rounds of each read's time per item (file, URL); within a round the reads take
    turns in a rotating order, so that neither the machine's load nor the order favours one."""
    rounds = {name: [] for name in reads}
    for round_index in range(round_count):
        names = list(reads)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in names:
            start = time.perf_counter()
            for item in items:
                reads[name](item)
            rounds[name].append((time.perf_counter() - start) / len(items))
    return {name: statistics.median(times) * 1e6 for name, times in rounds.items()}


def read_held_with_utime(path: pathlib.Path) -> bytes:
    cache.RECENCY_RESOLUTION_NS = -1  # every read sets the access time
    try:
        return cache.read_held(path)
    finally:
        cache.RECENCY_RESOLUTION_NS = 60 * 10**9


def main() -> None:
    results = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        rows = []
        for label, size in (("1 MiB", 2**20), ("16 KiB", 2**14)):
            paths = []
            for index in range(FILES):
                path = folder / label.replace(" ", "") / f"{index}.0.0"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(np.random.default_rng(index).bytes(size))
                paths.append(path)
            for path in paths:  # into the page cache, and access times fresh
                cache.read_held(path)
            rows.append({"file": label, **per_read_microseconds(paths, {
                "read_bytes_us": pathlib.Path.read_bytes, "read_held_us": cache.read_held,
                "read_held_utime_us": read_held_with_utime})})
        results["files"] = rows

        volume = random_volume((65, 1024, 1024), seed=3)
        mirror = folder / "mirror"
        write_server_segment(mirror, SEGMENT_ID, volume, rectangle_mask(volume.shape[1:]))
        with LoopbackServer(mirror) as server:
            segment = open_segment(SEGMENT_ID, cache_dir=folder / "cache", data_url=server.url, lru_bytes=0)
            segment.volume[:, :, :]  # cold: fills the disk cache
            timings = []
            for _ in range(5):
                start = time.perf_counter()
                segment.volume[:, :, :]
                timings.append(time.perf_counter() - start)
        chunks = 17 * 2 * 2
        warm_read = statistics.median(timings)
        results["segment"] = {"chunks": chunks, "warm_read_s": warm_read, "per_chunk_us": warm_read / chunks * 1e6}
    results["load_average_after"] = os.getloadavg()
    output = REPO_ROOT / "benchmarks" / "results" / "cache_warm_read.json"
    output.write_text(json.dumps(results, indent=1))

    print("| file | read_bytes | read_held | read_held + utime | added per read |")
    print("|---|---|---|---|---|")
    for row in rows:
        added = row["read_held_us"] - row["read_bytes_us"]
        print(f"| {row['file']} | {row['read_bytes_us']:.1f} µs | {row['read_held_us']:.1f} µs | "
              f"{row['read_held_utime_us']:.1f} µs | {added:+.1f} µs |")
    per_chunk = results["segment"]["per_chunk_us"]
    added_1mib = rows[0]["read_held_us"] - rows[0]["read_bytes_us"]
    print(f"\nwarm read of the (65, 1024, 1024) segment: {warm_read:.3f} s, {per_chunk:.0f} µs per chunk; "
          f"the lock adds {added_1mib:+.1f} µs per chunk = {100 * added_1mib / per_chunk:+.2f} %")
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
