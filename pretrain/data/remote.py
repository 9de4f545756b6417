"""Read-only zarr store over HTTP with a persistent on-disk cache of every key it fetches.

Why a store of our own: zarr's fsspec HTTP store re-downloads a chunk each time it is read, and one
truncated response aborts the read (the complaints against the `vesuvius` library, villa #1325 and
#1666). Here each key (chunk or metadata) is fetched at most once, ever:

    zarr  --get(key)-->  CachedHTTPStore  --hit-->  {cache_dir}/{host}/{path}/{key}
                                         --miss-->  fsspec HTTP GET (bounded concurrency, retries)
                                                    --> written atomically into the cache

A key the server does not have (404) is remembered as `{key}.absent`: for zarr a missing chunk means
"fill value", so a warm run never asks again. Files are first written under `{cache_dir}/.incomplete/`
and then renamed into place, so a killed run leaves no partial file where the cache looks; leftovers of
dead processes are swept when a store opens.
"""
import asyncio
import atexit
import contextlib
import logging
import os
import pathlib
import random
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterable

import aiohttp
import fsspec
import zarr.core.sync
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype

logger = logging.getLogger(__name__)

INCOMPLETE_DIR = ".incomplete"
ABSENT_SUFFIX = ".absent"
# Server answers worth trying again: throttling and server-side failures.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class RemoteReadError(OSError):
    """A URL could not be read after all retries (or was refused outright)."""


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SEGMENT_CACHE_DIR") or pathlib.Path.home() / ".cache" / "vesuvius-ink")


def cache_path_for_url(cache_dir: pathlib.Path, url: str) -> pathlib.Path:
    """Where a URL's bytes live in the cache: a mirror of host and path."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.netloc.replace(":", "_")  # a port must not make an invalid folder name
    return pathlib.Path(cache_dir) / host / parsed.path.strip("/")


def write_atomic(destination: pathlib.Path, data: bytes, cache_dir: pathlib.Path) -> None:
    """Write `data` to `destination` through a temp file in `cache_dir/.incomplete` and a rename."""
    incomplete_dir = pathlib.Path(cache_dir) / INCOMPLETE_DIR
    incomplete_dir.mkdir(parents=True, exist_ok=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = incomplete_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_incomplete(cache_dir: pathlib.Path) -> int:
    """Delete temp files left by processes that no longer run (a kill -9 mid-write). Returns the count."""
    incomplete_dir = pathlib.Path(cache_dir) / INCOMPLETE_DIR
    removed = 0
    if not incomplete_dir.is_dir():
        return 0
    for temporary in incomplete_dir.iterdir():
        pid_text = temporary.name.split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            temporary.unlink(missing_ok=True)
            removed += 1
    return removed


_process_filesystem: tuple[int, object] | None = None


def _http_filesystem(timeout_seconds: float):
    """One fsspec HTTP filesystem (one aiohttp session on zarr's event loop) per process, closed at exit."""
    global _process_filesystem
    if _process_filesystem is None or _process_filesystem[0] != os.getpid():
        filesystem = fsspec.filesystem(
            "http",
            asynchronous=True,
            skip_instance_cache=True,  # a forked worker must not reuse its parent's session
            client_kwargs={"timeout": aiohttp.ClientTimeout(total=timeout_seconds)},
        )
        _process_filesystem = (os.getpid(), filesystem)
    return _process_filesystem[1]


@atexit.register
def _close_http_session() -> None:
    if _process_filesystem is None or _process_filesystem[0] != os.getpid():
        return
    session = getattr(_process_filesystem[1], "_session", None)
    if session is not None and not session.closed:
        with contextlib.suppress(Exception):
            zarr.core.sync.sync(session.close())


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status in RETRY_STATUS
    # Dropped connections, truncated bodies (ClientPayloadError), timeouts, refused connections.
    return isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError))


class CachedHTTPStore(Store):
    """Read-only zarr 3 store for `base_url`, caching every fetched key under `cache_dir`.

    `max_concurrency` bounds simultaneous HTTP requests of this store; `retries` and `backoff_seconds`
    set the exponential backoff (backoff_seconds · 2^attempt, with jitter) on transient failures.
    `counters` counts what happened ("fetched", "hits", "absent", "retries") for tests and benchmarks.
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
    ) -> None:
        super().__init__(read_only=True)
        self.base_url = base_url.rstrip("/")
        self.cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_root = cache_path_for_url(self.cache_dir, self.base_url)
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.timeout_seconds = timeout_seconds
        self.counters = {"fetched": 0, "fetched_bytes": 0, "hits": 0, "absent": 0, "retries": 0}
        self._semaphore = None
        sweep_incomplete(self.cache_dir)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CachedHTTPStore) and (other.base_url, other.cache_dir) == (
            self.base_url,
            self.cache_dir,
        )

    def __getstate__(self) -> dict:
        # A DataLoader worker gets its own semaphore (it belongs to one event loop).
        state = self.__dict__.copy()
        state["_semaphore"] = None
        return state

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/{key}"

    def is_cached(self, key: str) -> bool:
        path = self.cache_root / key
        return path.is_file() or path.with_name(path.name + ABSENT_SUFFIX).is_file()

    async def _fetch(self, url: str) -> bytes | None:
        """GET a URL with retries; None when the server says it does not exist (404)."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        filesystem = _http_filesystem(self.timeout_seconds)
        last_error: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters["retries"] += 1
                delay = self.backoff_seconds * 2 ** (attempt - 1)
                await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                async with self._semaphore:
                    data = await filesystem._cat_file(url)
                self.counters["fetched"] += 1
                self.counters["fetched_bytes"] += len(data)
                return data
            except FileNotFoundError:
                return None
            except Exception as error:  # noqa: BLE001 - classified right below
                if not _is_retryable(error):
                    raise RemoteReadError(f"cannot read {url}: {error}") from error
                last_error = error
                logger.debug("retrying %s after %r", url, error)
        raise RemoteReadError(
            f"cannot read {url} after {self.retries + 1} attempts "
            f"({type(last_error).__name__}: {last_error}); is the data server reachable?"
        ) from last_error

    async def fetch_url(self, url: str, remember_absent: bool = True) -> bytes | None:
        """The bytes at `url`, from the cache or else fetched once and cached (None if the server has none).

        `remember_absent=False` is for files that may appear on the server later (label PNGs).
        """
        path = cache_path_for_url(self.cache_dir, url)
        absent_marker = path.with_name(path.name + ABSENT_SUFFIX)
        if path.is_file():
            self.counters["hits"] += 1
            return path.read_bytes()
        if absent_marker.is_file():
            self.counters["hits"] += 1
            return None
        data = await self._fetch(url)
        if data is None:
            self.counters["absent"] += 1
            if remember_absent:
                write_atomic(absent_marker, b"", self.cache_dir)
            return None
        write_atomic(path, data, self.cache_dir)
        return data

    async def fetch_to_cache(self, key: str) -> bytes | None:
        """The bytes of zarr key `key` (None if absent: a missing chunk means fill value)."""
        return await self.fetch_url(self.url_for(key))

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
