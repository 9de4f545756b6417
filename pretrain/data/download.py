"""Prefetch a whole segment from the data server into the cache (what `download_segment.sh` runs).

    python -m pretrain.data.download SEGMENT_ID [SCROLL] [--concurrency 8] [--cache-dir DIR]
    ./download_segment.sh SEGMENT_ID [SCROLL] [--concurrency 8] [--cache-dir DIR]      # the same, its arguments passed on

Resumable by construction: what is already in the cache is skipped, so a second run after an
interruption fetches only what is missing. It is also the repair tool: every cached chunk is checked (the
CRC-32C recorded as it entered the cache, its codec header and a full decode; metadata, mask and labels on their
read) and fetched again where damaged,
and every file the cache remembers as absent on the server (a chunk, a mask, labels) is asked for again,
and cached if the server has it now, so a wrong 404 or labels added later never stay missed. A segment of
layer images (scrolls 2, 3, 4) is downloaded and converted by `open_segment` itself; a run after
completion fetches nothing else.
"""
import asyncio
import itertools
import json
import math
import os
import pathlib
import sys

import tqdm
import zarr
import zarr.core.sync

from pretrain.data import cache
from pretrain.data.remote import (CachedHTTPStore, RemoteReadError, chunk_format_from_metadata, chunk_problem,
                                  default_cache_dir)
from pretrain.data.segment import SEGMENT_ID_PATTERN, SegmentError, open_segment, segment_zarr_url
from pretrain.utils import errors

BATCH_KEYS = 256  # keys in flight at once: keeps the pending coroutines few; the store bounds the requests


def chunk_keys(array: zarr.Array) -> list[str]:
    """Store keys of every chunk of `array` (level "0"), in C order."""
    grid = [range(count) for count in array._async_array._chunk_grid_shape]
    prefix = f"{array.path}/" if array.path else ""
    encode = array.metadata.encode_chunk_key
    return [prefix + encode(coordinates) for coordinates in itertools.product(*grid)]


def download_segment(segment_id: str, scroll: str = "1", cache_dir: pathlib.Path | None = None,
                     concurrency: int = 8, data_url: str | None = None) -> dict:
    """Check every cached chunk of a segment (fetching damaged ones again), fetch every missing one, and recheck
    remembered absences. Returns counts."""
    if not SEGMENT_ID_PATTERN.fullmatch(segment_id):
        raise SegmentError(f"segment ID {segment_id!r} is not one: digits such as 20230827161847 (an optional "
                           "suffix such as _superseded), with no spaces")
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Validates the ID, fetches metadata, mask and labels (rechecking remembered absences); a segment of
    # layer images is downloaded and converted right here.
    segment = open_segment(segment_id, scroll=scroll, cache_dir=cache_dir, data_url=data_url,
                           http_concurrency=concurrency, recheck_absent=True)
    if segment.source != "remote":
        raise SegmentError(f"{segment_id} names a local path here ({segment.location}), not a server segment; "
                           "run the download from another folder")
    if segment.location != segment_zarr_url(segment_id, str(scroll), data_url):
        # Converted from layer images: open_segment checked each layer image as it arrived, and conversion
        # read every one of them; what is left to check is the converted zarr on disk.
        converted = pathlib.Path(segment.volume.backend.store.root)
        damage = converted_zarr_damage(converted)
        if damage is not None:
            raise SegmentError(f"segment {segment_id}: {damage}, in the zarr converted from the layer images; it cannot "
                               f"be fetched again chunk by chunk: remove the segment from the cache (.venv/bin/python "
                               f"-m pretrain.data.cache remove {segment_id}) and run download_segment.sh again")
        print(f"{segment!r}: converted from the layer images at {segment.location}/ and complete in the cache")
        return {"chunks": 0, "fetched": 0, "bytes": 0, "absent": 0, "recovered": 0, "repaired": 0}
    array = segment.volume.backend
    store: CachedHTTPStore = array.store
    keys = chunk_keys(array)
    cached = [key for key in keys if (store.cache_root / key).is_file()]
    missing = [key for key in keys if not (store.cache_root / key).is_file()]
    remembered_absent = sum(store.is_cached(key) for key in missing)
    print(f"{segment!r}: {len(keys)} chunks, {len(cached)} already cached in {store.cache_root}; "
          f"asking about {len(missing)} ({remembered_absent} remembered as absent)")
    # Cached chunks are decoded in full: this is the repair tool, and a decode finds what a header cannot.
    with tqdm.tqdm(total=len(cached), unit="chunk", desc=f"checking {segment_id}") as progress:
        chunk_bytes = run_batches(store, cached, progress, decode=True)
    with tqdm.tqdm(total=len(missing), unit="chunk", desc=f"downloading {segment_id}") as progress:
        chunk_bytes += run_batches(store, missing, progress, decode=False)
    counts = {"chunks": len(keys), "fetched": store.counters["fetched"], "bytes": store.counters["fetched_bytes"],
              "absent": store.counters["absent"], "recovered": store.counters["recovered"],
              "repaired": store.counters["repaired"]}
    in_cache = sum((store.cache_root / key).is_file() or store.is_cached(key) for key in keys)
    if in_cache != len(keys):  # never "done" for a segment the cache does not hold whole
        bound = cache.max_bytes()
        needed = chunk_bytes + cache.unevictable_bytes(cache_dir)
        if bound is not None and needed > bound * cache.EVICT_TO:
            # Another run would evict its own chunks again: the bound, not the network, is at fault.
            # In whole megabytes, rounded up: eviction empties the cache down to EVICT_TO of the bound.
            needed_gigabytes, bound_gigabytes = math.ceil(needed / 10**6) / 1000, math.ceil(needed / cache.EVICT_TO
                                                                                           / 10**6) / 1000
            raise SegmentError(f"segment {segment_id} needs {needed_gigabytes} GB in the cache (its chunks, and what "
                               f"the cache cannot evict), more than {cache.MAX_GB_VARIABLE}="
                               f"{os.environ[cache.MAX_GB_VARIABLE].strip()} leaves it: set {cache.MAX_GB_VARIABLE} "
                               f"to {bound_gigabytes} or more (or unset it) and run it again")
        raise SegmentError(f"segment {segment_id}: only {in_cache} of its {len(keys)} chunks are in the cache "
                           f"{store.cache_root} after the download; run it again")
    return counts


def converted_zarr_damage(converted: pathlib.Path) -> str | None:
    """The first damaged chunk of a zarr converted from layer images (every chunk decoded), as "{path} is damaged
    (what)", or None."""
    array_folder = converted / "0"
    chunk_format = chunk_format_from_metadata("zarr.json", json.loads((array_folder / "zarr.json").read_bytes()))
    chunk_paths = sorted(path for path in (array_folder / "c").rglob("*") if path.is_file())
    for path in tqdm.tqdm(chunk_paths, unit="chunk", desc=f"checking {converted.name}"):
        problem = chunk_problem(path.read_bytes(), chunk_format, decode=True)
        if problem is not None:
            return f"{path} is damaged ({problem})"
    return None


def run_batches(store: CachedHTTPStore, keys: list[str], progress: tqdm.tqdm, decode: bool) -> int:
    """Read every key through the store (checking cached ones, fetching missing ones, asking again about remembered
    absences); the bytes of the bodies read. Every request of a batch ends before an error is raised, so a failure
    is one error, not a failure plus the noise of requests cut off as the process exits."""

    async def read_one(key: str) -> int:
        data = await store.fetch_to_cache(key, recheck_absent=True, decode=decode)
        progress.update(1)
        return len(data) if data is not None else 0

    async def read_all() -> int:
        total = 0
        for start in range(0, len(keys), BATCH_KEYS):
            results = await asyncio.gather(*(read_one(key) for key in keys[start : start + BATCH_KEYS]),
                                           return_exceptions=True)
            failures = [result for result in results if isinstance(result, BaseException)]
            if failures:
                raise failures[0]
            total += sum(results)
        return total

    return zarr.core.sync.sync(read_all())


def main(argv: list[str] | None = None) -> int:
    parser = errors.ArgumentParser(description=__doc__.split("\n")[0], epilog="./download_segment.sh takes the "
                                   "same arguments: ./download_segment.sh SEGMENT_ID [SCROLL] [options]")
    parser.add_argument("segment_id", help="segment ID, e.g. 20230827161847")
    parser.add_argument("scroll_number", nargs="?", metavar="SCROLL", help="scroll number, as --scroll")
    parser.add_argument("--scroll", help="scroll number (sets the server folders); default 1")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="chunk cache (default: $SEGMENT_CACHE_DIR or ~/.cache/vesuvius-ink)")
    parser.add_argument("--concurrency", type=int, default=8, help="simultaneous HTTP requests (default 8)")
    args = parser.parse_intermixed_args(argv)  # options before, between or after SEGMENT_ID and SCROLL
    if args.scroll is not None and args.scroll_number is not None and args.scroll != args.scroll_number:
        parser.error(f"SCROLL {args.scroll_number} and --scroll {args.scroll} name two scrolls: give one")
    if args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency}: give at least 1 simultaneous request")
    scroll = args.scroll or args.scroll_number or "1"
    try:
        counts = download_segment(args.segment_id, scroll, args.cache_dir, args.concurrency)
    except (SegmentError, RemoteReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"done: fetched {counts['fetched']} files ({counts['bytes'] / 2**20:.1f} MiB); "
          f"{counts['absent']} chunks absent on the server (fill value); "
          f"{counts['recovered']} chunks an earlier run had been told were absent are now cached; "
          f"{counts['repaired']} damaged files of the zarr fetched again")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
