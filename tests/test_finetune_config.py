"""`--help` from the entry script's own comments, "did you mean" for a mistyped setting, None defaults typed by
their annotation, and the in-file values checked as overrides are; on small settings scripts written for the test,
and on finetune/train.py (a copy of it edited as a user would, run as the real script)."""
import argparse
import os
import pathlib
import re
import runpy
import subprocess
import sys

import pytest

from evaluate import encoder_input
from finetune.config import (ConfigError, SettingSource, apply_overrides, check_in_file_settings, read_script,
                             settings_in)
from pretrain.data.patches import INPUT_OPTIONS
from pretrain.utils import arg_util
from tests.conftest import REPO_ROOT

SCRIPT = '''"""A tiny entry script.

    python tiny.py --NUM_EPOCHS 2
"""
import pathlib

# ------------------------------------------------------------
# experiment
exp_name = "tiny"  # experiment folder; the same name resumes
colour = "#fff"
# model: None takes the checkpoint's own
MODEL: str | None = None  # encoder; else "resnet18"
DEPTH: int | None = None  # layers per tile; else 16
# An epoch repeats the tiles until it holds
# at least this many.
MIN_TILES_PER_EPOCH = 512
# optimisation
NUM_EPOCHS = 20  # passes over the tiles
WARMUP_EPOCHS = 1
LR = 1e-3  # peak learning rate
# ------------------------------------------------------------
DEFAULTS = {}
'''


@pytest.fixture
def script(tmp_path):
    """(path, defaults) of the tiny script, its defaults collected as an entry script collects them."""
    path = tmp_path / "tiny.py"
    path.write_text(SCRIPT)
    namespace = runpy.run_path(str(path))
    return path, settings_in({name: namespace[name] for name in namespace if name != "DEFAULTS"})


def test_the_source_gives_each_setting_its_comment_heading_and_type(script):
    path, defaults = script
    docstring, sources = read_script(path, defaults)
    assert docstring.startswith("A tiny entry script.")
    assert sources == {
        "exp_name": SettingSource("experiment", "experiment folder; the same name resumes", line=9),
        "colour": SettingSource(line=10),  # the '#' in its string is no comment
        "MODEL": SettingSource("model: None takes the checkpoint's own", 'encoder; else "resnet18"', "str | None", str,
                               True, 12),
        "DEPTH": SettingSource("", "layers per tile; else 16", "int | None", int, True, 13),
        "MIN_TILES_PER_EPOCH": SettingSource("", "An epoch repeats the tiles until it holds at least this many.",
                                             line=16),
        "NUM_EPOCHS": SettingSource("optimisation", "passes over the tiles", line=18),
        "WARMUP_EPOCHS": SettingSource(line=19),
        "LR": SettingSource("", "peak learning rate", line=20),
    }


@pytest.mark.parametrize("help_argument", ["--help", "-h"])
def test_help_prints_every_setting_with_its_default_and_comment_then_exits_0(script, capsys, help_argument):
    path, defaults = script
    with pytest.raises(SystemExit) as stop:
        apply_overrides(defaults, ["--NUM_EPOCHS", "2", help_argument], source_file=path)
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: tiny.py [--NAME VALUE | --NAME=VALUE]..."
    assert "A tiny entry script." in lines and "    python tiny.py --NUM_EPOCHS 2" in lines
    settings = lines[lines.index("experiment"):]
    assert settings == [
        "experiment",
        "  --exp_name=tiny",
        "      experiment folder; the same name resumes",
        "  --colour='#fff'",
        "",
        "model: None takes the checkpoint's own",
        "  --MODEL=None  (str | None)",
        '      encoder; else "resnet18"',
        "  --DEPTH=None  (int | None)",
        "      layers per tile; else 16",
        "  --MIN_TILES_PER_EPOCH=512",
        "      An epoch repeats the tiles until it holds at least this many.",
        "",
        "optimisation",
        "  --NUM_EPOCHS=20",
        "      passes over the tiles",
        "  --WARMUP_EPOCHS=1",
        "  --LR=0.001",
        "      peak learning rate",
    ]


@pytest.mark.parametrize("argv, message", [
    (["--EPOCHS", "2"], r"^unknown setting --EPOCHS; did you mean --NUM_EPOCHS or --WARMUP_EPOCHS\? \(--help lists every setting\)$"),
    (["--lr", "1"], r"^unknown setting --lr; did you mean --LR\?"),
    (["--min_tiles_per_epoc=3"], r"^unknown setting --min_tiles_per_epoc; did you mean --MIN_TILES_PER_EPOCH\?"),
    (["--batch", "8"], r"^unknown setting --batch \(--help lists every setting\)$"),
])
def test_an_unknown_setting_suggests_the_closest_names_not_all_of_them(script, argv, message):
    path, defaults = script
    with pytest.raises(ConfigError, match=message):
        apply_overrides(defaults, argv, source_file=path)


def test_a_none_default_takes_the_type_of_its_annotation(script):
    path, defaults = script
    config = apply_overrides(defaults, ["--DEPTH", "8", "--MODEL", "resnet18"], source_file=path)
    assert config.DEPTH == 8 and type(config.DEPTH) is int and config.MODEL == "resnet18"
    assert apply_overrides(defaults, ["--DEPTH", "None"], source_file=path).DEPTH is None
    with pytest.raises(ConfigError, match=r"--DEPTH expects int or None \(default None\), got 'eight'"):
        apply_overrides(defaults, ["--DEPTH", "eight"], source_file=path)


def test_train_help_lists_every_setting_and_exits_0():
    """Needs train.py to pass its own file: `apply_overrides(DEFAULTS, argv, source_file=__file__)`."""
    from finetune import train

    result = subprocess.run([sys.executable, "finetune/train.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "usage: train.py [--NAME VALUE | --NAME=VALUE]..."
    assert len(train.DEFAULTS) > 30
    for name, value in train.DEFAULTS.items():
        assert any(line.startswith(f"  --{name}={value}") for line in lines), name
    number_of_epochs = next(index for index, line in enumerate(lines) if line.startswith("  --NUM_EPOCHS="))
    assert lines[number_of_epochs + 1] == "      passes over the training tiles"
    assert any(line.startswith("model and input: None takes the pretrained encoder's own") for line in lines)
    for option in INPUT_OPTIONS.values():  # what each input setting means, in the words every script uses
        shown = next(index for index, line in enumerate(lines) if line.startswith(f"  --{option.finetune_name}="))
        assert " ".join(" ".join(lines[shown + 1:shown + 3]).split()).startswith(" ".join(option.help.split()))


def test_pretraining_and_evaluate_help_say_what_each_input_setting_means_in_the_same_words():
    evaluate = argparse.ArgumentParser()
    encoder_input.add_input_arguments(evaluate)
    for parser in (arg_util.Args(explicit_bool=True), evaluate):
        helps = {action.dest: action.help for action in parser._actions}
        for field, option in INPUT_OPTIONS.items():
            assert option.help in helps[field], (type(parser).__name__, field)


READING_SCRIPT = '''"""Settings read by the code below them."""
name: str = "tiny"  # experiment folder
MODEL: str | None = None  # encoder; None: the checkpoint's
NUM_EPOCHS: int = 20  # passes over the tiles
WARMUP_EPOCHS: int = 1
LR: float = 1e-3
INPUT_NAMES = {"model": "MODEL"}  # a setting read by its name, as train.py reads the input settings


def run(config):
    return config.name, getattr(config, INPUT_NAMES["model"]), range(config.WARMUP_EPOCHS, config.NUM_EPOCHS), config.LR
'''


def check_edited(tmp_path, old: str, new: str) -> None:
    """check_in_file_settings on READING_SCRIPT with `old` replaced by `new`, as a user edits the file."""
    path = tmp_path / "reading.py"
    assert READING_SCRIPT.count(old) == 1
    path.write_text(READING_SCRIPT.replace(old, new))
    namespace = runpy.run_path(str(path))
    check_in_file_settings(settings_in({name: namespace[name] for name in namespace if name != "INPUT_NAMES"}), path)


@pytest.mark.parametrize("old, new", [
    ("LR: float = 1e-3", "LR: float = 1e-3"),
    ("LR: float = 1e-3", "LR: float = 1"),  # an int is a float, as on the command line
    ("MODEL: str | None = None", 'MODEL: str | None = "resnet18_3d"'),
], ids=["as-written", "int-for-float", "none-default-set"])
def test_in_file_settings_the_script_reads_with_values_of_their_type_pass(tmp_path, old, new):
    check_edited(tmp_path, old, new)


@pytest.mark.parametrize("old, new, message", [
    # A new line with a typo: it would silently be a new setting, and the run would train 20 epochs.
    ("WARMUP_EPOCHS: int = 1\n", "WARMUP_EPOCHS: int = 1\nNUM_EPOCH = 2\n",
     r"^reading\.py line 6: unknown setting NUM_EPOCH; did you mean NUM_EPOCHS or WARMUP_EPOCHS\? "
     r"\(reading\.py reads no setting of that name\)$"),
    # The setting's own line renamed by the typo: the script's read of NUM_EPOCHS would fail much later.
    ("NUM_EPOCHS: int = 20", "NUM_EPOCH: int = 2",
     r"^reading\.py line 4: unknown setting NUM_EPOCH; did you mean NUM_EPOCHS or WARMUP_EPOCHS\?"),
    ("NUM_EPOCHS: int = 20", 'NUM_EPOCHS: int = "2"', r"^reading\.py line 4: NUM_EPOCHS expects int, got '2'$"),
    ("NUM_EPOCHS: int = 20", "NUM_EPOCHS: int = True", r"^reading\.py line 4: NUM_EPOCHS expects int, got True$"),
    ("MODEL: str | None = None", "MODEL: str | None = 50", r"^reading\.py line 3: MODEL expects str or None, got 50$"),
    ("LR: float = 1e-3", "LR: float = None", r"^reading\.py line 6: LR expects float, got None$"),
    # The issue's `NUM_EPOCHS = "2"`, the line rewritten without its type: nothing says the value should be an int.
    ("NUM_EPOCHS: int = 20", 'NUM_EPOCHS = "2"',
     r"^reading\.py line 4: setting NUM_EPOCHS = '2' has no type annotation, so its value cannot be checked; "
     r"write it as NUM_EPOCHS: <type> = \.\.\., as every setting is written$"),
    # Renamed to a name nothing resembles: the setting the script reads is reported missing.
    ("LR: float = 1e-3", "learning_speed: float = 1e-3",
     r"^reading\.py line 6: unknown setting learning_speed \(reading\.py reads no setting of that name\); "
     r"setting LR is missing from the top of reading\.py, which reads it$"),
], ids=["typo-new-line", "typo-renamed", "str-for-int", "bool-for-int", "int-for-str", "none-for-float",
        "no-annotation", "missing"])
def test_an_in_file_setting_an_override_would_refuse_is_one_error_naming_it(tmp_path, old, new, message):
    with pytest.raises(ConfigError, match=message):
        check_edited(tmp_path, old, new)


def test_an_annotation_types_overrides_of_a_setting_whose_default_is_not_none(tmp_path):
    path = tmp_path / "reading.py"
    path.write_text(READING_SCRIPT.replace("LR: float = 1e-3", "LR: float = 1"))
    namespace = runpy.run_path(str(path))
    defaults = settings_in({name: namespace[name] for name in namespace if name != "INPUT_NAMES"})
    config = apply_overrides(defaults, ["--LR", "0.5"], source_file=path)
    assert config.LR == 0.5 and type(config.LR) is float


def test_the_shipped_train_py_passes_its_own_check():
    from finetune import train

    check_in_file_settings(train.DEFAULTS, train.__file__, read_elsewhere=tuple(train.FINETUNE_NAMES.values()))


def edited_train_script(tmp_path, num_epochs_line: str) -> tuple[pathlib.Path, str]:
    """A copy of finetune/train.py under tmp_path/finetune/ whose `NUM_EPOCHS: int = 20` line reads `num_epochs_line`
    instead (the rest of that line, its comment, stays): (the copy, its text)."""
    source = (REPO_ROOT / "finetune" / "train.py").read_text()
    edited, count = re.subn(r"^NUM_EPOCHS: int = 20 ", num_epochs_line + " ", source, flags=re.M)
    assert count == 1
    copy = tmp_path / "finetune" / "train.py"
    copy.parent.mkdir()
    copy.write_text(edited)
    return copy, edited


def test_a_typo_in_train_py_itself_is_one_error_line_before_anything_runs(tmp_path):
    """A copy of finetune/train.py with the typo of the issue, run as the real script (its imports from the repo)."""
    copy, edited = edited_train_script(tmp_path, "NUM_EPOCHS: int = 20\nNUM_EPOCH = 2")
    result = subprocess.run([sys.executable, str(copy), "--OUTPUT_DIR", str(tmp_path / "runs")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 2, result.stderr[-3000:]
    typo_line = next(number for number, line in enumerate(edited.splitlines(), 1) if line.startswith("NUM_EPOCH = 2"))
    assert result.stderr.splitlines() == [
        f"error: train.py line {typo_line}: unknown setting NUM_EPOCH; did you mean NUM_EPOCHS or WARMUP_EPOCHS? "
        "(train.py reads no setting of that name)"]
    assert not (tmp_path / "runs").exists()


LIST_SCRIPT = '''"""Settings that take one value or several."""
segment_id: str | list[str] = "demo"  # one segment spec or several
inklabel_path: str | list[str] | None = None  # one label file per segment
NUM_EPOCHS: int = 20


def run(config):
    return config.segment_id, config.inklabel_path, config.NUM_EPOCHS
'''


@pytest.fixture
def list_script(tmp_path):
    path = tmp_path / "lists.py"
    path.write_text(LIST_SCRIPT)
    namespace = runpy.run_path(str(path))
    return path, settings_in({name: namespace[name] for name in namespace})


@pytest.mark.parametrize("argv, segment_id, inklabel_path, epochs", [
    (["--segment_id", "A"], "A", None, 20),  # one value stays a plain value, as before
    (["--segment_id", "A", "B", "--NUM_EPOCHS", "2"], ["A", "B"], None, 2),
    (["--segment_id=A", "B", "--inklabel_path", "a.png", "None"], ["A", "B"], ["a.png", None], 20),
    (["--inklabel_path", "None"], "demo", None, 20),
    (["--NUM_EPOCHS", "3", "--segment_id", "20230827161847", "scroll4:1"], ["20230827161847", "scroll4:1"], None, 3),
])
def test_a_list_setting_takes_every_value_up_to_the_next_setting(list_script, argv, segment_id, inklabel_path, epochs):
    path, defaults = list_script
    config = apply_overrides(defaults, argv, source_file=path)
    assert (config.segment_id, config.inklabel_path, config.NUM_EPOCHS) == (segment_id, inklabel_path, epochs)


def test_list_settings_are_read_typed_shown_and_checked(list_script, tmp_path, capsys):
    path, defaults = list_script
    sources = read_script(path, defaults)[1]
    assert (sources["segment_id"].value_type, sources["segment_id"].allows_list, sources["segment_id"].allows_none) \
        == (str, True, False)
    assert (sources["inklabel_path"].allows_list, sources["inklabel_path"].allows_none) == (True, True)
    assert not sources["NUM_EPOCHS"].allows_list
    with pytest.raises(ConfigError, match="--segment_id needs a value"):
        apply_overrides(defaults, ["--segment_id", "--NUM_EPOCHS", "2"], source_file=path)
    with pytest.raises(ConfigError, match="unexpected argument '3'"):  # only list settings take several values
        apply_overrides(defaults, ["--NUM_EPOCHS", "2", "3"], source_file=path)
    with pytest.raises(SystemExit):
        apply_overrides(defaults, ["--help"], source_file=path)
    assert "  --segment_id=demo  (str | list[str])" in capsys.readouterr().out.splitlines()
    # In the file, a list is written as a list; anything else in one is refused by name.
    edited = tmp_path / "edited.py"
    edited.write_text(LIST_SCRIPT.replace('= "demo"', '= ["demo:1", "demo:2"]'))
    namespace = runpy.run_path(str(edited))
    check_in_file_settings(settings_in(namespace), edited)
    edited.write_text(LIST_SCRIPT.replace('= "demo"', '= ["demo:1", 2]'))
    with pytest.raises(ConfigError, match=r"line 2: segment_id expects str or a list of str, got \['demo:1', 2\]$"):
        check_in_file_settings(settings_in(runpy.run_path(str(edited))), edited)
