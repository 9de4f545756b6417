"""The one error exit of every entry script: how a run ends when something goes wrong.

    if __name__ == "__main__":
        errors.install(__file__)       # first, before any setting is read
    ...
    errors.name_run("finetune_demo", experiment_dir)   # once the run has a name and a folder

Then every way a run can stop is one line on stderr and a non-zero exit status:
- a mistake of the user's (a setting, a segment, a checkpoint: every `OneLineError`): `error: ...`, status 2;
- the machine refusing a write or a read (a full disk, a read-only folder, a file where a folder belongs): one
  `error:` line naming the file and the reason, status 2;
- a mistake typed into a settings file (`NUM_EPOCHS: int = twenty` in finetune/train.py or pretrain/utils/arg_util.py):
  one line naming the file and line, status 2;
- under torchrun, a rank that stopped answering: one line naming it, status 3; Ctrl-C: one line, status 130;
- anything else is a bug: one line naming the run and the file that holds the full traceback (in the run's folder,
  or a temp file while it has none), status 1.
A thread's error (TensorBoard's writer meeting a full disk) is judged the same way and printed once.
"""
import argparse
import errno
import inspect
import linecache
import os
import pathlib
import sys
import tempfile
import threading
import time
import traceback
import warnings


class OneLineError(Exception):
    """An error whose message is all its reader needs (it names the setting, file or segment at fault): the entry
    scripts print it as one `error:` line, without a traceback, and exit with `exit_status`."""

    exit_status = 2


class WriteError(OneLineError, OSError):
    """A file the run could not write (a full disk, a read-only or missing folder); the message names it."""


# Conditions of the machine or of what the user pointed at, not of the code: one line naming the file is enough.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EEXIST, errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG}
INTERRUPTED_STATUS = 130  # a shell's status for Ctrl-C
STALLED_RANK_STATUS = 3
BUG_STATUS = 1

_run = {"script": "", "name": "", "folder": None, "settings_files": (), "reported_by_thread": False}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose complaint is one `error:` line (status 2) instead of the whole usage and then it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def error_line(error: BaseException) -> str:
    """The one line to show a user. An error raised in a DataLoader worker arrives wrapped, its message
    holding the worker's whole traceback; its last line is the original message."""
    message = str(error).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return message


def install(script_file: str, settings_files: tuple = ()) -> None:
    """Make this process end as the module docstring says. `settings_files`: files besides `script_file` whose
    top-level code holds the user's settings (pretrain/utils/arg_util.py): an error in that code is the user's."""
    script = pathlib.Path(script_file).resolve()
    _run.update(script=script, name=f"{script.parent.name}/{script.name}", folder=None,
                settings_files=tuple(str(pathlib.Path(path).resolve()) for path in (script, *settings_files)))
    # Warnings as one `warning: ...` line each, as a user should read them, without the source line that raised them.
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"
    sys.excepthook = _exit_on_error
    threading.excepthook = _report_thread_error


def name_run(name: str, folder: str | os.PathLike) -> None:
    """The run's name and folder, once they are known: a bug's line names the run, and its traceback goes there."""
    script = _run["script"]
    _run.update(name=f"{script.parent.name}/{script.name} run {name}" if script else f"run {name}",
                folder=pathlib.Path(folder))


def one_line(error: BaseException) -> tuple[int, str] | None:
    """(exit status, line) for an error a user should read as one line; None for a bug."""
    if isinstance(error, OneLineError):
        return error.exit_status, f"error: {error_line(error)}"
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_STATUS, "stopped: interrupted (Ctrl-C); run the same command again to continue"
    if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:
        # Writers that lose the file's name (zarr's, TensorBoard's) say only the reason.
        return 2, f"error: {error.filename}: {error.strerror}" if error.filename else f"error: {error.strerror or error}"
    if "pretrain.dist" in sys.modules:  # under torchrun: another rank stalled at a collective operation
        stalled = sys.modules["pretrain.dist"].stalled_rank_line(error)
        if stalled is not None:
            return STALLED_RANK_STATUS, f"error: {stalled}"
    setting = _settings_line(error)
    if setting is not None:
        return 2, f"error: {setting}"
    return None


def _settings_line(error: BaseException) -> str | None:
    """'FILE line N: TEXT: what is wrong' for an error raised by the top-level code of a settings file (a value
    typed as `twenty`), else None."""
    innermost = error.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    if innermost is None:
        return None
    code = innermost.tb_frame.f_code
    # Top-level code (a module's or a class's body, as arg_util.py's Args) runs unoptimised; a function's does not.
    if code.co_flags & inspect.CO_OPTIMIZED or str(pathlib.Path(code.co_filename).resolve()) not in _run["settings_files"]:
        return None
    line = linecache.getline(code.co_filename, innermost.tb_lineno).split("  #")[0].strip()
    hint = f"; a text value needs quotes (\"{error.name}\"), a number digits" if isinstance(error, NameError) else ""
    return f"{pathlib.Path(code.co_filename).name} line {innermost.tb_lineno}: {line}: {type(error).__name__}: {error}{hint}"


def _stderr():
    """The process's own stderr: a library may have swapped sys.stderr for a buffer by the time a run ends (one did
    under torchrun), and the line must reach the user."""
    return sys.__stderr__ or sys.stderr


def traceback_file(error: BaseException) -> pathlib.Path | None:
    """Write the full traceback into the run's folder where it has one and it takes the file, else into a temp file;
    its path, or None when neither could be written."""
    text = "".join(traceback.format_exception(error))
    stem = f"traceback_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
    folder = _run["folder"]
    if folder is not None and folder.is_dir():
        path = folder / f"{stem}.txt"
        try:
            path.write_text(text)
            return path
        except OSError:
            path.unlink(missing_ok=True)
    try:
        descriptor, name = tempfile.mkstemp(prefix=f"{_run['script'].stem if _run['script'] else 'run'}_{stem}_", suffix=".txt")
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        return pathlib.Path(name)
    except OSError:
        return None


def _exit_on_error(error_type, error, error_traceback) -> None:
    """sys.excepthook: the one line, then the exit status (a SystemExit raised here ends the process as sys.exit
    does, atexit handlers included)."""
    error.__traceback__ = error_traceback
    judged = one_line(error)
    if judged is not None:
        status, line = judged
        # A full disk met first by a writer thread (TensorBoard's) was its line already; the main thread then
        # meets it again, without the file's name.
        if not (_run["reported_by_thread"] and isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS):
            print(line, file=_stderr())
        raise SystemExit(status)
    print(bug_line(error), file=_stderr())
    raise SystemExit(BUG_STATUS)


def bug_line(error: BaseException) -> str:
    """The line of an unexpected error, once its traceback is in a file."""
    path = traceback_file(error)
    where = f"the full traceback is in {path}" if path is not None else "no file took its traceback:\n" + \
        "".join(traceback.format_exception(error)).rstrip()
    message = error_line(error).splitlines()[0] if str(error).strip() else "no message"
    return (f"error: unexpected {type(error).__name__} in {_run['name'] or 'this run'} (a bug, please report it): "
            f"{message}; {where}")


def _report_thread_error(hook_arguments) -> None:
    """threading.excepthook: a thread's error as the main thread's would be, one line (the thread ends; the main
    thread meets the consequence and exits)."""
    if hook_arguments.exc_type is SystemExit:
        return
    error = hook_arguments.exc_value
    judged = one_line(error)
    if judged is not None:
        _run["reported_by_thread"] = True
        print(judged[1], file=_stderr())
    else:
        print(bug_line(error), file=_stderr())
