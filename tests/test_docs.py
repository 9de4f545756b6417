"""The docs run: every option that README.md or a docs/ page gives an entry script on a command line exists in that
script's parser, every repository file they name exists, and every link to a section finds its heading.

Commands are read from fenced code blocks (with `\\` continuations joined) and from inline code spans. An entry
script's options are the tokens after it that start with `--`, up to the end of the command (`&&`, `;`, `|`, `&`, a
`#` comment). After a bare `--`, the `evaluate/` scripts pass the rest to every `finetune/train.py` run, so those
options are checked against fine-tuning's settings.

Parsers are built in-process, not by `--help` in a subprocess: `argparse.ArgumentParser.parse_args` is replaced by
one that hands back the parser, and each script runs as `__main__` until it parses. Fine-tuning's settings are the
in-file variables of `finetune/train.py` (`DEFAULTS`), each overridable as `--NAME` (finetune/config.py).
"""
import argparse
import pathlib
import re
import runpy
import shlex
import sys
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FINETUNE = "finetune/train.py"
DOWNLOAD = "download_segment.sh"
ENTRY_FOLDERS = ("pretrain", "finetune", "evaluate", "benchmarks")
# The folders and files a repository path starts with; anything else in a command (experiments/, /data/, a
# segment ID) is an input or an output of the command, not a file of the repository.
REPOSITORY_PREFIXES = ("pretrain/", "finetune/", "evaluate/", "benchmarks/", "notes/", "images/", "docs/", "tests/",
                       ".ci/", "download_segment.sh", "requirements", "README.md")
COMMAND_ENDS = {"&&", "||", ";", "|", "&"}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
LAUNCHER = re.compile(r"python[0-9.]*|torchrun")  # what runs an entry script: python, .venv/bin/python, torchrun


def entry_script(token: str) -> str | None:
    """The repository-relative entry script a command token names (`./download_segment.sh`, `pretrain/main.py`),
    or None."""
    path = token.removeprefix("./")
    if path == DOWNLOAD or (path.endswith(".py") and path.split("/")[0] in ENTRY_FOLDERS):
        return path
    return None


def commands_in(text: str) -> list[str]:
    """Every command-like text of a page: each line of its code blocks (continuations joined), each inline span."""
    commands = []
    for block in FENCE.findall(text):
        commands += block.replace("\\\n", " ").splitlines()
    outside_blocks = FENCE.sub("", text)
    commands += [span.replace("\n", " ") for span in INLINE_CODE.findall(outside_blocks)]
    return commands


def tokens_of(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError:  # an inline span that quotes half a command
        return command.split()


def named_options(page: pathlib.Path) -> list[tuple[str, str, str]]:
    """(script, option, command) for every option a page gives an entry script on a command line."""
    found = []
    for command in commands_in(page.read_text(encoding="utf-8")):
        script, launcher, first = None, False, True
        for token in tokens_of(command):
            if token in COMMAND_ENDS:
                script, launcher, first = None, False, True
                continue
            if script is None and LAUNCHER.fullmatch(token.rsplit("/", 1)[-1]):
                launcher = True
            elif script is None and entry_script(token) and (launcher or (first and entry_script(token) == DOWNLOAD)):
                script = entry_script(token)
            elif script and token == "--":  # evaluate/: the rest goes to every fine-tuning run
                script = FINETUNE
            elif script and token.startswith("--"):
                found.append((script, token.split("=")[0], command))
            first = False
    return found


def named_paths(page: pathlib.Path) -> list[tuple[pathlib.Path, str]]:
    """(resolved path, as written) for every repository file a page names: in code, or as a relative link."""
    text = page.read_text(encoding="utf-8")
    found = []
    for command in commands_in(text):
        for token in tokens_of(command):
            path = token.removeprefix("./").rstrip(".,:;)")
            if path.startswith(REPOSITORY_PREFIXES) and not any(character in path for character in "*{}<>…$"):
                found.append((ROOT / path, token))
    for target in LINK.findall(text):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            found.append(((page.parent / target.split("#")[0]).resolve(), target))
    return found


class ParserFound(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def option_names(script: str) -> set[str]:
    """Every option string `script` accepts."""
    if script == FINETUNE:
        settings = runpy.run_path(str(ROOT / FINETUNE), run_name="finetune_settings")["DEFAULTS"]
        return {f"--{name}" for name in settings} | {"--help", "-h"}
    if script == DOWNLOAD:  # it takes SEGMENT_ID [SCROLL]; options only if it passes its arguments on
        forwards = '"$@"' in (ROOT / DOWNLOAD).read_text(encoding="utf-8")
        return option_names("pretrain/data/download.py") if forwards else set()

    def hand_back(parser, *args, **kwargs):
        raise ParserFound(parser)

    saved = sys.argv, argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    sys.argv = [str(ROOT / script)]
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = hand_back
    try:
        source = (ROOT / script).read_text(encoding="utf-8")
        if "parse_args" not in source and "ArgumentParser" not in source:
            return set()  # a script without options (running it would run it)
        with warnings.catch_warnings():  # the scripts set how warnings show: keep that out of the other tests
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except ParserFound as found:
        return set(found.parser._option_string_actions)
    finally:
        sys.argv, argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved
    raise AssertionError(f"{script} ran to its end without parsing its command line")


def test_the_pages_name_commands_to_check():
    """The extraction finds what the README shows: otherwise the checks below would pass on nothing."""
    readme_scripts = {script for script, _, _ in named_options(ROOT / "README.md")}
    assert {"pretrain/main.py", FINETUNE, "finetune/predict.py", "evaluate/label_efficiency.py"} <= readme_scripts
    assert any(script == FINETUNE for script, _, _ in named_options(ROOT / "docs" / "finetune.md"))
    assert (ROOT / "notes" / "finetune.md", "notes/finetune.md") in named_paths(ROOT / "README.md")


def test_every_option_on_a_documented_command_line_exists():
    named = [item for page in PAGES for item in named_options(page)]
    accepted = {script: option_names(script) for script in sorted({script for script, _, _ in named})}
    unknown = sorted({f"{script} {option}  (in: {command.strip()[:120]})" for script, option, command in named
                      if option not in accepted[script]})
    assert not unknown, "options the docs give that the scripts do not take:\n" + "\n".join(unknown)


def anchors_of(page: pathlib.Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_link_to_a_section_finds_it(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        path, _, anchor = target.partition("#")
        linked = page if not path else (page.parent / path).resolve()
        if anchor and not re.match(r"[a-z]+:", target) and linked.suffix == ".md" and linked.exists():
            if anchor not in anchors_of(linked):
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to sections that do not exist: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_repository_file_a_page_names_exists(page):
    missing = sorted({written for path, written in named_paths(page) if not path.exists()})
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"
