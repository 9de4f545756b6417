"""Atomic writes, the JSON-lines log, the master-only TensorBoard writer, seeds, git commit, renamed options. (What
goes into checkpoints, and how they are read, is `pretrain.checkpoint`.)"""
import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from pretrain import dist
from pretrain.utils import errors, temporaries


def note_renamed(old: str, new: str) -> None:
    """The one line a user reads when they give a name that was renamed so that one concept has one name across the
    scripts; the old name keeps working."""
    print(f"note: {old} is now {new}; the old name still works", file=sys.stderr)


class RenamedOption(argparse.Action):
    """An option whose first name is the current one and whose other names are older ones: any name stores the
    value; an older one also prints `note_renamed`'s line.

        parser.add_argument("--pretrained_path", "--encoders", nargs="+", action=RenamedOption)
    """

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.option_strings[0]:
            note_renamed(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


CODE_FILES = ("*.py", "*.sh", "requirements*.txt")  # what decides a result; notes and README do not


def git_commit(repository: str | os.PathLike | None = None) -> str:
    """The code a result comes from: the short commit, plus `-dirty-<hash of the changes>` when code files differ
    from it (edited or untracked), so that two different uncommitted states never share a name. 'unknown'
    outside a git checkout."""
    folder = pathlib.Path(repository) if repository is not None else pathlib.Path(__file__).resolve().parent

    def git(*arguments: str, where: pathlib.Path) -> bytes:
        return subprocess.run(["git", *arguments], capture_output=True, timeout=10, cwd=where, check=True).stdout

    try:
        root = pathlib.Path(git("rev-parse", "--show-toplevel", where=folder).decode().strip())
        commit = git("rev-parse", "--short", "HEAD", where=root).decode().strip()
        changes = git("diff", "HEAD", "--", *CODE_FILES, where=root)  # pathspecs from the root: the whole tree
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_FILES, where=root).split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    digest = hashlib.sha256(changes)
    for name in sorted(filter(None, untracked)):
        digest.update(name + b"\0" + (root / name.decode()).read_bytes())
    return commit if not changes and not any(untracked) else f"{commit}-dirty-{digest.hexdigest()[:10]}"


_file_sha256s: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in blocks: what a checkpoint, label image or prior is, whatever its name.
    Remembered per resolved path, size and modification time within a process: checkpoints are large, and a run or
    report names each several times."""
    stat = os.stat(path)
    remembered = (str(pathlib.Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if remembered not in _file_sha256s:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        _file_sha256s[remembered] = digest.hexdigest()
    return _file_sha256s[remembered]


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, atomically (`pretrain.utils.temporaries.write_atomic`)."""
    with write_errors_named(path):
        temporaries.write_atomic(path, lambda temporary: torch.save(obj, temporary))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Bytes (an encoded PNG, JSON, Markdown) to a file, atomically."""
    with write_errors_named(path):
        temporaries.write_atomic(path, lambda temporary: temporary.write_bytes(data))


# How torch's zip writer words a failed write (a full disk) in its RuntimeError.
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


@contextlib.contextmanager
def write_errors_named(path: str | os.PathLike):
    """A write of `path` that fails for want of room or rights is a WriteError naming `path` (not its temp file) and
    the room left. torch reports a failed write as a RuntimeError of its zip writer: one of those too."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, errors.OneLineError) or (isinstance(error, OSError)
                                                        and error.errno not in errors.ENVIRONMENT_ERRNOS):
            raise
        if isinstance(error, RuntimeError) and not any(words in str(error) for words in TORCH_WRITE_FAILURES):
            raise
        folder = pathlib.Path(path).parent
        free = f"; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free in {folder}" if folder.is_dir() else ""
        reason = error.strerror if isinstance(error, OSError) else str(error).strip().splitlines()[-1]
        raise errors.WriteError(f"{path} could not be written: {reason}{free}") from error


def check_writable_folder(folder: str | os.PathLike, setting: str) -> None:
    """A WriteError naming `setting` unless `folder` can be written or made: checked before any work, and without
    making it, so that a run refused later for another mistake leaves nothing behind."""
    folder = pathlib.Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise errors.WriteError(f"{setting} {folder} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "is not writable"
        raise errors.WriteError(f"{setting} {folder} cannot be written: {existing} {why}")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temp files our writers left in `folder` and its subfolders when killed (they are never read).
    Files of any other name stay, and so do the temp files of writers still running (a second run writing a
    checkpoint into the same folder). Returns how many were deleted."""
    return temporaries.remove_dead_temporaries(pathlib.Path(folder).rglob(f".*{temporaries.SUFFIX}"))


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed of its own for every (run seed, rank, epoch). Seeding each epoch from it, rather than restoring
    saved generator states on resume, gives every rank its own randomness and a resumed run the same draws,
    whatever process saved the checkpoint."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


class JsonLinesLog:
    """Appends one JSON object per line (rank 0 only): the run's command and commit, then per-epoch metrics."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)

    def write(self, **record) -> None:
        if dist.is_master():
            line = json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), **record}, default=str) + "\n"
            with write_errors_named(self.path), open(self.path, "a") as file:
                length = file.tell()
                try:
                    file.write(line)
                    file.flush()
                except OSError:  # a full disk: no half line for a later run to append its own to
                    file.truncate(length)
                    raise


class TensorboardLogger:
    """SummaryWriter on rank 0, silent elsewhere; every tag logged against the global step."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.writer = None
        if dist.is_master():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, **values: float) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag.replace("__", "/"), value, step)

    def image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
