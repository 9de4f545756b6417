"""`--help` from the entry script's own comments, "did you mean" for a mistyped setting, and None defaults
typed by their annotation; on a small settings script written for the test, and on finetune/train.py."""
import runpy
import subprocess
import sys

import pytest

from finetune.config import ConfigError, SettingSource, apply_overrides, read_script, settings_in
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
        "exp_name": SettingSource("experiment", "experiment folder; the same name resumes"),
        "colour": SettingSource(),  # the '#' in its string is no comment
        "MODEL": SettingSource("model: None takes the checkpoint's own", 'encoder; else "resnet18"', "str | None", str),
        "DEPTH": SettingSource("", "layers per tile; else 16", "int | None", int),
        "MIN_TILES_PER_EPOCH": SettingSource("", "An epoch repeats the tiles until it holds at least this many."),
        "NUM_EPOCHS": SettingSource("optimisation", "passes over the tiles"),
        "WARMUP_EPOCHS": SettingSource(),
        "LR": SettingSource("", "peak learning rate"),
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
