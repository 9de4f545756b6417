"""Read-only zarr store over HTTP with a persistent on-disk cache of every key it fetches.

Why a store of our own: zarr's fsspec HTTP store re-downloads a chunk each time it is read, and one
truncated response aborts the read (the complaints against the `vesuvius` library, villa #1325 and
#1666). Here each key (chunk or metadata) is fetched at most once, ever:

    zarr  --get(key)-->  CachedHTTPStore  --hit-->  {cache_dir}/{host}/{path}/{key}
                                         --miss-->  aiohttp GET (bounded concurrency, retries)
                                                    --> written atomically into the cache

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
import logging
import os
import pathlib
import random
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable

import aiohttp
import zarr.core.sync
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype

from pretrain.data import cache
from pretrain.utils import temporaries

logger = logging.getLogger(__name__)

INCOMPLETE_DIR = ".incomplete"
ABSENT_SUFFIX = ".absent"
# Server answers worth trying again: throttling and server-side failures.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
STREAM_BLOCK_BYTES = 2**20


class RemoteReadError(OSError):
    """A URL could not be read after all retries (or was refused outright)."""


class RemoteAuthError(RemoteReadError):
    """The server answered 401: it wants credentials, or refused the ones given."""


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
    parsed = urllib.parse.urlsplit(url)
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


# Lock descriptors of this process's temp files in `.incomplete`, by path, until `_discard_incomplete`.
_incomplete_locks: dict[pathlib.Path, int] = {}


def _incomplete_path(cache_dir: pathlib.Path, name: str = "download") -> pathlib.Path:
    """A new temp file in `cache_dir/.incomplete`, locked by this process (so no sweep deletes it while this
    process lives, whatever host or container the sweep runs in) until `_discard_incomplete`."""
    path, descriptor = temporaries.create_locked(pathlib.Path(cache_dir) / INCOMPLETE_DIR, name)
    _incomplete_locks[path] = descriptor
    return path


def _discard_incomplete(temporary: pathlib.Path) -> None:
    """Delete the temp file if it was not renamed into place, and drop its lock."""
    temporaries.release(temporary, _incomplete_locks.pop(temporary))


def write_atomic(destination: pathlib.Path, data: bytes, cache_dir: pathlib.Path) -> None:
    """Write `data` to `destination` through a temp file in `cache_dir/.incomplete` and a rename."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with temporaries.held_temporary(pathlib.Path(cache_dir) / INCOMPLETE_DIR, destination.name) as temporary:
        temporary.write_bytes(data)
        os.replace(temporary, destination)
    cache.record_added(cache_dir, len(data))


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


def _is_retryable(error: BaseException) -> bool:
    # Throttling and server errors, dropped connections, truncated bodies (ClientPayloadError), timeouts.
    return isinstance(error, (_RetryableStatus, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


class CachedHTTPStore(Store):
    """Read-only zarr 3 store for `base_url`, caching every fetched key under `cache_dir`.

    `base_url` may carry credentials (`https://user:password@host/...`); they are split off into
    `credentials` and sent as HTTP Basic auth. `max_concurrency` bounds simultaneous HTTP requests of this
    store; `retries` and `backoff_seconds` set the exponential backoff (backoff_seconds · 2^attempt, with
    jitter) on transient failures. `counters` counts what happened ("requests", "fetched", "hits",
    "absent", "retries", "recovered") for tests and benchmarks.
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
        timeout_seconds: float = 60.0,
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
        self.timeout_seconds = timeout_seconds
        self.counters = {"requests": 0, "fetched": 0, "fetched_bytes": 0, "hits": 0, "absent": 0, "retries": 0,
                         "recovered": 0}
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

    async def _get(self, url: str, destination: pathlib.Path | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> bytes | bool | None:
        """GET a URL with retries. Returns its bytes, or with `destination` streams it there atomically
        (memory stays one block) and returns True; None when the server says it does not exist (404)."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        session = _http_session(self.timeout_seconds)
        auth = self.credentials.auth if self.credentials is not None else None
        last_error: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters["retries"] += 1
                delay = self.backoff_seconds * 2 ** (attempt - 1)
                await asyncio.sleep(delay * (0.5 + random.random()))
            temporary = None
            try:
                async with self._semaphore:
                    self.counters["requests"] += 1
                    async with session.get(url, auth=auth) as response:
                        if response.status == 404:
                            return None
                        if response.status == 401:
                            raise self._auth_error(url)
                        if response.status in RETRY_STATUS:
                            raise _RetryableStatus(response.status, response.reason)
                        if response.status >= 400:
                            raise RemoteReadError(f"cannot read {url}: HTTP {response.status} {response.reason}")
                        if destination is None:
                            data = await response.read()
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
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temporary, destination)
                self.counters["fetched"] += 1
                self.counters["fetched_bytes"] += received
                return True
            except RemoteReadError:
                raise
            except Exception as error:  # noqa: BLE001 - classified right below
                if not _is_retryable(error):
                    raise RemoteReadError(f"cannot read {url}: {type(error).__name__}: {error}") from error
                last_error = error
                # str, never repr: an aiohttp error's repr holds the request headers, Authorization included.
                logger.debug("retrying %s after %s: %s", url, type(error).__name__, error)
            finally:
                if temporary is not None:
                    _discard_incomplete(temporary)
        raise RemoteReadError(
            f"cannot read {url} after {self.retries + 1} attempts "
            f"({type(last_error).__name__}: {last_error}); is the data server reachable?"
        ) from last_error

    async def fetch_url(self, url: str, remember_absent: bool = True, recheck_absent: bool = False) -> bytes | None:
        """The bytes at `url`, from the cache or else fetched once and cached (None if the server has none).

        `remember_absent=False` is for probes (is this segment a zarr?) whose answer must not stick.
        `recheck_absent=True` asks the server again about a remembered absence, and caches the file if it
        is there now.
        """
        path = cache_path_for_url(self.cache_dir, url)
        absent_marker = path.with_name(path.name + ABSENT_SUFFIX)
        # None when not cached (or evicted a moment ago); read under a shared lock, so no eviction takes it meanwhile.
        data = cache.read_held(path)
        if data is not None:
            self.counters["hits"] += 1
            return data
        remembered_absent = absent_marker.is_file()
        if remembered_absent and not recheck_absent:
            self.counters["hits"] += 1
            return None
        data = await self._get(url)
        if data is None and remember_absent and not remembered_absent:
            # A 404 is believed when it repeats: one from a flaky proxy must not read as zeros for good.
            data = await self._get(url)
        if data is None:
            self.counters["absent"] += 1
            if remember_absent:
                write_atomic(absent_marker, b"", self.cache_dir)
            return None
        write_atomic(path, data, self.cache_dir)
        if remembered_absent:
            absent_marker.unlink(missing_ok=True)
            self.counters["recovered"] += 1
        return data

    async def download_url(self, url: str, on_bytes: Callable[[int], None] | None = None) -> pathlib.Path | None:
        """Stream a large file (a layer image) into the cache once; its cache path, or None on a 404."""
        path = cache_path_for_url(self.cache_dir, url)
        if path.is_file():
            self.counters["hits"] += 1
            return path
        found = await self._get(url, destination=path, on_bytes=on_bytes)
        return path if found else None

    async def fetch_to_cache(self, key: str, recheck_absent: bool = False) -> bytes | None:
        """The bytes of zarr key `key` (None if absent: a missing chunk means fill value)."""
        return await self.fetch_url(self.url_for(key), recheck_absent=recheck_absent)

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
