#!/usr/bin/env bash
# Prefetch a whole segment from the Vesuvius data server into the chunk cache, with a progress bar.
# Resumable: run it again after an interruption and it fetches only what is missing.
#   ./download_segment.sh SEGMENT_ID [SCROLL]        e.g. ./download_segment.sh 20230827161847 1
# The cache is $SEGMENT_CACHE_DIR (default ~/.cache/vesuvius-ink); the server is $VESUVIUS_DATA_URL
# (default https://dl.ash2txt.org). Runs with .venv/bin/python when a .venv exists here.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 SEGMENT_ID [SCROLL]" >&2
  exit 2
fi
cd "$(dirname "$0")"
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" -m pretrain.data.download "$1" --scroll "${2:-1}"
