"""Settings as plain module variables, overridable from the command line (`--NUM_EPOCHS 2`).

The entry script keeps its settings as commented variables at the top (nanoGPT's habit). This module
collects them and applies `--NAME value` / `--NAME=value` overrides without `exec`: each value is
checked against the type of its default, so a typo or a word where a number belongs is one clear
error instead of a crash an hour later. An int is accepted where the default is a float (`--LR 1`).

Given the entry script's file, it also reads the script's own words about each setting, so that `--help`
shows them: the comment on a setting's line, or else the comment lines just above it. Comment lines above
a setting that has its own line comment open a group of settings (`# optimisation`) and are shown as that
group's heading. A None default with an `int | None` (or `Optional[int]`) annotation takes that type.
"""
import ast
import dataclasses
import difflib
import io
import os
import pathlib
import re
import shlex
import textwrap
import tokenize
import types

SETTING_TYPES = (bool, int, float, str, type(None))
HELP_ARGUMENTS = ("--help", "-h")
ANNOTATION_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
RULE_COMMENT = re.compile(r"[-=#*~_ ]*")  # a comment line that only draws a separator
HELP_WIDTH = 100


class ConfigError(ValueError):
    """An override that cannot be applied; the message names the setting."""


class Config(types.SimpleNamespace):
    """The settings of one run, read as attributes (`config.BATCH_SIZE`)."""

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclasses.dataclass(frozen=True)
class SettingSource:
    """What the entry script's source says about one setting."""

    heading: str = ""  # the comment lines that open a group of settings here ('' when none does)
    description: str = ""  # the setting's line comment, or the comment lines just above it
    annotation: str = ""  # as written (`int | None`), '' when there is none
    value_type: type | None = None  # X of an `X | None` annotation, for a None default


def settings_in(namespace: dict) -> dict:
    """The plain-valued, public names of a module namespace (its settings), in definition order."""
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and type(value) in SETTING_TYPES}


def _optional_type(annotation: ast.expr | None) -> type | None:
    """X for an `X | None` or `Optional[X]` annotation with X one of bool, int, float, str; else None."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        members = [annotation.left, annotation.right]
    elif isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Optional", "typing.Optional"):
        members = [annotation.slice]
    else:
        return None
    named = [ast.unparse(member) for member in members
             if not (isinstance(member, ast.Constant) and member.value is None)]
    return ANNOTATION_TYPES.get(named[0]) if len(named) == 1 else None


def read_script(source_file: str | os.PathLike, names) -> tuple[str, dict[str, SettingSource]]:
    """The script's docstring and, for each of `names` assigned at its top level, what its source says."""
    source = pathlib.Path(source_file).read_text(encoding="utf-8")
    lines = source.splitlines()
    # tokenize, not a search for '#': a '#' inside a string ("#fff") is no comment.
    comments = {}  # line number -> (text, whether the comment is the whole line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            comments[row] = (token.string.lstrip("#").strip(), not lines[row - 1][:column].strip())
    module = ast.parse(source)
    sources = {}
    for statement in module.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)):
            name, annotation = statement.targets[0].id, None
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            name, annotation = statement.target.id, statement.annotation
        else:
            continue
        if name not in names:
            continue
        line_comment = " ".join(comments[row][0] for row in range(statement.lineno, statement.end_lineno + 1)
                                if row in comments and not comments[row][1])
        above, row = [], statement.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        above_text = " ".join(line for line in above if not RULE_COMMENT.fullmatch(line))
        heading, description = (above_text, line_comment) if line_comment else ("", above_text)
        sources[name] = SettingSource(heading, description, ast.unparse(annotation) if annotation else "",
                                      _optional_type(annotation))
    return (ast.get_docstring(module, clean=False) or "").strip(), sources


def _shown(value) -> str:
    """A default as it would be typed after `--NAME=`."""
    return shlex.quote(value) if isinstance(value, str) else str(value)


def settings_help(defaults: dict, source_file: str | os.PathLike | None = None) -> str:
    """Usage, the script's docstring, then every setting with its default and the script's comment on it."""
    docstring, sources = read_script(source_file, defaults) if source_file is not None else ("", {})
    script = pathlib.Path(source_file).name if source_file is not None else "the script"
    parts = [f"usage: {script} [--NAME VALUE | --NAME=VALUE]..."]
    if docstring:
        parts += ["", docstring]
    parts += ["", "settings, each with its default:"]
    for name, value in defaults.items():
        source = sources.get(name, SettingSource())
        if source.heading:
            parts += ["", textwrap.fill(source.heading, HELP_WIDTH, break_on_hyphens=False)]
        parts.append(f"  --{name}={_shown(value)}" + (f"  ({source.annotation})" if source.annotation else ""))
        if source.description:
            parts.append(textwrap.fill(source.description, HELP_WIDTH, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6, break_on_hyphens=False))
    return "\n".join(parts)


def unknown_setting_message(name: str, names) -> str:
    """'unknown setting --X', with the closest setting names, matched regardless of case."""
    by_lowercase = {}
    for known in names:
        by_lowercase.setdefault(known.lower(), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(by_lowercase), n=3, cutoff=0.6)
    suggestions = [f"--{known}" for match in close for known in by_lowercase[match]]
    message = f"unknown setting --{name}"
    if suggestions:
        listed = suggestions[0] if len(suggestions) == 1 else f"{', '.join(suggestions[:-1])} or {suggestions[-1]}"
        message += f"; did you mean {listed}?"
    return message + " (--help lists every setting)"


def _convert(name: str, text: str, default, value_type: type | None = None):
    """`text` as the type of `default` (or `value_type` for a None default); a None default takes 'None'
    as None, and any text when it has no type."""
    if default is None:
        if text == "None" or value_type is None:
            return None if text == "None" else text
        expected, or_none = value_type, " or None"
    else:
        expected, or_none = type(default), ""
    if expected is str:
        return text  # a segment ID such as 20230827161847 stays text, not a number
    if expected is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ConfigError(f"--{name} expects True or False{or_none}, got {text!r}")
        return lowered in ("true", "1")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if expected is float and type(value) in (int, float):
        return float(value)
    if expected is int and type(value) is int:
        return value
    raise ConfigError(f"--{name} expects {expected.__name__}{or_none} (default {default!r}), got {text!r}")


def apply_overrides(defaults: dict, argv: list[str], source_file: str | os.PathLike | None = None) -> Config:
    """`defaults` with the `--NAME value` pairs of `argv` applied. `source_file` is the entry script whose
    settings these are (`__file__`): `--help` / `-h` then prints them with its comments, and exits 0."""
    if any(argument in HELP_ARGUMENTS for argument in argv):
        print(settings_help(defaults, source_file))
        raise SystemExit(0)
    sources = read_script(source_file, defaults)[1] if source_file is not None else {}
    values = dict(defaults)
    index = 0
    while index < len(argv):
        argument = argv[index]
        if not argument.startswith("--") or argument == "--":
            raise ConfigError(f"unexpected argument {argument!r}: overrides look like --NAME value")
        name, has_value, text = argument[2:].partition("=")
        if name not in defaults:
            raise ConfigError(unknown_setting_message(name, defaults))
        if not has_value:
            if index + 1 >= len(argv):
                raise ConfigError(f"--{name} needs a value")
            index += 1
            text = argv[index]
        values[name] = _convert(name, text, defaults[name], sources.get(name, SettingSource()).value_type)
        index += 1
    return Config(**values)
