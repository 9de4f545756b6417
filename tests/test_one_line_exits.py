"""Every way a run stops is one line and a non-zero status (pretrain/utils/errors.py), every numeric setting has a
declared range (pretrain/utils/ranges.py), and a failed write leaves nothing a later run would trust.

The entry scripts are run as a user runs them where that is what is tested (an in-file mistake, a folder that cannot
be written, an option out of range); the rest is checked in-process, where one import serves many cases."""
import contextlib
import errno
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from finetune import outputs, predict, train
from finetune.config import ConfigError, apply_overrides, check_in_file_settings, settings_help
from pretrain.data import remote, segment
from pretrain.data.segment import SegmentError, open_segment
from pretrain.data.volume import UndecodableChunkError
from pretrain.dist import CPU_THREADS_HELP
from pretrain.utils import arg_util, errors, misc, ranges
from tests.conftest import REPO_ROOT
from tests.test_cache_integrity import small_tmpfs
from tests.test_finetune_config import edited_train_script
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

ENVIRONMENT = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def run(command: list[str], cwd: pathlib.Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=ENVIRONMENT)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------- through the entry scripts

def test_a_word_typed_as_an_in_file_setting_is_one_line_naming_file_and_line(tmp_path):
    """`NUM_EPOCHS: int = twenty` stops train.py while its settings are read (a NameError, before main())."""
    copy, edited = edited_train_script(tmp_path, "NUM_EPOCHS: int = twenty")
    result = run([sys.executable, str(copy), "--OUTPUT_DIR", str(tmp_path / "runs")], cwd=tmp_path)
    line_number = next(number for number, line in enumerate(edited.splitlines(), 1) if "= twenty" in line)
    assert result.returncode == 2
    assert error_lines(result) == result.stderr.splitlines() == [
        f"error: train.py line {line_number}: NUM_EPOCHS: int = twenty: NameError: name 'twenty' is not defined; "
        "a text value needs quotes (\"twenty\"), a number digits"]
    assert not (tmp_path / "runs").exists()


def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run([sys.executable, str(REPO_ROOT / "finetune" / "predict.py"), "--checkpoint", str(tmp_path / "x.pth"),
                  "--segment_id", "demo", "--output_dir", str(blocker / "predictions")])
    assert result.returncode == 2
    assert error_lines(result) == [f"error: --output_dir {blocker / 'predictions'} cannot be made: {blocker} is a file, "
                                   "not a folder"]
    assert blocker.read_text() == "not a folder"


def test_a_pretraining_setting_out_of_range_is_one_line(tmp_path):
    result = run([sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), "--stop_after_ep", "-1", "--base_lr", "-1",
                  "--exp_dir", str(tmp_path / "run")])
    assert result.returncode == 2
    assert error_lines(result) == ["error: stop_after_ep -1 is out of range: it must be ≥ 0; "
                                   "base_lr -1.0 is out of range: it must be > 0"]
    assert not (tmp_path / "run").exists()


def test_a_bug_is_one_line_naming_the_run_and_the_file_holding_its_traceback(tmp_path):
    """The exit every entry script installs, in a process that meets a bug: first without a run folder (a temp
    file takes the traceback), then with one."""
    for folder in (None, tmp_path / "run"):
        if folder is not None:
            folder.mkdir()
        script = ("from pretrain.utils import errors\n"
                  "errors.install('finetune/train.py')\n"
                  + (f"errors.name_run('demo_run', {str(folder)!r})\n" if folder else "")
                  + "{}['missing']\n")
        result = run([sys.executable, "-c", script], cwd=tmp_path)
        assert result.returncode == errors.BUG_STATUS
        [line] = result.stderr.splitlines()
        run_name = "finetune/train.py run demo_run" if folder else "finetune/train.py"
        match = re.fullmatch(rf"error: unexpected KeyError in {re.escape(run_name)} \(a bug, please report it\): "
                             r"'missing'; the full traceback is in (\S+)", line)
        assert match, line
        written = pathlib.Path(match.group(1))
        assert written.parent == (folder or pathlib.Path(tempfile.gettempdir()))
        assert "Traceback (most recent call last)" in written.read_text() and "KeyError: 'missing'" in written.read_text()
        written.unlink()


# ---------------------------------------------------------------- ranges, declared once and checked by the parser

@pytest.mark.parametrize("override, message", [
    (["--LR", "-0.01"], "--LR -0.01 is out of range: it must be > 0"),
    (["--NUM_WORKERS", "-1"], "--NUM_WORKERS -1 is out of range: it must be ≥ 0"),
    (["--STOP_AFTER_EPOCHS", "-1"], "--STOP_AFTER_EPOCHS -1 is out of range: it must be ≥ 0"),
    (["--LABEL_SMOOTHING", "3"], "--LABEL_SMOOTHING 3.0 is out of range: it must be ≥ 0 and < 1"),
    (["--VALIDATION_FRACTION", "0.2", "1.5"], "--VALIDATION_FRACTION 0.2 1.5 is out of range: it must be ≥ 0 and < 1 "
                                              "(each value)"),
])
def test_a_fine_tuning_setting_out_of_range_is_refused_where_it_is_parsed(override, message):
    with pytest.raises(ConfigError) as raised:
        apply_overrides(train.DEFAULTS, override, source_file=train.__file__, setting_ranges=train.SETTING_RANGES)
    assert str(raised.value) == message


def test_every_numeric_setting_has_a_range(tmp_path):
    """A setting added later without one is caught here; the ones listed take any value by design."""
    def numeric(value) -> bool:
        values = value if isinstance(value, list) else [value]
        return all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in values)

    unranged_fine_tuning = {"OUTPUT_STRIDE"}  # a choice among OUTPUT_STRIDES, checked as one
    numeric_fine_tuning = {name for name, value in train.DEFAULTS.items() if value is not None and numeric(value)}
    numeric_fine_tuning |= {"DEPTH", "DEPTH_OFFSET", "TILE_SIZE"}  # None by default: the checkpoint's own
    assert set(train.SETTING_RANGES) <= set(train.DEFAULTS)
    assert numeric_fine_tuning - set(train.SETTING_RANGES) == unranged_fine_tuning | {"DEPTH_OFFSET"}
    unranged_pretraining = {"depth_offset", "float_range"} | set(arg_util.RUNTIME_FIELDS)  # any offset; LOW < HIGH
    numeric_pretraining = {name for name in arg_util.Args.__annotations__
                           if numeric(getattr(arg_util.Args, name)) and getattr(arg_util.Args, name) != []}
    assert set(arg_util.SETTING_RANGES) <= set(arg_util.Args.__annotations__)
    assert numeric_pretraining - set(arg_util.SETTING_RANGES) <= unranged_pretraining
    # Bounds that are wrong for their setting would show here: the defaults must be in range.
    assert not [name for name, allowed in arg_util.SETTING_RANGES.items()
                if ranges.problem(name, getattr(arg_util.Args, name), allowed)]


def test_a_value_typed_into_arg_util_is_reported_with_its_file_and_line(monkeypatch):
    monkeypatch.setattr(arg_util.Args, "ep", "five")
    monkeypatch.setattr(arg_util.Args, "bs", 0)
    lines = pathlib.Path(arg_util.__file__).read_text().splitlines()
    ep_line = next(number for number, line in enumerate(lines, 1) if line.startswith("    ep: int ="))
    bs_line = next(number for number, line in enumerate(lines, 1) if line.startswith("    bs: int ="))
    with pytest.raises(arg_util.ArgumentError) as raised:
        arg_util.parse_args([])
    assert str(raised.value) == (f"arg_util.py line {ep_line}: ep expects int, got 'five'; "
                                 f"arg_util.py line {bs_line}: bs 0 is out of range: it must be ≥ 1")


SCRIPT = """NUM_EPOCHS: int = {epochs}  # passes
LR: float = {lr}


def run(config):
    return config.NUM_EPOCHS, config.LR
"""


def test_an_in_file_setting_with_a_trailing_comma_or_out_of_range_is_named_with_its_line(tmp_path):
    """Not "setting NUM_EPOCHS is missing", as a trailing comma (a tuple, which is no setting) used to be told."""
    script = tmp_path / "tiny.py"
    script.write_text(SCRIPT.format(epochs="20,", lr="1e-3"))
    with pytest.raises(ConfigError) as raised:
        check_in_file_settings({"LR": 1e-3}, script)
    assert str(raised.value) == "tiny.py line 1: NUM_EPOCHS expects int, got 20, (a trailing comma makes a tuple: remove it)"
    script.write_text(SCRIPT.format(epochs="20", lr="-0.5"))
    with pytest.raises(ConfigError) as raised:
        check_in_file_settings({"NUM_EPOCHS": 20, "LR": -0.5}, script, setting_ranges=train.SETTING_RANGES)
    assert str(raised.value) == "tiny.py line 2: LR -0.5 is out of range: it must be > 0"


def test_options_out_of_range_are_argparses_one_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        predict.parse_arguments(["--checkpoint", "x.pth", "--segment_id", "demo", "--output_dir", "out",
                                 "--num_workers", "-1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --num_workers: -1 is out of range: it must be ≥ 0 (see --help)"]


def test_pretrain_help_describes_its_settings_and_cpu_threads_means_one_thing_everywhere():
    help_text = " ".join(arg_util.Args(explicit_bool=True).format_help().split())
    for method in ("spark", "vicreg"):
        assert f"{method} (pretrain.{method})" in help_text
    for option, words in (("--base_lr", "peak learning rate per 256 samples"), ("--seed", "the model's initial weights"),
                          ("--dist_timeout_minutes", "torchrun: a rank that waits this long"),
                          ("--cpu_threads", "torch threads per process on the CPU; 0: automatic")):
        assert re.search(rf"{option} \S+ \(\w+, default=[^)]*\) {words}", help_text), option
    assert CPU_THREADS_HELP in help_text
    fine_tuning_help = " ".join(settings_help(train.DEFAULTS, train.__file__).split())
    assert re.search(r"--CPU_THREADS=1 torch threads per process on the CPU; 0: automatic, the cores this process may use "
                     r"less one per DataLoader worker", fine_tuning_help)
    predict_help = " ".join(predict_parser_help().split())
    assert f"--cpu_threads CPU_THREADS {CPU_THREADS_HELP}" in predict_help


def predict_parser_help() -> str:
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as printed:
        predict.parse_arguments(["--help"])
    return printed.getvalue()


# ---------------------------------------------------------------- what the machine refuses, and damaged data

@pytest.fixture
def full_folder(tmp_path):
    """A 64 KiB tmpfs (skipped where mounting one is not permitted)."""
    with small_tmpfs(tmp_path / "full", "64k") as folder:
        yield folder


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_part_of_it(full_folder):
    log = misc.JsonLinesLog(full_folder / "log.jsonl")
    log.write(event="start")
    (full_folder / "filler").write_bytes(b"0" * (64 * 1024 - 4096 - (full_folder / "log.jsonl").stat().st_size))
    with pytest.raises(errors.WriteError, match=rf"^{full_folder / 'log.jsonl'} could not be written: No space left"):
        log.write(event="epoch", notes="x" * 8192)
    # No half line: a later run appends its records to whole ones.
    assert [json.loads(line)["event"] for line in (full_folder / "log.jsonl").read_text().splitlines()] == ["start"]
    for path in full_folder.iterdir():
        path.unlink()

    with pytest.raises(errors.WriteError, match=rf"^{full_folder / 'prediction.png'} could not be written: No space left"):
        outputs.write_png_atomic(full_folder / "prediction.png", np.random.default_rng(0).integers(0, 255, (512, 512),
                                                                                                 dtype=np.uint8))
    with pytest.raises(errors.WriteError) as raised:
        misc.save_atomic({"model": torch.zeros(64, 1024)}, full_folder / "best.pth")  # 256 KiB
    assert re.fullmatch(rf"{full_folder / 'best.pth'} could not be written: .*; 0\.\d MiB free in {full_folder}",
                        str(raised.value)), str(raised.value)
    assert list(full_folder.iterdir()) == []  # no checkpoint, no PNG, no temp file


def test_a_demo_that_cannot_be_built_is_one_line_and_its_half_build_is_swept(tmp_path, monkeypatch):
    """A full cache simulated in-process: the build fails as zarr does on a full disk, leaving files behind."""
    def fail_half_way(directory, seed):
        (directory / "0").mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pretrain.data.demo.build_demo_segment", fail_half_way)
    monkeypatch.setattr(segment.shutil, "rmtree", lambda path, ignore_errors=False: None)  # writes still landing
    with pytest.raises(SegmentError, match=r"^the demo segment demo:5 could not be built in .*/demo: No space left on "
                                           r"device \(\d+\.\d MiB free there; SEGMENT_CACHE_DIR moves the cache\)$"):
        open_segment("demo:5", cache_dir=tmp_path)
    [left] = (tmp_path / "demo").glob(".building-*")
    monkeypatch.undo()
    monkeypatch.setattr(segment, "_process_alive", lambda process_id: False)  # the failed run has ended
    monkeypatch.setattr("pretrain.data.demo.build_demo_segment", fail_half_way)
    with pytest.raises(SegmentError):
        open_segment("demo:5", cache_dir=tmp_path)
    assert not left.exists() and not segment.demo_cache_path(5, tmp_path).exists()


def test_a_truncated_chunk_of_a_local_zarr_is_one_line_naming_it(tmp_path):
    path = write_zarr_segment(tmp_path / "seg.zarr", random_volume((16, 64, 128), seed=4), chunks=(16, 64, 64))
    write_png(path / "mask.png", rectangle_mask((64, 128), margin=2))
    chunk = path / "0" / "c" / "0" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:40])
    volume = open_segment(str(path)).volume
    assert volume[0:16, 0:8, 0:8].shape == (16, 8, 8)  # the whole chunk beside it still reads
    with pytest.raises(UndecodableChunkError) as raised:
        volume[0:16, 0:8, 0:128]
    assert str(raised.value).startswith(f"file://{path}/0/c/0/0/1: chunk (0, 0, 1) cannot be decoded (")
    assert str(raised.value).endswith("the file is truncated or damaged; copy or download the segment again")


def test_a_data_url_with_an_unbalanced_bracket_is_one_line_without_the_url():
    with pytest.raises(remote.RemoteSettingError) as raised:
        remote.split_credentials("https://reader:se[cret@dl.example.org/full-scrolls")
    assert "se[cret" not in str(raised.value) and "'[' or ']' that is not around an IPv6 address" in str(raised.value)
