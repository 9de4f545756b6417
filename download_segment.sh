#!/usr/bin/env bash
# Prefetch a whole segment from the Vesuvius data server into the cache, with a progress bar.
# Resumable: run it again after an interruption and it fetches only what is missing. Running it again
# also repairs the cache: whatever an earlier run was told is absent (a chunk, a mask, labels) is asked
# for again.
#   ./download_segment.sh SEGMENT_ID [SCROLL]        e.g. ./download_segment.sh 20230827161847 1
# Scrolls 1 and 5: the segment zarr's chunks. Scrolls 2, 3, 4: the layer images, converted into a zarr.
# The cache is $SEGMENT_CACHE_DIR (default ~/.cache/vesuvius-ink); the server is $VESUVIUS_DATA_URL
# (default https://dl.ash2txt.org; https://USER:PASSWORD@host if it wants credentials, or use ~/.netrc).
# Runs with .venv/bin/python when a .venv exists here.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 SEGMENT_ID [SCROLL]" >&2
  exit 2
fi
cd "$(dirname "$0")"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" -m pretrain.data.download "$1" --scroll "${2:-1}"
