"""Temp files of atomic writes: one naming rule for every writer, and a lock that says which are live.

Every atomic write of the project (checkpoints, images, JSON, cached chunks, progress records) is
`write_atomic` here, or, for a download streamed to disk, `create_locked` and a rename. The temp file is named
`.{name}.{32 hex}.vesuvius-ink.tmp`, a name no other program uses, and its writer holds an exclusive `flock`
on it from creation until the rename. A sweep
(`remove_dead_temporaries`) deletes only files of that name whose lock it can take: the writer died (the
kernel releases a dead process's locks). Why a lock rather than the PID in the name: a PID means nothing
to another PID namespace (a container sharing the cache) or another host (a cache on NFS), and a sweep
that trusted it deleted live downloads. flock works across PID namespaces on one host, and across NFS
clients where the kernel maps it onto NFS locks (Linux does, unless the mount says `local_lock=flock`).
"""
import contextlib
import fcntl
import os
import pathlib
import re
import uuid
from collections.abc import Callable, Iterable, Iterator

MARK = "vesuvius-ink"
SUFFIX = f".{MARK}.tmp"
NAME_PATTERN = re.compile(rf"\..*\.[0-9a-f]{{32}}\.{re.escape(MARK)}\.tmp")
# A file name may be 255 bytes; the rule adds 50 characters around the destination's name.
LONGEST_NAME = 150

# Lock descriptors this process holds; a forked child closes its copies (a DataLoader worker must not keep a
# dead parent's temp file locked, which would stop the next run from sweeping it).
_held_descriptors: set[int] = set()


def _close_inherited_locks() -> None:
    for descriptor in _held_descriptors:
        os.close(descriptor)  # the parent's descriptor keeps the lock: it is released when all are closed
    _held_descriptors.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def temporary_path(folder: str | os.PathLike, name: str) -> pathlib.Path:
    """A fresh temp file name in `folder` for writing `name`, by the one rule the sweeps match."""
    return pathlib.Path(folder) / f".{name[:LONGEST_NAME]}.{uuid.uuid4().hex}{SUFFIX}"


def is_temporary(path: str | os.PathLike) -> bool:
    """Is `path` named as one of our temp files (and so ours to sweep once its writer is dead)?"""
    return NAME_PATTERN.fullmatch(pathlib.Path(path).name) is not None


class HeldTemporary(pathlib.PosixPath):
    """The path of a temp file whose lock this process holds. `unlink` deletes the file if it is still there
    (not renamed into place) and drops the lock: code that streams into a temp file and deletes it in a
    `finally`, as it does anyway, needs nothing more."""

    _descriptor: int | None = None  # paths derived from this one (its parent, ...) hold no lock

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            super().unlink(missing_ok=missing_ok)
        finally:
            if self._descriptor in _held_descriptors:  # not in a forked child, which closed its copies
                _held_descriptors.discard(self._descriptor)
                os.close(self._descriptor)
            self._descriptor = None


def create_locked(folder: str | os.PathLike, name: str) -> HeldTemporary:
    """Create an empty temp file for `name` in `folder`, locked until its path's `unlink`.

    A sweep may take the lock in the instant between the file's creation and our lock, and delete it; the
    file then has no name left (st_nlink 0) and a new one is made."""
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    while True:
        path = HeldTemporary(temporary_path(folder, name))
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        if os.fstat(descriptor).st_nlink > 0:
            _held_descriptors.add(descriptor)
            path._descriptor = descriptor
            return path
        os.close(descriptor)


@contextlib.contextmanager
def held_temporary(folder: str | os.PathLike, name: str) -> Iterator[pathlib.Path]:
    """A locked temp file in `folder` for writing `name`; rename it into place inside the block. On leaving, a
    temp file still there (the write failed) is deleted."""
    path = create_locked(folder, name)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[pathlib.Path], object],
                 folder: str | os.PathLike | None = None) -> None:
    """The project's one atomic write: `write(temporary)` fills a held temp file, which is then renamed onto
    `path`, so a kill or a reader never sees half a file. The temp file sits in `folder`, by default beside
    `path` (the chunk cache keeps its own in one folder it sweeps; it must be on `path`'s file system)."""
    path = pathlib.Path(path)
    with held_temporary(path.parent if folder is None else folder, path.name) as temporary:
        write(temporary)
        os.replace(temporary, path)


def remove_dead_temporaries(paths: Iterable[pathlib.Path]) -> int:
    """Delete those of `paths` that are our temp files and whose writer is gone (their lock is free); files of
    other names, and live ones, stay. Returns how many were deleted."""
    removed = 0
    for path in paths:
        if not is_temporary(path):
            continue
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # renamed into place or swept by someone else since it was listed
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        try:
            # Still the file that was opened: not renamed into place while this waited for the lock.
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
        finally:
            os.close(descriptor)
    return removed
