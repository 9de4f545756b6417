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
The same read three ways, taking turns, for what the chunks' recorded CRC-32C costs
(`remote.CachedHTTPStore.cached_body_problem`):
- without: the check as it was before digests (the header checks alone);
- first read in a process: every chunk's CRC-32C computed and compared (this process's record of compared files
  emptied before each read);
- repeated read: the files compared already in this process (what every later read of a run pays).
Writes benchmarks/results/cache_warm_read.json and prints a Markdown table.
"""
import json
import os
import pathlib
import statistics
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np

from pretrain.data import cache, remote
from pretrain.data.segment import open_segment
from tests.loopback_server import LoopbackServer
from tests.synthetic import random_volume, rectangle_mask, write_server_segment
from pretrain.utils import errors

FILES = 64
ROUNDS = 20
DIGEST_ROUNDS = 15
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
    results = {"load_average_before": os.getloadavg(), "segment": {}}
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
            segment.volume[:, :, :]  # every chunk's digest compared once
            with_digest = remote.CachedHTTPStore.cached_body_problem

            def without_digest(store, url, path, held, decode):
                return store.body_problem(url, held.data, decode=decode)

            def first_read():
                remote._digest_compared.clear()

            ways = {"without_digest": (without_digest, None), "first_read": (with_digest, first_read),
                    "repeated_read": (with_digest, None)}
            timings = {name: [] for name in ways}
            for round_index in range(DIGEST_ROUNDS):
                names = list(ways)
                for name in names[round_index % 3:] + names[:round_index % 3]:
                    check, before = ways[name]
                    remote.CachedHTTPStore.cached_body_problem = check
                    if before is not None:
                        before()
                    start = time.perf_counter()
                    segment.volume[:, :, :]
                    timings[name].append(time.perf_counter() - start)
            remote.CachedHTTPStore.cached_body_problem = with_digest
        # The CRC-32C alone over the same chunk bodies: the work a first read adds, without the reads' noise.
        bodies = [path.read_bytes() for path in (folder / "cache").rglob("*")
                  if path.is_file() and path.parent.name.isdigit() and path.name.isdigit()]
        crc_times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for body in bodies:
                cache.body_digest(body)
            crc_times.append(time.perf_counter() - start)
        results["segment"]["crc32c_s"] = statistics.median(crc_times)
        results["segment"]["crc32c_bodies"] = len(bodies)
        chunks = 17 * 2 * 2
        warm_read = statistics.median(timings["repeated_read"])
        results["segment"] = {**results["segment"], "chunks": chunks, "warm_read_s": warm_read, "per_chunk_us": warm_read / chunks * 1e6,
                              **{f"{name}_s": statistics.median(times) for name, times in timings.items()}}
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
    without = results["segment"]["without_digest_s"]
    print(f"\nchunk digests (CRC-32C), median of {DIGEST_ROUNDS} warm reads of the segment each: without "
          f"{without:.3f} s; first read in a process {results['segment']['first_read_s']:.3f} s "
          f"(x{results['segment']['first_read_s'] / without:.3f}); repeated read {warm_read:.3f} s "
          f"(x{warm_read / without:.3f}); the CRC-32C alone over its {results['segment']['crc32c_bodies']} chunk "
          f"bodies {results['segment']['crc32c_s'] * 1e3:.1f} ms = {results['segment']['crc32c_s'] / without:.2%} "
          "of the read without")
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
