"""The segment cache's size: an optional bound with least-recently-used eviction, and a report and removal
per segment.

    python -m pretrain.data.cache list                  # each segment's size in the cache, and the total
    python -m pretrain.data.cache remove SEGMENT_ID     # delete every cached file of one segment

`SEGMENT_CACHE_MAX_GB` (unset: no bound) bounds the cache. How it holds without slowing reads:
- a read of a cached file holds a shared `flock` on it while reading (`read_held`) and marks it used (its
  access time, set at most once a minute);
- each file the cache gains is added to a running total in `{cache}/.size` (under an exclusive flock), so
  nothing walks the cache on the read path, nor on most writes;
- when the total passes the bound, one process at a time (`{cache}/.locks/eviction`) walks the cache and
  deletes the least recently used files that no process holds (it must get an exclusive lock on each) until
  the cache is at `EVICT_TO` of the bound, then writes the walked total back.
A file is evicted whole, and only one the data server can give again (a chunk, a mask, a label image). A
segment converted from layer images (`…/paths/{id}/layers.zarr`) is one unit: it is evicted, or removed,
whole or not at all, and never while a process has it open (each holds a shared lock on its `zarr.json` from
opening it until exit), since a chunk missing there would read as zeros. The demo segments are never evicted.

Each chunk body carries its CRC-32C, recorded when it enters the cache (`write_recorded`) as an extended attribute of
the file (`DIGEST_ATTRIBUTE`), set on the temp file before the rename: file and record appear together, or neither
does, whatever kill -9 or a second process does meanwhile, and the file's bytes stay the server's. A read compares
them (`pretrain.data.remote`): Blosc-zstd has no checksum of its own, so a flipped bit inside a chunk of the right
size would otherwise decode to wrong voxels without a word.
"""
import contextlib
import dataclasses
import errno
import fcntl
import math
import os
import pathlib
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator

import crc32c

from pretrain.utils import temporaries
from pretrain.utils import errors

MAX_GB_VARIABLE = "SEGMENT_CACHE_MAX_GB"
EVICT_TO = 0.9  # evicting below the bound leaves room, so a walk comes once per tenth of the bound fetched
SIZE_FILE = ".size"
EVICTION_LOCK = pathlib.Path(".locks") / "eviction"
CONVERTED_NAME = "layers.zarr"  # what `pretrain.data.segment` converts a server layer folder into
CONVERTED_METADATA = "zarr.json"
# Access times closer together than this are not worth a write: LRU order needs minutes, not nanoseconds.
RECENCY_RESOLUTION_NS = 60 * 10**9
SEGMENT_FILE_PATTERN = re.compile(r"(\d{8,}(?:_[\w-]+?)??)(?:_superseded)?(?:\.zarr|_mask\.png|_inklabels\.png"
                                  r"|_negatives\.png)?(?:\.absent)?")

# Zarr metadata is never evicted: it is small, and the chunk checks of `pretrain.data.remote` read it from here.
METADATA_NAMES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")

# The extended attribute holding a chunk body's CRC-32C (4 bytes, little-endian). CRC-32C and not a cryptographic
# hash: it finds any damage short of a forgery, and, computed in hardware, costs a few percent of a warm chunk read
# where blake2b would cost most of one (notes/performance.md).
DIGEST_ATTRIBUTE = "user.vesuvius-ink.crc32c"
# Where a file system keeps no extended attributes, a write fails with one of these (and the body goes unrecorded).
NO_ATTRIBUTES_ERRORS = (errno.ENOTSUP, errno.EOPNOTSUPP)

# Shared locks this process keeps on the converted segments it opened, until it exits (by folder).
_held_for_life: dict[pathlib.Path, object] = {}


def positive_setting(name: str, unit: str) -> float | None:
    """The positive number in environment variable `name`, or None when it is unset. Raises ValueError naming the
    variable (and `unit`, what the number counts) when it is anything else."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{name}={text!r} is not a positive number of {unit}")
    return value


def max_bytes() -> int | None:
    """The bound from `SEGMENT_CACHE_MAX_GB` in bytes, or None when it is unset or `inf`. Raises ValueError naming
    the variable when it is not a positive number, or less than a byte."""
    gigabytes = positive_setting(MAX_GB_VARIABLE, "gigabytes (unset it for no bound)")
    if gigabytes is None or math.isinf(gigabytes):
        return None
    if gigabytes * 10**9 < 1:
        raise ValueError(f"{MAX_GB_VARIABLE}={os.environ[MAX_GB_VARIABLE].strip()!r} bounds the cache at less than "
                         "one byte: give gigabytes, such as 50 (unset it, or inf, for no bound)")
    return int(gigabytes * 10**9)


def unevictable_bytes(cache_dir: pathlib.Path) -> int:
    """What the cache holds that no eviction removes (metadata, demo segments, conversions under way)."""
    return sum(unit.size for unit in entries(cache_dir) if not unit.evictable)


def _mark_used(descriptor: int, status: os.stat_result) -> None:
    now = time.time_ns()
    if now - status.st_atime_ns > RECENCY_RESOLUTION_NS:
        with contextlib.suppress(PermissionError):  # a cache shared between users: the owner's reads still count
            os.utime(descriptor, ns=(now, status.st_mtime_ns))


def body_digest(data: bytes) -> bytes:
    """The digest recorded for a body: its CRC-32C, 4 bytes."""
    return crc32c.crc32c(data).to_bytes(4, "little")


@dataclasses.dataclass(frozen=True)
class HeldRead:
    """A cached file as read: its bytes, the digest recorded when it entered the cache (None: none recorded), and
    its identity (device, inode, size, modification time): a file replaced or written over has another."""

    data: bytes
    digest: bytes | None
    identity: tuple[int, int, int, int]


def read_held(path: pathlib.Path) -> HeldRead | None:
    """Cached file `path`, read under a shared lock (so no eviction takes it meanwhile), and the file marked as
    used; None when it is not in the cache."""
    try:
        file = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        return None
    with file:
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
        data = file.read()
        status = os.fstat(file.fileno())
        _mark_used(file.fileno(), status)
        try:
            digest = os.getxattr(file.fileno(), DIGEST_ATTRIBUTE)
        except OSError:  # no record (ENODATA), or a file system without extended attributes
            digest = None
    return HeldRead(data, digest, (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns))


def write_recorded(path: pathlib.Path, data: bytes, folder: pathlib.Path) -> bool:
    """Write `data` to `path` atomically (a temp file in `folder`, renamed), with its digest recorded on the temp
    file before the rename. False where the file system keeps no extended attributes: written without a record."""
    recorded = True

    def write(temporary: pathlib.Path) -> None:
        nonlocal recorded
        temporary.write_bytes(data)
        try:
            os.setxattr(temporary, DIGEST_ATTRIBUTE, body_digest(data))
        except OSError as error:
            if error.errno not in NO_ATTRIBUTES_ERRORS:
                raise
            recorded = False

    temporaries.write_atomic(path, write, folder=folder)
    return recorded


def record_digest(path: pathlib.Path, held: HeldRead) -> bool:
    """Record the digest of `held` (a file cached before digests were, and found sound) on the file it was read
    from, if `path` still is that file. False where the file system keeps no extended attributes."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True  # gone or replaced meanwhile: whoever replaced it recorded its own
    try:
        status = os.fstat(descriptor)
        if (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns) == held.identity:
            os.setxattr(descriptor, DIGEST_ATTRIBUTE, body_digest(held.data))
    except PermissionError:  # a cache shared between users: the owner's reads record it
        pass
    except OSError as error:
        if error.errno in NO_ATTRIBUTES_ERRORS:
            return False
        raise
    finally:
        os.close(descriptor)
    return True


def hold_converted(converted: pathlib.Path) -> None:
    """Keep converted segment `converted` from eviction and removal while this process lives."""
    if converted in _held_for_life:
        return
    file = open(converted / CONVERTED_METADATA, "rb")
    fcntl.flock(file.fileno(), fcntl.LOCK_SH)
    _mark_used(file.fileno(), os.fstat(file.fileno()))
    _held_for_life[converted] = file


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield descriptor
    finally:
        os.close(descriptor)


def _read_total(descriptor: int) -> int | None:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _write_total(descriptor: int, total: int) -> None:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(max(total, 0)).encode(), 0)


def record_added(cache_dir: pathlib.Path, added_bytes: int) -> None:
    """Count `added_bytes` the cache just gained; evict if that takes it past the bound. Without a bound: nothing."""
    bound = max_bytes()
    if bound is None or added_bytes == 0:
        return
    with _locked(pathlib.Path(cache_dir) / SIZE_FILE) as descriptor:
        total = _read_total(descriptor)
        if total is not None:
            total += added_bytes
            _write_total(descriptor, total)
    if total is None or total > bound:  # no total yet (the first bounded run on this cache) needs a walk too
        enforce_bound(cache_dir, bound, only_if_over=True)


@dataclasses.dataclass
class CachedEntry:
    """One unit of the cache: a file, or a converted segment (a folder, evicted whole)."""

    path: pathlib.Path
    segment: str  # segment ID, `demo:<seed>`, or "(other)"
    size: int
    files: int
    last_used_ns: int
    evictable: bool


def _segment_of(parts: tuple[str, ...]) -> str:
    """The segment a cached path (relative to the cache folder) belongs to."""
    if parts[0] == "demo":
        seed = re.match(r"seed(\d+)-", parts[1]) if len(parts) > 1 else None
        return f"demo:{seed.group(1)}" if seed else "demo"
    for part in parts[1:]:
        match = SEGMENT_FILE_PATTERN.fullmatch(part)
        if match:
            return match.group(1)
    return "(other)"


def _folder_size(folder: pathlib.Path) -> tuple[int, int]:
    size = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                size += os.stat(os.path.join(root, name)).st_size
                files += 1
    return size, files


def entries(cache_dir: pathlib.Path) -> list[CachedEntry]:
    """Every unit in the cache (its own bookkeeping, in `.`-folders at the top, left out)."""
    cache_dir = pathlib.Path(cache_dir)
    found = []
    if not cache_dir.is_dir():
        return found
    pending = [entry for entry in os.scandir(cache_dir) if not entry.name.startswith(".")]
    while pending:
        entry = pending.pop()
        path = pathlib.Path(entry.path)
        parts = path.relative_to(cache_dir).parts
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.name == CONVERTED_NAME and (path / CONVERTED_METADATA).is_file():
                    size, files = _folder_size(path)
                    last_used = os.stat(path / CONVERTED_METADATA).st_atime_ns
                    found.append(CachedEntry(path, _segment_of(parts), size, files, last_used, True))
                else:
                    pending.extend(os.scandir(path))
                continue
            status = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        # The raw layer images (and a half-converted zarr) belong to a conversion under way; demo segments are
        # local zarrs too: a missing chunk would read as zeros.
        in_conversion = any(part == "layers" or part.endswith(".partial") for part in parts)
        evictable = status.st_size > 0 and parts[0] != "demo" and not in_conversion and entry.name not in METADATA_NAMES
        found.append(CachedEntry(path, _segment_of(parts), status.st_size, 1, status.st_atime_ns, evictable))
    return found


def _remove_unheld(entry: CachedEntry) -> bool:
    """Delete `entry` unless a process holds it (reads it, or has the converted segment open)."""
    lock_path = entry.path / CONVERTED_METADATA if entry.path.is_dir() else entry.path
    try:
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return False
    try:
        if lock_path == entry.path:
            entry.path.unlink()
        else:
            # Renamed aside first: a segment half deleted must never be found as a converted segment.
            doomed = entry.path.with_name(f".{entry.path.name}.removing-{uuid.uuid4().hex}")
            os.rename(entry.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(descriptor)


def enforce_bound(cache_dir: pathlib.Path, bound: int | None, only_if_over: bool = False) -> int:
    """Walk the cache, evict least recently used units no process holds until it is at `EVICT_TO` × `bound`
    (with a bound), and write the true total into the running count. Returns the total after eviction.
    `only_if_over`: skip the walk when the running count is within the bound (another process evicted while
    this one waited for the lock)."""
    cache_dir = pathlib.Path(cache_dir)
    with _locked(cache_dir / EVICTION_LOCK):
        with _locked(cache_dir / SIZE_FILE) as descriptor:
            counted = _read_total(descriptor)
        if only_if_over and counted is not None and bound is not None and counted <= bound:
            return counted
        counted_before = counted or 0
        units = entries(cache_dir)
        total = sum(unit.size for unit in units)
        if bound is not None and total > bound:
            target = int(bound * EVICT_TO)
            for unit in sorted((unit for unit in units if unit.evictable), key=lambda unit: unit.last_used_ns):
                if total <= target:
                    break
                if _remove_unheld(unit):
                    total -= unit.size
        with _locked(cache_dir / SIZE_FILE) as descriptor:
            # Files added while this walked were counted by their writers: keep them (a slight overcount at
            # worst, which only brings the next walk earlier).
            _write_total(descriptor, total + (_read_total(descriptor) or 0) - counted_before)
    return total


def segment_sizes(cache_dir: pathlib.Path) -> dict[str, tuple[int, int]]:
    """(bytes, files) per segment in the cache, largest first."""
    sizes: dict[str, tuple[int, int]] = {}
    for unit in entries(cache_dir):
        size, files = sizes.get(unit.segment, (0, 0))
        sizes[unit.segment] = (size + unit.size, files + unit.files)
    return dict(sorted(sizes.items(), key=lambda item: -item[1][0]))


def remove_segment(cache_dir: pathlib.Path, segment_id: str) -> tuple[int, int, int]:
    """Delete every cached unit of `segment_id` that no process holds: (bytes removed, files removed, files kept
    because a process holds them)."""
    cache_dir = pathlib.Path(cache_dir)
    removed_bytes = removed_files = kept_files = 0
    emptied: set[pathlib.Path] = set()
    for unit in entries(cache_dir):
        if unit.segment != segment_id:
            continue
        if _remove_unheld(unit):
            removed_bytes += unit.size
            removed_files += unit.files
            emptied.add(unit.path.parent)
        else:
            kept_files += unit.files
    for folder in sorted(emptied, key=lambda path: -len(path.parts)):
        while folder != cache_dir and cache_dir in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty: other files, or a writer's new one
                break
            folder = folder.parent
    enforce_bound(cache_dir, None)  # the running count, set to what is left
    return removed_bytes, removed_files, kept_files


def _gigabytes(size: int) -> str:
    return f"{size / 10**9:.3f} GB"


def main(argv: list[str] | None = None) -> int:
    from pretrain.data.remote import default_cache_dir  # deferred: remote imports this module
    from pretrain.data.segment import SEGMENT_ID_PATTERN

    parser = errors.ArgumentParser(prog="python -m pretrain.data.cache",
                                     description="Report the segment cache's size per segment, or remove a segment.")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="the cache (default: $SEGMENT_CACHE_DIR or ~/.cache/vesuvius-ink)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="each segment's size in the cache, largest first, and the total")
    remove = commands.add_parser("remove", help="delete every cached file of one segment")
    remove.add_argument("segment_id", help="segment ID, e.g. 20230827161847")
    args = parser.parse_args(argv)
    cache_dir = args.cache_dir or default_cache_dir()
    try:
        bound = max_bytes()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not cache_dir.is_dir():
        print(f"error: there is no cache at {cache_dir} (set SEGMENT_CACHE_DIR or --cache-dir)", file=sys.stderr)
        return 2
    if args.command == "list":
        sizes = segment_sizes(cache_dir)
        for segment, (size, files) in sizes.items():
            print(f"{segment:<32} {_gigabytes(size):>12} {files:>9} files")
        total = sum(size for size, _ in sizes.values())
        setting = os.environ.get(MAX_GB_VARIABLE, "").strip()
        bound_text = f"bound {_gigabytes(bound)}" if bound else "no bound"
        bound_text += f" ({MAX_GB_VARIABLE}{f'={setting}' if setting else ' unset'})"
        print(f"{'total':<32} {_gigabytes(total):>12}  in {cache_dir}; {bound_text}")
        return 0
    segment_id = args.segment_id.strip()
    if not SEGMENT_ID_PATTERN.fullmatch(segment_id):
        print(f"error: {args.segment_id!r} is not a segment ID (digits such as 20230827161847)", file=sys.stderr)
        return 2
    removed_bytes, removed_files, kept_files = remove_segment(cache_dir, segment_id)
    if removed_files == 0 and kept_files == 0:
        print(f"error: segment {segment_id} has no files in the cache {cache_dir}", file=sys.stderr)
        return 2
    print(f"removed segment {segment_id}: {removed_files} files, {_gigabytes(removed_bytes)} from {cache_dir}")
    if kept_files:
        print(f"error: {kept_files} files of segment {segment_id} are in use by another process and were kept; "
              "run this again when it ends", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
