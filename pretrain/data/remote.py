"""Read-only zarr store over HTTP with a persistent on-disk cache of every key it fetches.

Why a store of our own: zarr's fsspec HTTP store re-downloads a chunk each time it is read, and one
truncated response aborts the read (the complaints against the `vesuvius` library, villa #1325 and
#1666). Here each key (chunk or metadata) is fetched at most once, ever:

    zarr  --get(key)-->  CachedHTTPStore  --hit-->  {cache_dir}/{host}/{path}/{key}  --> header check
                                         --miss-->  aiohttp GET (bounded concurrency, retries, deadline)
                                                    --> full check --> written atomically into the cache

A server's 200 is not trusted: a body is checked before it enters the cache (`body_problem`: its length,
a chunk's codec header and a full decode, JSON for metadata, an image's structure) and retried like a 5xx
when bad, and every read of a cached file checks it again, cheaply, before a decoder sees it (c-blosc
trusts its own header: a chunk cut short on disk could crash it); a damaged file is fetched again. A chunk
enters the cache with its CRC-32C recorded (`pretrain.data.cache.write_recorded`), and its first read in a
process compares it: a bit flipped inside a Blosc-zstd chunk passes every header check and decodes to wrong
voxels. Later reads in the process skip the CRC while the file is the same one (inode, size and modification
time): they are served from the page cache, which holds the bytes already compared.

A key the server does not have is remembered as `{key}.absent`: for zarr a missing chunk means "fill
value", so a warm run never asks again. A 404 is believed only when a second request repeats it, so
one 404 from a flaky proxy does not stick; and `fetch_url(..., recheck_absent=True)` (what
`download_segment.sh` uses) asks again for a remembered absence and repairs the cache if the file is
there after all. Files are first written under `{cache_dir}/.incomplete/` and then renamed into place,
so a killed run leaves no partial file where the cache looks; leftovers of dead processes are swept
when a store opens.

Credentials (HTTP Basic auth) come from the URL (`https://user:password@host`) or, through aiohttp's
`trust_env`, from `~/.netrc`. They are split off the URL at once: cache paths, messages and logs only
ever see the URL without them.
"""
import asyncio
import atexit
import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import pathlib
import random
import shutil
import struct
import urllib.parse
import warnings
import zlib
from collections.abc import AsyncIterator, Callable, Iterable

import aiohttp
import numcodecs
import numpy as np
import tifffile
import zarr.core.sync
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype

from pretrain.data import cache
from pretrain.utils import temporaries
from pretrain.utils.errors import OneLineError

logger = logging.getLogger(__name__)

INCOMPLETE_DIR = ".incomplete"
ABSENT_SUFFIX = ".absent"
# Server answers worth trying again: throttling and server-side failures.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
STREAM_BLOCK_BYTES = 2**20


class RemoteReadError(OneLineError, OSError):
    """A URL could not be read after all retries (or was refused outright)."""


class RemoteAuthError(RemoteReadError):
    """The server answered 401: it wants credentials, or refused the ones given."""


class RemoteSettingError(RemoteReadError):
    """A data server setting (its URL, a timeout) cannot be used as given; the message never shows credentials."""


class CacheWriteError(RemoteReadError):
    """A file cannot be written into the cache (a full disk: the message names the folder and the space needed)."""


class DamagedCacheError(RemoteReadError):
    """A cached file fails its check and could not be fetched again."""


# ---------------------------------------------------------------- settings (environment variables)

# No byte for this long fails one request (and it is retried): a stall detector.
DEFAULT_TIMEOUT_SECONDS = 60.0
# One file (all its retries together) must arrive within this, plus one second per DEADLINE_ALLOWANCE_BYTES
# it announces: a slow drip that never stalls long enough for the stall detector still ends.
DEFAULT_DEADLINE_SECONDS = 300.0
DEADLINE_ALLOWANCE_BYTES = 256 * 2**10  # a floor of 256 KiB/s: a 500 MiB layer image gets 300 s + 33 min


def setting_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable `name`, else `default`."""
    try:
        value = cache.positive_setting(name, "seconds")
    except ValueError as error:
        raise RemoteSettingError(str(error)) from None
    return default if value is None else value


# ---------------------------------------------------------------- what a body must look like

METADATA_NAMES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOSC_HEADER_BYTES = 16
BLOSC_MEMCPYED = 0x2  # header flag: the data follows the header uncompressed


@dataclasses.dataclass(frozen=True)
class ChunkFormat:
    """How one array's chunks are stored, from its `.zarray` or `zarr.json`."""

    codec: dict | None  # numcodecs config of the compressor ({"id": "blosc", ...}); None: raw bytes
    decoded_bytes: int | None  # bytes of one decoded chunk; None where filters or codecs change it


def chunk_format_from_metadata(name: str, metadata: dict) -> ChunkFormat | None:
    """The chunk format of an array's metadata (`.zarray` or `zarr.json`); None for a group or a layout not
    checked here (sharding, checksums, filters beyond one compressor)."""
    try:
        if name == ".zarray":
            decoded = int(np.prod(metadata["chunks"])) * np.dtype(metadata["dtype"]).itemsize
            return ChunkFormat(metadata.get("compressor"), None if metadata.get("filters") else decoded)
        if metadata.get("node_type") != "array":
            return None
        codecs = metadata["codecs"]
        if codecs[0]["name"] != "bytes" or len(codecs) > 2:
            return None
        chunk_shape = metadata["chunk_grid"]["configuration"]["chunk_shape"]
        decoded = int(np.prod(chunk_shape)) * np.dtype(metadata["data_type"]).itemsize
        if len(codecs) == 1:
            return ChunkFormat(None, decoded)
        codec = {"blosc": {"id": "blosc"}, "zstd": {"id": "zstd"}, "gzip": {"id": "gzip"}}.get(codecs[1]["name"])
        return ChunkFormat(codec, decoded) if codec is not None else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def blosc_problem(data: bytes, decoded_bytes: int | None) -> str | None:
    """What is wrong with a Blosc chunk's header, checked without decoding. c-blosc trusts its header (a chunk
    cut short with its header intact can crash the decoder), so nothing reaches it before this passes."""
    if len(data) < BLOSC_HEADER_BYTES:
        return f"{len(data)} bytes, shorter than a Blosc header"
    version, _, flags, _, nbytes, blocksize, cbytes = struct.unpack_from("<BBBBIII", data)
    if version not in (1, 2):
        return f"not a Blosc chunk (header version byte {version})"
    if cbytes != len(data):
        return f"its Blosc header says {cbytes} bytes, the body has {len(data)}"
    if decoded_bytes is not None and nbytes != decoded_bytes:
        return f"its Blosc header says {nbytes} bytes decoded, a chunk of this array has {decoded_bytes}"
    if flags & BLOSC_MEMCPYED:
        return None if cbytes == BLOSC_HEADER_BYTES + nbytes else "its Blosc header's sizes disagree"
    if blocksize == 0:
        return "its Blosc header says blocks of 0 bytes" if nbytes else None
    blocks = -(-nbytes // blocksize)
    starts_end = BLOSC_HEADER_BYTES + 4 * blocks
    if starts_end > cbytes:
        return "its Blosc block table runs past the body"
    block_starts = np.frombuffer(data, "<u4", blocks, BLOSC_HEADER_BYTES)
    if block_starts.size and (block_starts.min() < starts_end or block_starts.max() >= cbytes):
        return "its Blosc block table points outside the body"
    return None


def chunk_problem(data: bytes, chunk_format: ChunkFormat, decode: bool) -> str | None:
    """What is wrong with a chunk of `chunk_format`: the cheap header checks always, a full decode if `decode`."""
    codec_id = chunk_format.codec["id"] if chunk_format.codec else None
    if codec_id == "blosc":
        problem = blosc_problem(data, chunk_format.decoded_bytes)
        if problem is not None:
            return problem
    elif codec_id is None:
        expected = chunk_format.decoded_bytes
        return None if expected is None or len(data) == expected else f"{len(data)} bytes, a chunk has {expected}"
    elif codec_id == "gzip" and not data.startswith(b"\x1f\x8b"):
        return "not a gzip stream"
    elif codec_id == "zstd" and not data.startswith(b"\x28\xb5\x2f\xfd"):
        return "not a Zstandard frame"
    if not decode:
        return None
    try:
        decoded = numcodecs.get_codec(dict(chunk_format.codec)).decode(data)
    except Exception as error:  # noqa: BLE001 - every codec fails in its own way
        return f"it does not decode with {codec_id} ({type(error).__name__}: {error})"
    decoded_bytes = memoryview(decoded).nbytes
    if chunk_format.decoded_bytes is not None and decoded_bytes != chunk_format.decoded_bytes:
        return f"it decodes to {decoded_bytes} bytes, a chunk of this array has {chunk_format.decoded_bytes}"
    return None


def json_problem(data: bytes) -> str | None:
    try:
        json.loads(data)
    except ValueError as error:  # UnicodeDecodeError included
        return f"not JSON ({str(error)[:80]})"
    return None


def png_problem(data: bytes) -> str | None:
    """Walk a PNG's chunks, checking each CRC: a body cut short or altered fails here."""
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG image"
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if end > len(data):
            break
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[offset + 4 : end - 4]) != crc:
            return f"the PNG chunk {kind.decode('latin-1')!r} at byte {offset} fails its CRC"
        if kind == b"IEND":
            return None
        offset = end
    return "the PNG image is cut short (no IEND chunk)"


def jpeg_problem(head: bytes, tail: bytes) -> str | None:
    if not head.startswith(b"\xff\xd8\xff"):
        return "not a JPEG image"
    return None if tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9") else "the JPEG image is cut short (no end marker)"


def tiff_problem(source, size: int) -> str | None:
    """A TIFF's directories parse and every strip or tile lies inside the file (its pixels are not decoded)."""
    try:
        with tifffile.TiffFile(source) as tiff:
            for page in tiff.pages:
                for offset, count in zip(page.dataoffsets, page.databytecounts):
                    if offset + count > size:
                        return f"the TIFF image is cut short (its data runs to byte {offset + count} of {size})"
    except Exception as error:  # noqa: BLE001 - tifffile raises many kinds for a malformed file
        return f"not a readable TIFF image ({type(error).__name__}: {str(error)[:80]})"
    return None


def file_kind(url: str) -> str:
    """"metadata", "image" or "chunk": what a URL's body is checked as."""
    name = url.rsplit("/", 1)[-1]
    if name in METADATA_NAMES:
        return "metadata"
    return "image" if name.lower().endswith(IMAGE_SUFFIXES) else "chunk"


def image_problem(url: str, data: bytes | None = None, path: pathlib.Path | None = None) -> str | None:
    """What is wrong with an image body, given as bytes or as a file (layer images are checked on disk)."""
    suffix = url.rsplit(".", 1)[-1].lower()
    size = len(data) if data is not None else path.stat().st_size
    if suffix == "png":
        return png_problem(data if data is not None else path.read_bytes())
    if suffix in ("tif", "tiff"):
        return tiff_problem(io.BytesIO(data) if data is not None else str(path), size)
    if data is None:
        with open(path, "rb") as file:
            head = file.read(4)
            file.seek(max(0, size - 64))
            tail = file.read()
        return jpeg_problem(head, tail)
    return jpeg_problem(data[:4], data[-64:])


class Credentials:
    """HTTP Basic credentials that never show themselves: repr, str and messages print no part of them."""

    def __init__(self, login: str, password: str) -> None:
        self._auth = aiohttp.BasicAuth(login, password)

    @property
    def auth(self) -> aiohttp.BasicAuth:
        return self._auth

    def __repr__(self) -> str:
        return "Credentials(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Credentials) and other._auth == self._auth

    def __getstate__(self) -> tuple[str, str]:  # pickled to DataLoader workers (in memory), never to disk
        return self._auth.login, self._auth.password

    def __setstate__(self, state: tuple[str, str]) -> None:
        self._auth = aiohttp.BasicAuth(*state)


def split_credentials(url: str) -> tuple[str, Credentials | None]:
    """`https://user:password@host/path` → (`https://host/path`, their Credentials); a URL without any → (url, None)."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": a '[' or ']' that opens no IPv6 address [::1]
        raise RemoteSettingError(
            "the data server URL (VESUVIUS_DATA_URL) cannot be parsed: it holds a '[' or ']' that is not around an "
            "IPv6 address such as [::1]; in a password, percent-encode them (%5B, %5D)") from None
    # An unencoded '/', '?' or '#' in a password ends the host part early: the rest of the password and the
    # '@' land in the path, query or fragment, and the start of the password reads as a port. Such a URL is
    # refused without quoting it (any part of it may be the password).
    try:
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
        credentials_in_path = "@" not in parsed.netloc and "@" in url.partition("://")[2]
    except ValueError:
        credentials_in_path = True
    if credentials_in_path:
        raise RemoteSettingError(
            "the data server URL (VESUVIUS_DATA_URL) cannot be parsed: if its password holds '/', '?' or '#', "
            "percent-encode them (%2F, %3F, %23), or put the credentials in ~/.netrc instead"
        )
    if parsed.username is None and parsed.password is None:
        return url, None
    netloc = parsed.hostname or ""
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    clean = urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))
    login = urllib.parse.unquote(parsed.username or "")
    password = urllib.parse.unquote(parsed.password or "")
    return clean, Credentials(login, password)


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SEGMENT_CACHE_DIR") or pathlib.Path.home() / ".cache" / "vesuvius-ink")


def cache_path_for_url(cache_dir: pathlib.Path, url: str) -> pathlib.Path:
    """Where a URL's bytes live in the cache: a mirror of host, port and path (never of credentials)."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "") + (f"_{parsed.port}" if parsed.port is not None else "")
    return pathlib.Path(cache_dir) / host / parsed.path.strip("/")


def _incomplete_path(cache_dir: pathlib.Path, name: str = "download") -> temporaries.HeldTemporary:
    """A new temp file in `cache_dir/.incomplete`, locked by this process (so no sweep deletes it while this
    process lives, whatever host or container the sweep runs in) until its `unlink`, which also deletes it if
    it was not renamed into place."""
    return temporaries.create_locked(pathlib.Path(cache_dir) / INCOMPLETE_DIR, name)


def write_to_cache(destination: pathlib.Path, data: bytes, cache_dir: pathlib.Path, digest: bool = False) -> None:
    """Write `data` to `destination` through a temp file in `cache_dir/.incomplete` and a rename, with its digest
    recorded if `digest` (chunk bodies)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    folder = pathlib.Path(cache_dir) / INCOMPLETE_DIR
    if digest:
        if not cache.write_recorded(destination, data, folder):
            _warn_without_digests(cache_dir)
    else:
        temporaries.write_atomic(destination, lambda temporary: temporary.write_bytes(data), folder=folder)
    cache.record_added(cache_dir, len(data))


# Caches whose file system keeps no extended attributes (no digests recorded there), and chunks whose digest was
# compared in this process, by cache path, with the identity of the file compared.
_without_digests: set[pathlib.Path] = set()
_digest_compared: dict[pathlib.Path, tuple[int, int, int, int]] = {}


def _warn_without_digests(cache_dir: pathlib.Path) -> None:
    if cache_dir in _without_digests:
        return
    _without_digests.add(cache_dir)
    warnings.warn(f"the file system of the cache folder {cache_dir} keeps no extended attributes, so cached chunks "
                  "carry no digest and a bit flipped inside one goes unnoticed; put SEGMENT_CACHE_DIR on a local disk "
                  "(ext4, xfs, btrfs) to have them checked")


def sweep_incomplete(cache_dir: pathlib.Path) -> int:
    """Delete the temp files of writers that are gone (a kill -9 mid-download), wherever they ran: a live
    writer holds a lock on its temp file, seen from other PID namespaces and NFS clients. Returns the count."""
    incomplete_dir = pathlib.Path(cache_dir) / INCOMPLETE_DIR
    if not incomplete_dir.is_dir():
        return 0
    return temporaries.remove_dead_temporaries(incomplete_dir.iterdir())


_process_session: tuple[int, aiohttp.ClientSession] | None = None


def _http_session(timeout_seconds: float) -> aiohttp.ClientSession:
    """One aiohttp session (on zarr's event loop) per process, closed at exit. A forked DataLoader worker
    makes its own: a session must not cross processes."""
    global _process_session
    if _process_session is None or _process_session[0] != os.getpid() or _process_session[1].closed:
        session = aiohttp.ClientSession(
            # A stall detector, not a limit on the whole transfer: layer images take minutes to stream.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_seconds, sock_read=timeout_seconds),
            trust_env=True,  # ~/.netrc credentials and proxy settings, as curl and wget honour them
        )
        _process_session = (os.getpid(), session)
    return _process_session[1]


@atexit.register
def _close_http_session() -> None:
    if _process_session is None or _process_session[0] != os.getpid() or _process_session[1].closed:
        return
    with contextlib.suppress(Exception):
        zarr.core.sync.sync(_process_session[1].close())


class _RetryableStatus(Exception):
    def __init__(self, status: int, reason: str | None) -> None:
        super().__init__(f"HTTP {status} {reason or ''}".strip())


class _DamagedBody(Exception):
    """A 200 answer whose body fails its check (HTML in place of a chunk, a body cut short): retried like a 5xx,
    never cached."""


def _is_retryable(error: BaseException) -> bool:
    # Throttling and server errors, dropped connections, truncated or damaged bodies, stalls.
    return isinstance(error, (_RetryableStatus, _DamagedBody, aiohttp.ClientError, asyncio.TimeoutError,
                              ConnectionError))


def _size_text(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


class CachedHTTPStore(Store):
    """Read-only zarr 3 store for `base_url`, caching every fetched key under `cache_dir`.

    `base_url` may carry credentials (`https://user:password@host/...`); they are split off into
    `credentials` and sent as HTTP Basic auth. `max_concurrency` bounds simultaneous HTTP requests of this
    store; `retries` and `backoff_seconds` set the exponential backoff (backoff_seconds · 2^attempt, with
    jitter) on transient failures. `timeout_seconds` (no byte for this long fails a request) and
    `deadline_seconds` (one file, all its retries included, plus one second per DEADLINE_ALLOWANCE_BYTES it
    announces) default to SEGMENT_HTTP_TIMEOUT and SEGMENT_HTTP_DEADLINE. Every body is checked before it
    enters the cache (`body_problem`), and every cached file again, cheaply, when read. `counters` counts what
    happened ("requests", "fetched", "hits", "absent", "retries", "recovered", "repaired") for tests and
    benchmarks.
    """

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = False

    def __init__(
        self,
        base_url: str,
        cache_dir: pathlib.Path | None = None,
        max_concurrency: int = 8,
        retries: int = 5,
        backoff_seconds: float = 0.5,
        timeout_seconds: float | None = None,
        deadline_seconds: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        super().__init__(read_only=True)
        base_url, from_url = split_credentials(base_url.rstrip("/"))
        self.base_url = base_url
        self.credentials = credentials or from_url
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_root = cache_path_for_url(self.cache_dir, self.base_url)
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        if timeout_seconds is None:
            timeout_seconds = setting_seconds("SEGMENT_HTTP_TIMEOUT", DEFAULT_TIMEOUT_SECONDS)
        if deadline_seconds is None:
            deadline_seconds = setting_seconds("SEGMENT_HTTP_DEADLINE", DEFAULT_DEADLINE_SECONDS)
        self.timeout_seconds = timeout_seconds
        self.deadline_seconds = deadline_seconds
        self._chunk_formats: dict[str, ChunkFormat] = {}  # URL of a folder of chunks → its array's format
        self.counters = {"requests": 0, "fetched": 0, "fetched_bytes": 0, "hits": 0, "absent": 0, "retries": 0,
                         "recovered": 0, "repaired": 0}
        self._semaphore = None
        sweep_incomplete(self.cache_dir)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachedHTTPStore) and (other.base_url, other.cache_dir) == (
            self.base_url,
            self.cache_dir,
        )

    def __repr__(self) -> str:
        return f"CachedHTTPStore({self.base_url!r}, cache_dir={str(self.cache_dir)!r})"

    def __getstate__(self) -> dict:
        # A DataLoader worker gets its own semaphore (it belongs to one event loop).
        state = self.__dict__.copy()
        state["_semaphore"] = None
        return state

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/{key}"

    def absent_marker(self, url: str) -> pathlib.Path:
        path = cache_path_for_url(self.cache_dir, url)
        return path.with_name(path.name + ABSENT_SUFFIX)

    def is_cached(self, key: str) -> bool:
        """Is `key` in the cache, as bytes or as a remembered absence?"""
        path = self.cache_root / key
        return path.is_file() or path.with_name(path.name + ABSENT_SUFFIX).is_file()

    def _auth_error(self, url: str) -> RemoteAuthError:
        host = urllib.parse.urlsplit(url).netloc
        if self.credentials is not None:
            return RemoteAuthError(f"{url} answered 401 Unauthorized: the data server refused the credentials "
                                   "given in the URL (VESUVIUS_DATA_URL)")
        return RemoteAuthError(f"{url} answered 401 Unauthorized: the data server needs credentials; give them as "
                               f"VESUVIUS_DATA_URL=https://USER:PASSWORD@{host} or in ~/.netrc")

    @staticmethod
    def _deadline_error(url: str, seconds: float, attempts: int, last_error: BaseException) -> RemoteReadError:
        cause = "" if isinstance(last_error, TimeoutError) else f"; the last: {type(last_error).__name__}: {last_error}"
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        return RemoteReadError(f"cannot read {url}: not complete within its deadline of {round(seconds, 1):g} s "
                               f"({tries}{cause}; SEGMENT_HTTP_DEADLINE sets it)")

    def cache_write_error(self, error: OSError, what: str, needed: int | None) -> CacheWriteError:
        """One line for a write of `what` (a URL) into the cache that failed: the disk's fault, never the server's."""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(self.cache_dir).free if self.cache_dir.is_dir() else 0
            need = f"{_size_text(needed)} for {what}" if needed else f"space for {what}"
            return CacheWriteError(f"the cache folder {self.cache_dir} is out of disk space ({_size_text(free)} "
                                   f"free; needs {need}): free space there, or set SEGMENT_CACHE_DIR to a larger disk")
        return CacheWriteError(f"cannot write {what} into the cache folder {self.cache_dir}: {error.strerror}")

    def _write_to_cache(self, path: pathlib.Path, data: bytes, url: str, digest: bool = False) -> None:
        try:
            write_to_cache(path, data, self.cache_dir, digest)
        except OSError as error:
            raise self.cache_write_error(error, url, len(data)) from None

    def cached_body_problem(self, url: str, path: pathlib.Path, held: cache.HeldRead, decode: bool) -> str | None:
        """What is wrong with cached file `path` of `url`, as read (`held`), or None.

        A chunk with a recorded digest: the CRC-32C of its bytes must be the one recorded as it entered the cache
        (once per process and file: `_digest_compared`); then it is what passed the full check on arrival, and
        `decode` (download_segment.sh) decodes it again all the same. Any other file, and a chunk cached before
        digests were recorded (or copied without its extended attributes), gets `body_problem`; such a chunk is
        decoded in full (once per process: a cache shared with its owner may not let this user record it), and its
        digest recorded when it is sound."""
        chunk = file_kind(url) == "chunk"
        compared = chunk and _digest_compared.get(path) == held.identity
        if chunk and held.digest is not None:
            if not compared:
                found = cache.body_digest(held.data)
                if found != held.digest:
                    return (f"its CRC-32C {found.hex()} is not the {held.digest.hex()} recorded when it entered the "
                            "cache: its bytes changed on disk")
                _digest_compared[path] = held.identity
            return self.body_problem(url, held.data, decode=True) if decode else None
        unrecorded = chunk and not compared and self.cache_dir not in _without_digests
        problem = self.body_problem(url, held.data, decode=decode or unrecorded)
        if problem is None and unrecorded:
            _digest_compared[path] = held.identity
            if not cache.record_digest(path, held):
                _warn_without_digests(self.cache_dir)
        return problem

    def _chunk_format(self, url: str) -> ChunkFormat | None:
        """The format of the array a chunk belongs to: the nearest `.zarray` or `zarr.json` in a cache folder
        above it (zarr reads an array's metadata before its chunks, so it is in the cache). Remembered by the
        folder's URL: a warm read must not pay for building paths (15 µs each, twice the check itself)."""
        folder_url = url.rsplit("/", 1)[0]
        if folder_url in self._chunk_formats:
            return self._chunk_formats[folder_url]
        folder = cache_path_for_url(self.cache_dir, url).parent
        for parent in [folder, *folder.parents]:
            if parent == self.cache_dir or self.cache_dir not in parent.parents:
                return None
            for name in (".zarray", "zarr.json"):
                if (parent / name).is_file():
                    try:
                        metadata = json.loads((parent / name).read_bytes())
                    except ValueError:
                        return None  # itself damaged: its own read finds and repairs it
                    chunk_format = chunk_format_from_metadata(name, metadata)
                    if chunk_format is not None:
                        self._chunk_formats[folder_url] = chunk_format
                    return chunk_format
        return None

    def body_problem(self, url: str, data: bytes | None = None, path: pathlib.Path | None = None,
                     decode: bool = True) -> str | None:
        """What is wrong with the body of `url` (given as bytes, or as a file for streamed layer images), or None.

        Metadata must parse as JSON; images must have a sound structure (PNG chunk CRCs, TIFF strips inside the
        file, JPEG end marker); a chunk must match its array's codec: a Blosc header whose sizes fit the body
        and the chunk, and with `decode`, a full decode to the chunk's size. Other files are not checked.
        """
        kind = file_kind(url)
        if kind == "metadata":
            return json_problem(data if data is not None else path.read_bytes())
        if kind == "image":
            return image_problem(url, data, path)
        chunk_format = self._chunk_format(url)
        if chunk_format is None:
            return None
        return chunk_problem(data if data is not None else path.read_bytes(), chunk_format, decode)

    async def _get(self, url: str, destination: pathlib.Path | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> bytes | bool | None:
        """GET a URL with retries. Returns its bytes, or with `destination` streams it there atomically
        (memory stays one block) and returns True; None when the server says it does not exist (404).

        A body that is shorter than announced or fails `body_problem` is retried like a 5xx, never cached.
        Every attempt together must end within the file's deadline (`deadline_seconds`, counted from its
        first request, plus the allowance for the size it announces).
        """
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        session = _http_session(self.timeout_seconds)
        auth = self.credentials.auth if self.credentials is not None else None
        loop = asyncio.get_running_loop()
        first_request = deadline = None
        last_error: BaseException | None = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_seconds * 2 ** (attempt - 1) * (0.5 + random.random())
                if loop.time() + delay >= deadline:  # no time left for another try
                    raise self._deadline_error(url, deadline - first_request, attempts, last_error)
                self.counters["retries"] += 1
                await asyncio.sleep(delay)
            temporary = None
            announced = None
            try:
                async with self._semaphore:
                    if first_request is None:  # waiting for a turn behind other requests does not count
                        first_request = loop.time()
                        deadline = first_request + self.deadline_seconds
                    attempts += 1
                    self.counters["requests"] += 1
                    async with asyncio.timeout_at(deadline) as time_limit, session.get(url, auth=auth) as response:
                        if response.status == 404:
                            return None
                        if response.status == 401:
                            raise self._auth_error(url)
                        if response.status in RETRY_STATUS:
                            raise _RetryableStatus(response.status, response.reason)
                        if response.status >= 400:
                            raise RemoteReadError(f"cannot read {url}: HTTP {response.status} {response.reason}")
                        # A compressed transfer's length is not the body's: only an identity one is compared.
                        if "Content-Encoding" not in response.headers:
                            announced = response.content_length
                        if announced:
                            deadline = max(deadline, first_request + self.deadline_seconds
                                           + announced / DEADLINE_ALLOWANCE_BYTES)
                            time_limit.reschedule(deadline)
                        if destination is None:
                            data = await response.read()
                            if announced is not None and len(data) != announced:
                                raise _DamagedBody(f"{len(data)} bytes of the {announced} announced")
                            problem = self.body_problem(url, data)
                            if problem is not None:
                                raise _DamagedBody(problem)
                            self.counters["fetched"] += 1
                            self.counters["fetched_bytes"] += len(data)
                            return data
                        temporary = _incomplete_path(self.cache_dir)
                        received = 0
                        with open(temporary, "wb") as file:
                            async for block in response.content.iter_chunked(STREAM_BLOCK_BYTES):
                                file.write(block)
                                received += len(block)
                                if on_bytes is not None:
                                    on_bytes(len(block))
                        if announced is not None and received != announced:
                            raise _DamagedBody(f"{received} bytes of the {announced} announced")
                        problem = self.body_problem(url, path=temporary)
                        if problem is not None:
                            raise _DamagedBody(problem)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temporary, destination)
                self.counters["fetched"] += 1
                self.counters["fetched_bytes"] += received
                return True
            except RemoteReadError:
                raise
            except Exception as error:  # noqa: BLE001 - classified right below
                if deadline is not None and loop.time() >= deadline:
                    # An attempt the deadline cut short says only "timeout": name the last answer before it.
                    cut_short = isinstance(error, TimeoutError) and last_error is not None
                    raise self._deadline_error(url, deadline - first_request, attempts,
                                               last_error if cut_short else error) from None
                if not _is_retryable(error):
                    if isinstance(error, OSError):  # not the network's (those are retryable): the local disk's
                        raise self.cache_write_error(error, url, announced) from None
                    raise RemoteReadError(f"cannot read {url}: {type(error).__name__}: {error}") from error
                last_error = error
                # str, never repr: an aiohttp error's repr holds the request headers, Authorization included.
                logger.debug("retrying %s after %s: %s", url, type(error).__name__, error)
            finally:
                if temporary is not None:
                    temporary.unlink(missing_ok=True)
        if isinstance(last_error, _DamagedBody):
            raise RemoteReadError(f"cannot read {url}: after {attempts} attempts the server's answer is still not a "
                                  f"valid {file_kind(url)} file ({last_error}); nothing of it was cached")
        raise RemoteReadError(
            f"cannot read {url} after {attempts} attempts "
            f"({type(last_error).__name__}: {last_error}); is the data server reachable?"
        ) from last_error

    async def fetch_url(self, url: str, remember_absent: bool = True, recheck_absent: bool = False,
                        decode: bool = False) -> bytes | None:
        """The bytes at `url`, from the cache or else fetched once and cached (None if the server has none).

        `remember_absent=False` is for probes (is this segment a zarr?) whose answer must not stick.
        `recheck_absent=True` asks the server again about a remembered absence, and caches the file if it
        is there now. A cached file is checked on every read (`body_problem`; a chunk's full decode only with
        `decode`, as the header checks cost next to nothing and a decode as much as zarr's own) and fetched
        again if damaged; where that fails, DamagedCacheError names the file.
        """
        path = cache_path_for_url(self.cache_dir, url)
        absent_marker = path.with_name(path.name + ABSENT_SUFFIX)
        damage = None
        # None when not cached (or evicted a moment ago); read under a shared lock, so no eviction takes it meanwhile.
        held = cache.read_held(path)
        if held is not None:
            # Damage on disk (a chunk cut short, a file overwritten, a bit flipped) is found here, before any
            # decoder sees it.
            damage = self.cached_body_problem(url, path, held, decode)
            if damage is None:
                self.counters["hits"] += 1
                return held.data
            warnings.warn(f"{path} in the cache is damaged ({damage}); fetching it again")
        remembered_absent = absent_marker.is_file()
        if remembered_absent and not recheck_absent:
            self.counters["hits"] += 1
            return None
        try:
            data = await self._get(url)
        except RemoteReadError as error:
            if damage is None or isinstance(error, CacheWriteError):
                raise
            raise DamagedCacheError(f"{path} in the cache is damaged ({damage}) and could not be fetched again: "
                                    f"{error}") from None
        if data is None and damage is not None:
            path.unlink(missing_ok=True)  # the server no longer has it: what follows treats it as absent
        if data is None and remember_absent and not remembered_absent:
            # A 404 is believed when it repeats: one from a flaky proxy must not read as zeros for good.
            data = await self._get(url)
        if data is None:
            self.counters["absent"] += 1
            if remember_absent:
                self._write_to_cache(absent_marker, b"", url)
            return None
        self._write_to_cache(path, data, url, digest=file_kind(url) == "chunk")
        if damage is not None:
            self.counters["repaired"] += 1
        if remembered_absent:
            absent_marker.unlink(missing_ok=True)
            self.counters["recovered"] += 1
        return data

    async def download_url(self, url: str, on_bytes: Callable[[int], None] | None = None) -> pathlib.Path | None:
        """Stream a large file (a layer image) into the cache once; its cache path, or None on a 404."""
        path = cache_path_for_url(self.cache_dir, url)
        if path.is_file():
            damage = self.body_problem(url, path=path)
            if damage is None:
                self.counters["hits"] += 1
                return path
            warnings.warn(f"{path} in the cache is damaged ({damage}); fetching it again")
            path.unlink(missing_ok=True)
            self.counters["repaired"] += 1
        found = await self._get(url, destination=path, on_bytes=on_bytes)
        return path if found else None

    async def fetch_to_cache(self, key: str, recheck_absent: bool = False, decode: bool = False) -> bytes | None:
        """The bytes of zarr key `key` (None if absent: a missing chunk means fill value)."""
        return await self.fetch_url(self.url_for(key), recheck_absent=recheck_absent, decode=decode)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        data = await self.fetch_to_cache(key)
        if data is None:
            return None
        if byte_range is not None:
            # Whole keys are cached, so a range is served from the cached bytes.
            start = getattr(byte_range, "start", getattr(byte_range, "offset", None))
            end = getattr(byte_range, "end", None)
            if hasattr(byte_range, "suffix"):
                start, end = len(data) - byte_range.suffix, None
            data = data[start:end]
        return prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await self.fetch_to_cache(key) is not None

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError("the remote segment store is read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError("the remote segment store is read-only")

    def list(self) -> AsyncIterator[str]:
        return self._cannot_list()

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._cannot_list()

    def list_dir(self, prefix: str) -> AsyncIterator[str]:
        return self._cannot_list()

    async def _cannot_list(self) -> AsyncIterator[str]:
        raise NotImplementedError("an HTTP store cannot list its keys")
        yield  # unreachable; the yield makes this an async generator, as zarr expects
