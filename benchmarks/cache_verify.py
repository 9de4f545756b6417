"""What does checking every cached file cost a warm read?

    python benchmarks/cache_verify.py            # a (65, 1024, 1024) segment, 68 chunks of (4, 512, 512), 15 rounds

Since issue 23 every read of a cached file checks it before zarr decodes it (`CachedHTTPStore.body_problem`):
a chunk's Blosc header against its body and its array's chunk size (no decode), metadata as JSON, images by
their structure. `download_segment.sh` and every fresh download also decode each chunk in full. Measured here,
on a segment served as the data server lays it out (Blosc-zstd, bit-shuffle; CT-like voxels: a smooth
papyrus-like intensity plus noise, so chunks compress as real ones do, not as random bytes, which Blosc stores
uncompressed) and on a warm disk cache (the files in the page cache):
- per chunk, median of the rounds: reading its bytes, and on bytes in memory the header check and the
  full-decode check;
- the whole warm read of the segment through `open_segment` with no in-process LRU, with the check and with
  it switched off, in alternating rounds so that the machine's load favours neither.
Writes benchmarks/results/cache_verify.json and prints a Markdown table.
"""
import json
import os
import pathlib
import statistics
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np

from benchmarks.cache_warm_read import per_read_microseconds
from pretrain.data.remote import CachedHTTPStore, cache_path_for_url
from pretrain.data.segment import open_segment
from tests.loopback_server import LoopbackServer
from tests.synthetic import rectangle_mask, write_server_segment
from pretrain.utils import errors

SEGMENT_ID = "20230827161847"
SHAPE = (65, 1024, 1024)
ROUNDS = 15


def ct_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """(Z, Y, X) uint8: a slow intensity ramp through depth and across the sheet, plus noise of a few grey levels."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    ramp_zyx = (np.linspace(40, 160, depth)[:, None, None] + np.linspace(0, 30, width)[None, None, :]
                + np.zeros((1, height, 1)))
    return np.clip(ramp_zyx + rng.normal(0, 6, shape), 0, 255).astype(np.uint8)


def per_chunk_microseconds(store: CachedHTTPStore, urls: list[str]) -> dict[str, float]:
    """Median over rounds of each step's time per chunk; the steps take turns in a rotating order."""
    paths = {url: cache_path_for_url(store.cache_dir, url) for url in urls}
    contents = {url: path.read_bytes() for url, path in paths.items()}

    def passes(problem: str | None) -> None:
        assert problem is None, problem

    steps = {  # the checks on bytes already read, as fetch_url runs them
        "read_us": lambda url: paths[url].read_bytes(),
        "header_check_us": lambda url: passes(store.body_problem(url, contents[url], decode=False)),
        "full_decode_check_us": lambda url: passes(store.body_problem(url, contents[url], decode=True)),
    }
    return per_read_microseconds(urls, steps, ROUNDS)


def main() -> None:
    results = {"load_average_before": os.getloadavg(), "shape": SHAPE}
    checked_problem = CachedHTTPStore.body_problem
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        mirror = folder / "mirror"
        write_server_segment(mirror, SEGMENT_ID, ct_like_volume(SHAPE), rectangle_mask(SHAPE[1:]))
        chunk_files = [path for path in (mirror / "other").rglob("*") if path.is_file() and "/0/" in path.as_posix()
                       and not path.name.startswith(".")]
        results["chunks"] = len(chunk_files)
        results["mean_compressed_bytes"] = float(np.mean([path.stat().st_size for path in chunk_files]))
        with LoopbackServer(mirror) as server:
            segment = open_segment(SEGMENT_ID, cache_dir=folder / "cache", data_url=server.url, lru_bytes=0)
            segment.volume[:, :, :]  # cold: fills the disk cache (each chunk checked and decoded once, on arrival)
            store = segment.volume.backend.store
            urls = [f"{server.url}/{path.relative_to(mirror).as_posix()}" for path in chunk_files]
            results["per_chunk"] = per_chunk_microseconds(store, urls)
            requests_when_warm = sum(server.requests.values())
            timings = {"checked_s": [], "unchecked_s": []}
            for round_index in range(2 * ROUNDS):
                # Pairs of rounds, the order swapped each pair: a change of the machine's load hits both alike.
                checked = (round_index % 2 == 0) == (round_index // 2 % 2 == 0)
                CachedHTTPStore.body_problem = checked_problem if checked else (lambda *args, **kwargs: None)
                start = time.perf_counter()
                segment.volume[:, :, :]
                timings["checked_s" if checked else "unchecked_s"].append(time.perf_counter() - start)
            CachedHTTPStore.body_problem = checked_problem
            assert sum(server.requests.values()) == requests_when_warm  # warm: the server was asked nothing
    results["warm_read"] = {name: statistics.median(values) for name, values in timings.items()}
    results["warm_read"]["paired_ratio"] = statistics.median(
        checked / unchecked for checked, unchecked in zip(timings["checked_s"], timings["unchecked_s"]))
    results["load_average_after"] = os.getloadavg()
    output = REPO_ROOT / "benchmarks" / "results" / "cache_verify.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(results, indent=1))

    per_chunk, warm = results["per_chunk"], results["warm_read"]
    header, decode = per_chunk["header_check_us"], per_chunk["full_decode_check_us"]
    per_chunk_read_us = warm["unchecked_s"] / results["chunks"] * 1e6
    print(f"{results['chunks']} chunks of (4, 512, 512) uint8, {results['mean_compressed_bytes'] / 2**10:.0f} KiB each "
          "compressed on average")
    print("| per chunk (median of rounds) | µs | share of a warm chunk read |")
    print("|---|---|---|")
    print(f"| read its bytes | {per_chunk['read_us']:.1f} | |")
    print(f"| header check (every cached read) | {header:.1f} | {100 * header / per_chunk_read_us:.2f} % |")
    print(f"| full decode check (downloads, download_segment.sh) | {decode:.1f} | "
          f"{100 * decode / per_chunk_read_us:.1f} % |")
    print(f"\nwarm read of the whole segment (no LRU), medians of {ROUNDS} rounds each: {warm['checked_s']:.3f} s "
          f"checked, {warm['unchecked_s']:.3f} s unchecked; checked ÷ unchecked, median of the pairs of rounds: "
          f"{warm['paired_ratio']:.3f}; {per_chunk_read_us:.0f} µs per chunk unchecked")
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
