"""What decides a result, as content, so that a finished run or report step is reused exactly when rerunning it
would give the same result: the code it executes (hashes of the source files of the packages it runs, so a commit
that touches only README or notes reuses everything), its command with every file it reads replaced by a digest of
that file's bytes (glyph image, encoder checkpoint, prior), and each segment's identity (`segment_key`). A run
folder whose key differs is moved to `.superseded/` beside it (nothing is deleted) and run again."""
import hashlib
import json
import os
import pathlib

from pretrain.data.segment import SegmentError, segment_identity
from pretrain.utils.misc import file_sha256, write_bytes_atomic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SEGMENT_OPTIONS = ("--segment_id", "--data_path", "--VALIDATION_SEGMENTS")  # each followed by one or more specs
KEY_FILE = "key.json"  # in a run folder: the key of the run it holds (written before the run starts)
TRAIN_CODE = ("finetune", "pretrain")  # what finetune/train.py executes
PRETRAIN_CODE = ("pretrain",)
EVALUATE_CODE = ("evaluate", "finetune", "pretrain")


def segment_key(spec: str) -> str:
    """The identity of a segment spec in a key: one segment however it is spelled (demo:1 and demo:01, an ID bare
    or with its scroll, a path relative or absolute). A spec that names no segment stays as written: its run
    refuses it."""
    try:
        return segment_identity(spec)
    except SegmentError:
        return spec


def file_digest(path: str | os.PathLike) -> str:
    """A file argument in a key: the sha256 of its bytes."""
    return "sha256:" + file_sha256(path)


def code_digest(packages: tuple[str, ...]) -> str:
    """sha256 over the Python source files of `packages` (top-level folders of the repository) and requirements.txt:
    the code a step executes, whatever the commit says about other files."""
    digest = hashlib.sha256()
    files = sorted(path for package in packages for path in (REPO_ROOT / package).rglob("*.py")
                   if "__pycache__" not in path.parts)
    for path in [*files, REPO_ROOT / "requirements.txt"]:
        if path.is_file():
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def content_command(command: list[str], digests: dict[str, str] | None = None) -> list[str]:
    """`command` (interpreter first) as what decides its result: the interpreter dropped, each argument that names
    an existing file (not a .py script: code is keyed apart) replaced by its digest, or by `digests[argument]` for a
    file about to be written, and each segment spec by `segment_key`."""
    digests = digests or {}
    content, segments = [], False
    for argument in command[1:]:
        if argument.startswith("--"):
            segments = argument in SEGMENT_OPTIONS
            content.append(argument)
            continue
        path = pathlib.Path(argument)
        if not path.is_absolute() and not path.is_file():  # scripts' steps run in the repository root
            path = REPO_ROOT / argument
        if argument in digests:
            content.append(digests[argument])
        elif segments:
            content.append(segment_key(argument))
        elif not argument.endswith(".py") and path.is_file():
            content.append(file_digest(path))
        else:
            content.append(argument)
    return content


def code_of(script: str) -> tuple[str, ...]:
    """The packages a repository script executes: pretrain/ scripts pretrain's, finetune/ scripts finetune's and
    pretrain's, evaluate/ scripts all three."""
    top = pathlib.Path(script).resolve().relative_to(REPO_ROOT).parts[0] if pathlib.Path(script).is_absolute() \
        else pathlib.Path(script).parts[0]
    return {"pretrain": PRETRAIN_CODE, "finetune": TRAIN_CODE}.get(top, EVALUATE_CODE)


def key(command: list[str], packages: tuple[str, ...], digests: dict[str, str] | None = None) -> dict:
    """What decides the result of running `command` with the code of `packages` (see the module doc)."""
    return {"code": code_digest(packages), "inputs": content_command(command, digests)}


def set_aside(folder: pathlib.Path) -> pathlib.Path:
    """Move `folder` to `.superseded/` beside it, under its name and the first free number; returns where it went."""
    aside = folder.parent / ".superseded" / f"{folder.name}-1"
    while aside.exists():
        aside = aside.with_name(f"{folder.name}-{int(aside.name.rsplit('-', 1)[1]) + 1}")
    aside.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(aside)
    return aside


def recorded_key(folder: pathlib.Path) -> dict | None:
    path = folder / KEY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def claim(folder: pathlib.Path, run_key: dict) -> pathlib.Path | None:
    """Make `folder` hold only work of `run_key`: a folder of another key (or of none, from older code) is set aside
    (returned), so what runs there starts afresh; one of the same key is kept (a killed run continues); then the
    key is recorded."""
    aside = None
    if folder.exists() and any(folder.iterdir()) and recorded_key(folder) != run_key:
        aside = set_aside(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(folder / KEY_FILE, json.dumps(run_key, indent=1).encode())
    return aside
