"""Prefetch a whole segment from the data server into the cache (what `download_segment.sh` runs).

    python -m pretrain.data.download SEGMENT_ID [--scroll 1] [--cache-dir DIR]

Resumable by construction: what is already in the cache is skipped, so a second run after an
interruption fetches only what is missing. It is also the repair tool: every file the cache remembers as
absent on the server (a chunk, a mask, labels) is asked for again, and cached if the server has it now,
so a wrong 404 or labels added later never stay missed. A segment of layer images (scrolls 2, 3, 4) is
downloaded and converted by `open_segment` itself; a run after completion fetches nothing else.
"""
import argparse
import asyncio
import itertools
import pathlib
import sys

import tqdm
import zarr
import zarr.core.sync

from pretrain.data.remote import CachedHTTPStore, RemoteReadError, default_cache_dir
from pretrain.data.segment import SegmentError, open_segment, segment_zarr_url


def chunk_keys(array: zarr.Array) -> list[str]:
    """Store keys of every chunk of `array` (level "0"), in C order."""
    grid = [range(count) for count in array._async_array._chunk_grid_shape]
    prefix = f"{array.path}/" if array.path else ""
    encode = array.metadata.encode_chunk_key
    return [prefix + encode(coordinates) for coordinates in itertools.product(*grid)]


def download_segment(segment_id: str, scroll: str = "1", cache_dir: pathlib.Path | None = None,
                     concurrency: int = 8, data_url: str | None = None) -> dict:
    """Fetch every missing chunk of a segment into the cache and recheck remembered absences. Returns counts."""
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Validates the ID, fetches metadata, mask and labels (rechecking remembered absences); a segment of
    # layer images is downloaded and converted right here.
    segment = open_segment(segment_id, scroll=scroll, cache_dir=cache_dir, data_url=data_url,
                           http_concurrency=concurrency, recheck_absent=True)
    if segment.location != segment_zarr_url(segment_id, str(scroll), data_url):
        print(f"{segment!r}: converted from the layer images at {segment.location}/ and complete in the cache")
        return {"chunks": 0, "fetched": 0, "bytes": 0, "absent": 0, "recovered": 0}
    array = segment.volume.backend
    store: CachedHTTPStore = array.store
    keys = chunk_keys(array)
    missing = [key for key in keys if not (store.cache_root / key).is_file()]
    remembered_absent = sum(store.is_cached(key) for key in missing)
    print(f"{segment!r}: {len(keys)} chunks, {len(keys) - len(missing)} already cached in {store.cache_root}; "
          f"asking about {len(missing)} ({remembered_absent} remembered as absent)")

    async def fetch_all(progress: tqdm.tqdm) -> None:
        async def fetch_one(key: str) -> None:
            await store.fetch_to_cache(key, recheck_absent=True)
            progress.update(1)

        # Batches keep the number of pending coroutines small; the store bounds actual concurrency.
        for start in range(0, len(missing), 256):
            await asyncio.gather(*(fetch_one(key) for key in missing[start : start + 256]))

    with tqdm.tqdm(total=len(missing), unit="chunk", desc=f"downloading {segment_id}") as progress:
        zarr.core.sync.sync(fetch_all(progress))
    return {"chunks": len(keys), "fetched": store.counters["fetched"], "bytes": store.counters["fetched_bytes"],
            "absent": store.counters["absent"], "recovered": store.counters["recovered"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("segment_id", help="segment ID, e.g. 20230827161847")
    parser.add_argument("--scroll", default="1", help="scroll number (sets the server folders); default 1")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="chunk cache (default: $SEGMENT_CACHE_DIR or ~/.cache/vesuvius-ink)")
    parser.add_argument("--concurrency", type=int, default=8, help="simultaneous HTTP requests")
    args = parser.parse_args(argv)
    try:
        counts = download_segment(args.segment_id, args.scroll, args.cache_dir, args.concurrency)
    except (SegmentError, RemoteReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"done: fetched {counts['fetched']} files ({counts['bytes'] / 2**20:.1f} MiB); "
          f"{counts['absent']} chunks absent on the server (fill value); "
          f"{counts['recovered']} chunks an earlier run had been told were absent are now cached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
