#!/usr/bin/env bash
# Prefetch a whole segment from the Vesuvius data server into the cache, with a progress bar.
# Resumable: run it again after an interruption and it fetches only what is missing. Running it again
# also repairs the cache: every cached chunk is checked (its recorded CRC-32C and a full decode) and fetched
# again where damaged, and whatever an earlier run was told is absent (a chunk, a mask, labels) is asked
# for again.
#   ./download_segment.sh SEGMENT_ID [SCROLL] [--concurrency N] [--cache-dir DIR]    e.g. ./download_segment.sh 20230827161847 1
#   ./download_segment.sh --help                                                      every option
# Scrolls 1 and 5: the segment zarr's chunks. Scrolls 2, 3, 4: the layer images, converted into a zarr.
# The cache is $SEGMENT_CACHE_DIR (default ~/.cache/vesuvius-ink), bounded by $SEGMENT_CACHE_MAX_GB if set;
# the server is $VESUVIUS_DATA_URL (default https://dl.ash2txt.org; https://USER:PASSWORD@host if it wants
# credentials, or use ~/.netrc). Every argument goes to `python -m pretrain.data.download`, which parses them.
# Runs with .venv/bin/python when a .venv exists here.
set -euo pipefail
cd "$(dirname "$0")"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" -m pretrain.data.download "$@"
