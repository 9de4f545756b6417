"""Settings as plain module variables, overridable from the command line (`--NUM_EPOCHS 2`).

The entry script keeps its settings as commented variables at the top (nanoGPT's habit). This module
collects them and applies `--NAME value` / `--NAME=value` overrides without `exec`: each value is
checked against the type of its default, so a typo or a word where a number belongs is one clear
error instead of a crash an hour later. An int is accepted where the default is a float (`--LR 1`).

Given the entry script's file, it also reads the script's own words about each setting, so that `--help`
shows them: the comment on a setting's line, or else the comment lines just above it. Comment lines above
a setting that has its own line comment open a group of settings (`# optimisation`) and are shown as that
group's heading. A setting annotated `int` (or `int | None`, `Optional[int]`) takes that type, a None default
included. One annotated `str | list[str]` (with or without `| None`) takes one value or several: `--segment_id A B`
gives the list ["A", "B"], `--segment_id A` the plain "A", so a one-value setting reads as it always has.

The script's own values are checked too (`check_in_file_settings`), since they are edited as often as the
command line: a setting the script never reads (`NUM_EPOCH = 2` for NUM_EPOCHS) is one error with the
closest names, and a value of another type than its annotation (`NUM_EPOCHS: int = "2"`) one error naming it.
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

from pretrain.utils import ranges
from pretrain.utils.errors import OneLineError

SETTING_TYPES = (bool, int, float, str, type(None))
HELP_ARGUMENTS = ("--help", "-h")
ANNOTATION_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
RULE_COMMENT = re.compile(r"[-=#*~_ ]*")  # a comment line that only draws a separator
HELP_WIDTH = 100


class ConfigError(OneLineError, ValueError):
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
    value_type: type | None = None  # X of an `X`, `X | None` or `X | list[X]` annotation (X one of bool, int, float, str)
    allows_none: bool = False  # the annotation is `X | None` or `Optional[X]`
    line: int = 0  # where the setting is assigned (the last time)
    allows_list: bool = False  # the annotation is `X | list[X]` (or `X | list[X] | None`): one value or several


def _is_setting_value(value) -> bool:
    """A plain value, or a list of them (a setting that takes several values)."""
    if type(value) is list:
        return all(type(item) in SETTING_TYPES for item in value)
    return type(value) in SETTING_TYPES


def settings_in(namespace: dict) -> dict:
    """The plain-valued (or list-of-plain-valued), public names of a module namespace (its settings), in
    definition order."""
    return {name: value for name, value in namespace.items() if not name.startswith("_") and _is_setting_value(value)}


def _union_members(annotation: ast.expr) -> list[ast.expr]:
    """The members of `A | B | C` or `Optional[A]` (as `A | None`), however nested; [annotation] for anything else."""
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _union_members(annotation.left) + _union_members(annotation.right)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Optional", "typing.Optional"):
        return [*_union_members(annotation.slice), ast.Constant(None)]
    return [annotation]


def _annotated_type(annotation: ast.expr | None) -> tuple[type | None, bool, bool]:
    """(X, whether None is allowed, whether a list is) for an `X`, `X | None`, `Optional[X]`, `X | list[X]` or
    `X | list[X] | None` annotation with X one of bool, int, float, str; (None, False, False) for anything else."""
    if annotation is None:
        return None, False, False
    members = _union_members(annotation)
    named = [ast.unparse(member) for member in members
             if not (isinstance(member, ast.Constant) and member.value is None)]
    if len(named) == 2 and named[1] == f"list[{named[0]}]":
        named, allows_list = named[:1], True
    else:
        allows_list = False
    if len(named) != 1 or named[0] not in ANNOTATION_TYPES:
        return None, False, False
    return ANNOTATION_TYPES[named[0]], len(named) + allows_list < len(members), allows_list


def _assigned_name(statement: ast.stmt) -> tuple[str | None, ast.expr | None]:
    """(name, annotation) of a top-level `NAME = ...` or `NAME: type = ...`; (None, None) for anything else."""
    if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)):
        return statement.targets[0].id, None
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return statement.target.id, statement.annotation
    return None, None


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
        name, annotation = _assigned_name(statement)
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
        value_type, allows_none, allows_list = _annotated_type(annotation)
        sources[name] = SettingSource(heading, description, ast.unparse(annotation) if annotation else "",
                                      value_type, allows_none, statement.lineno, allows_list)
    return (ast.get_docstring(module, clean=False) or "").strip(), sources


def _shown(value) -> str:
    """A default as it would be typed after `--NAME=`."""
    if isinstance(value, list):
        return " ".join(map(_shown, value))
    return shlex.quote(value) if isinstance(value, str) else str(value)


def settings_help(defaults: dict, source_file: str | os.PathLike | None = None,
                  descriptions: dict[str, str] | None = None) -> str:
    """Usage, the script's docstring, then every setting with its default and the script's comment on it, or the
    words `descriptions` has for it (a setting whose meaning is said once for several scripts, elsewhere): the
    comment lines above such a setting are then a heading."""
    docstring, sources = read_script(source_file, defaults) if source_file is not None else ("", {})
    script = pathlib.Path(source_file).name if source_file is not None else "the script"
    parts = [f"usage: {script} [--NAME VALUE | --NAME=VALUE]..."]
    if docstring:
        parts += ["", docstring]
    parts += ["", "settings, each with its default:"]
    for name, value in defaults.items():
        source = sources.get(name, SettingSource())
        if descriptions and name in descriptions:
            source = dataclasses.replace(source, heading=source.heading or source.description,
                                         description=descriptions[name])
        if source.heading:
            parts += ["", textwrap.fill(source.heading, HELP_WIDTH, break_on_hyphens=False)]
        # The type is shown where the default does not show it: a None default, or one that may become None or a list.
        shows_type = source.annotation and (value is None or source.allows_none or source.allows_list)
        parts.append(f"  --{name}={_shown(value)}" + (f"  ({source.annotation})" if shows_type else ""))
        if source.description:
            parts.append(textwrap.fill(source.description, HELP_WIDTH, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6, break_on_hyphens=False))
    return "\n".join(parts)


def close_names(name: str, names) -> list[str]:
    """Up to three of `names` closest to `name`, matched regardless of case."""
    by_lowercase = {}
    for known in names:
        by_lowercase.setdefault(known.lower(), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(by_lowercase), n=3, cutoff=0.6)
    return [known for match in close for known in by_lowercase[match]]


def unknown_setting_message(name: str, names, prefix: str = "--",
                            hint: str = "--help lists every setting") -> str:
    """'unknown setting --X', with the closest setting names, matched regardless of case."""
    suggestions = [f"{prefix}{known}" for known in close_names(name, names)]
    message = f"unknown setting {prefix}{name}"
    if suggestions:
        listed = suggestions[0] if len(suggestions) == 1 else f"{', '.join(suggestions[:-1])} or {suggestions[-1]}"
        message += f"; did you mean {listed}?"
    return message + f" ({hint})"


def _convert(name: str, text: str, default, source: SettingSource = SettingSource()):
    """`text` as the setting's annotated type (else the type of `default`); 'None' is None where the annotation
    or a None default allows it, and a None default without a type takes any text."""
    allows_none = source.allows_none or default is None
    if allows_none and text == "None":
        return None
    expected = source.value_type or (type(default) if default is not None else None)
    if expected is None:
        return text
    or_none = " or None" if allows_none else ""
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


def apply_overrides(defaults: dict, argv: list[str], source_file: str | os.PathLike | None = None,
                    descriptions: dict[str, str] | None = None,
                    setting_ranges: dict[str, ranges.Range] | None = None) -> Config:
    """`defaults` with the `--NAME value` pairs of `argv` applied, each value checked against its type and against
    its range in `setting_ranges`. `source_file` is the entry script whose settings these are (`__file__`): `--help`
    / `-h` then prints them with its comments (or `descriptions`' words, as settings_help), and exits 0."""
    if any(argument in HELP_ARGUMENTS for argument in argv):
        print(settings_help(defaults, source_file, descriptions))
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
        source = sources.get(name, SettingSource())
        texts = [text] if has_value else []
        index += 1
        if source.allows_list:  # every value up to the next --NAME
            while index < len(argv) and not argv[index].startswith("--"):
                texts.append(argv[index])
                index += 1
        elif not has_value and index < len(argv):
            texts.append(argv[index])
            index += 1
        if not texts:
            raise ConfigError(f"--{name} needs a value")
        converted = [_convert(name, text, defaults[name], source) for text in texts]
        values[name] = converted[0] if len(converted) == 1 else converted
        if name in (setting_ranges or {}) and (out_of_range := ranges.problem(f"--{name}", values[name],
                                                                             setting_ranges[name])):
            raise ConfigError(out_of_range)
    return Config(**values)


def _has_type(value, expected: type, allows_none: bool, allows_list: bool = False) -> bool:
    """Whether `value` is of the annotated type; an int is a float too, but a bool is not an int. A list setting's
    value may be a non-empty list of such values."""
    if value is None:
        return allows_none
    if type(value) is list:
        return allows_list and bool(value) and all(_has_type(item, expected, allows_none) for item in value)
    return type(value) is expected or (expected is float and type(value) is int)


def check_in_file_settings(defaults: dict, source_file: str | os.PathLike, reader: str = "config",
                           read_elsewhere: tuple[str, ...] = (),
                           setting_ranges: dict[str, ranges.Range] | None = None) -> None:
    """Raise one ConfigError naming every in-file setting of `source_file` that an override of it would be refused
    for: a setting the script never reads (a typo such as NUM_EPOCH for NUM_EPOCHS, which would silently be a new
    setting), one without a type annotation, a value of another type than its annotation (a trailing comma, which
    makes a tuple, included) or out of its range in `setting_ranges`. The script reads a
    setting as `reader.NAME` or names it in a string (`getattr(config, "MODEL")`); a name read as `reader.NAME` that
    is not a setting any more (renamed by a typo) is missing. `read_elsewhere`: names it reads through a table kept
    in another module (the input settings' names, `pretrain.data.patches.FINETUNE_NAMES`)."""
    script = pathlib.Path(source_file)
    module_source = script.read_text(encoding="utf-8")
    module = ast.parse(module_source)
    sources = read_script(script, defaults)[1]
    mentioned, read_from_reader = set(read_elsewhere), set()
    problems, not_plain = [], set()
    for statement in module.body:
        name, annotation = _assigned_name(statement)
        if name in defaults:
            continue
        if annotation is not None and _annotated_type(annotation)[0] is not None:  # a setting whose value is no value
            not_plain.add(name)
            value_text = ast.get_source_segment(module_source, statement.value)
            comma = " (a trailing comma makes a tuple: remove it)" if isinstance(statement.value, ast.Tuple) else ""
            problems.append(f"{script.name} line {statement.lineno}: {name} expects {ast.unparse(annotation)}, got "
                            f"{value_text}{comma}")
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Attribute):
                mentioned.add(node.attr)
                if isinstance(node.value, ast.Name) and node.value.id == reader and not hasattr(Config, node.attr):
                    read_from_reader.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                mentioned.add(node.value)
    missing = read_from_reader - set(defaults) - not_plain
    known = (set(defaults) & mentioned) | missing
    suggested = set()
    for name, value in defaults.items():
        source = sources.get(name, SettingSource())
        where = f"{script.name} line {source.line}"
        if name not in mentioned:
            suggested.update(close_names(name, known))
            problems.append(f"{where}: " + unknown_setting_message(
                name, known, prefix="", hint=f"{script.name} reads no setting of that name"))
        elif source.value_type is None:
            problems.append(f"{where}: setting {name} = {value!r} has no type annotation, so its value cannot be "
                            f"checked; write it as {name}: <type> = ..., as every setting is written")
        elif not _has_type(value, source.value_type, source.allows_none, source.allows_list):
            expected = source.value_type.__name__ + (" or None" if source.allows_none else "")
            expected += f" or a list of {source.value_type.__name__}" if source.allows_list else ""
            problems.append(f"{where}: {name} expects {expected}, got {value!r}")
        elif name in (setting_ranges or {}) and (out_of_range := ranges.problem(name, value, setting_ranges[name])):
            problems.append(f"{where}: {out_of_range}")
    problems += [f"setting {name} is missing from the top of {script.name}, which reads it"
                 for name in sorted(missing - suggested)]
    if problems:
        raise ConfigError("; ".join(problems))
