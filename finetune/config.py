"""Settings as plain module variables, overridable from the command line (`--NUM_EPOCHS 2`).

The entry script keeps its settings as commented variables at the top (nanoGPT's habit). This module
collects them and applies `--NAME value` / `--NAME=value` overrides without `exec`: each value is
checked against the type of its default, so a typo or a word where a number belongs is one clear
error instead of a crash an hour later. An int is accepted where the default is a float (`--LR 1`).
"""
import ast
import types

SETTING_TYPES = (bool, int, float, str, type(None))


class ConfigError(ValueError):
    """An override that cannot be applied; the message names the setting."""


class Config(types.SimpleNamespace):
    """The settings of one run, read as attributes (`config.BATCH_SIZE`)."""

    def as_dict(self) -> dict:
        return dict(vars(self))


def settings_in(namespace: dict) -> dict:
    """The plain-valued, public names of a module namespace (its settings), in definition order."""
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and type(value) in SETTING_TYPES}


def _convert(name: str, text: str, default):
    """`text` as the type of `default`; None defaults take any text, and 'None' restores None."""
    if isinstance(default, str):
        return text  # a segment ID such as 20230827161847 stays text, not a number
    if default is None:
        return None if text == "None" else text
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{name} expects True or False, got {text!r}")
        return lowered in ("true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(default, float) and type(value) in (int, float):
        return float(value)
    if isinstance(default, int) and type(value) is int:
        return value
    raise ConfigError(f"--{name} expects {type(default).__name__} (default {default!r}), got {text!r}")


def apply_overrides(defaults: dict, argv: list[str]) -> Config:
    """`defaults` with the `--NAME value` pairs of `argv` applied."""
    values = dict(defaults)
    index = 0
    while index < len(argv):
        argument = argv[index]
        if not argument.startswith("--") or argument == "--":
            raise ConfigError(f"unexpected argument {argument!r}: overrides look like --NAME value")
        name, has_value, text = argument[2:].partition("=")
        if name not in defaults:
            raise ConfigError(f"unknown setting --{name}; settings: {', '.join(defaults)}")
        if not has_value:
            if index + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            index += 1
            text = argv[index]
        values[name] = _convert(name, text, defaults[name])
        index += 1
    return Config(**values)
