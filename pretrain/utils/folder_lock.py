"""One run per folder: a run holds an exclusive lock on the folder it writes (fine-tuning's experiment folder,
pretraining's exp_dir, predict.py's output folder), and a second run there is refused in one line naming the holder.

The lock is an `flock` on `.run.lock` in the folder, which also records who holds it (pid, host, start time,
command). The kernel releases an flock when its process ends, however it ends (kill -9 included), so a stale lock
file never blocks: the next run takes the lock and writes itself in. The file stays (deleting a lock file races
with a run opening it). flock works across PID namespaces on one host, and across NFS clients where the kernel maps
it onto NFS locks (Linux does, unless the mount says `local_lock=flock`). Under torchrun only rank 0 locks: it is
the rank that writes.
"""
import fcntl
import json
import os
import pathlib
import socket
import sys
import time

from pretrain import dist
from pretrain.utils.errors import OneLineError

LOCK_FILE = ".run.lock"
HOLDER_READ_ATTEMPTS = 5  # the holder writes itself in just after taking the lock: a reader may come in between

# folder (resolved) -> descriptor of its lock file, for the life of the process
_held: dict[pathlib.Path, int] = {}


class FolderInUseError(OneLineError, RuntimeError):
    """Another run holds the folder; the message names it."""


def _close_inherited_locks() -> None:
    # A forked child (a DataLoader worker) must not keep the lock once its parent is killed: only the run's own
    # process holds it. The parent's descriptor keeps the lock, as it is released when all are closed.
    for descriptor in _held.values():
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def holder_text(path: pathlib.Path) -> str:
    """Who holds the lock, as its file records it: 'pid 123 on host h since 2026-12-07 02:40:00 (command)'."""
    for _ in range(HOLDER_READ_ATTEMPTS):
        try:
            holder = json.loads(path.read_text())
            return (f"pid {holder['pid']} on host {holder['host']} since {holder['started']} "
                    f"({holder['command']})")
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a run that has not written its name yet"


def hold(folder: str | os.PathLike, what: str = "run") -> None:
    """Lock `folder` (made if missing) for this process until it ends; a second call for the same folder does
    nothing. Raises FolderInUseError naming the holder when another run holds it. On ranks other than 0, nothing."""
    if not dist.is_master():
        return
    folder = pathlib.Path(folder)
    key = folder.resolve()
    if key in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FolderInUseError(f"{folder} is in use by another {what}: {holder_text(path)}; wait for it to end, or "
                               f"write to another folder") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv])}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(holder).encode(), 0)
    _held[key] = descriptor


def release(folder: str | os.PathLike) -> None:
    """Let go of `folder`'s lock, if this process holds it: for a run's main() called in a process that goes on
    (tests, notebooks); a script's process releases it by ending."""
    descriptor = _held.pop(pathlib.Path(folder).resolve(), None)
    if descriptor is not None:
        os.close(descriptor)
