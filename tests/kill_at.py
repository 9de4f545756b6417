"""Run an entry script and kill -9 it at an exact point of its work, whatever the machine's speed: the
kill-and-resume tests choose where a run dies with it.

    python tests/kill_at.py --rename N -- pretrain/main.py ARGS...   # right before the N-th rename
    python tests/kill_at.py --step N -- finetune/train.py ARGS...    # right after the N-th optimizer step

Every atomic write of the project ends in `os.replace(temporary, path)` (`pretrain.utils.temporaries.write_atomic`,
and the chunk cache's streamed downloads), so dying right before the N-th one leaves that write's temp file whole
and not renamed: what a kill -9 in the middle of writing a checkpoint leaves. Steps are counted by torch's global optimizer-step hook,
which every optimizer (AdamW, timm's LAMB) calls. The script runs as `python SCRIPT ARGS...` would run it
(`runpy`, as `__main__`), so the code under test holds no test hook. Right before dying the launcher writes
one line to stderr, `kill_at: {json}`, saying where: the step, or the rename's temporary and destination.
Tests call it through `run_killed`.
"""
import argparse
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPORT_PREFIX = "kill_at: "


def temporary_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The temp files of atomic writes (`.<name>.<random>.vesuvius-ink.tmp`, `pretrain.utils.temporaries`), and any
    other `.*.tmp`, anywhere under `folder`."""
    return sorted(folder.rglob(".*.tmp"))


def assert_same_weights(path: pathlib.Path, reference: pathlib.Path) -> None:
    """The model weights in checkpoint `path` are, bit for bit, those in `reference` (an uninterrupted run's)."""
    weights = torch.load(path, map_location="cpu", weights_only=True)["model"]
    reference_weights = torch.load(reference, map_location="cpu", weights_only=True)["model"]
    assert weights.keys() == reference_weights.keys()
    differing = [name for name in weights if not torch.equal(weights[name], reference_weights[name])]
    assert not differing, f"{path.name} differs from an uninterrupted run's in {differing[:5]}"


def kill_and_resume_training(arguments: list[str], kill_step: int, folder: pathlib.Path, environment: dict) -> str:
    """finetune/train.py with `arguments` and exp_name "killed" under `folder`, killed -9 right after optimizer step
    `kill_step`, then run again to the end; its last.pth must hold, bit for bit, the weights of the uninterrupted
    run "straight" beside it. Returns the resumed run's stdout."""
    script = pathlib.Path(__file__).resolve().parents[1] / "finetune" / "train.py"
    died = run_killed(["--step", str(kill_step)], script, [*arguments, "--exp_name", "killed"], folder / "killed.log",
                      environment)
    assert died["step"] == kill_step
    resumed = subprocess.run([sys.executable, str(script), *arguments, "--exp_name", "killed"], capture_output=True,
                             text=True, timeout=300, env=environment, cwd=script.parents[1])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_weights(folder / "killed" / "last.pth", folder / "straight" / "last.pth")
    return resumed.stdout


def run_killed(kill_point: list[str], script: pathlib.Path, arguments: list[str], output: pathlib.Path,
               environment: dict) -> dict:
    """Run `script` with `arguments` under this launcher, killed at `kill_point` (["--rename", "3"] or
    ["--step", "5"]), and return where it died (the launcher's report). Fails if the run ended any other way.
    Its stdout and stderr go to the file `output`: a pipe would stay open in any DataLoader worker that outlives
    the killed process (until it notices, seconds later)."""
    with open(output, "w") as output_file:
        completed = subprocess.run([sys.executable, __file__, *kill_point, "--", str(script), *arguments],
                                   cwd=pathlib.Path(__file__).resolve().parents[1], env=environment,
                                   stdout=output_file, stderr=subprocess.STDOUT, timeout=300)
    text = output.read_text()
    reports = [line.removeprefix(REPORT_PREFIX) for line in text.splitlines() if line.startswith(REPORT_PREFIX)]
    if completed.returncode != -signal.SIGKILL or not reports:
        raise AssertionError(f"{script.name} was not killed at {' '.join(kill_point)}: exit status "
                             f"{completed.returncode}\n{text[-3000:]}")
    return json.loads(reports[-1])


def kill_self(**where) -> None:
    # On a line of its own: a progress bar may have left the cursor mid-line.
    print("\n" + REPORT_PREFIX + json.dumps(where), file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def kill_before_rename(number: int) -> None:
    real_replace = os.replace
    renames = 0

    def replace(source, destination, **keywords):
        nonlocal renames
        renames += 1
        if renames == number:
            kill_self(rename=number, temporary=os.fspath(source), destination=os.fspath(destination))
        return real_replace(source, destination, **keywords)

    os.replace = replace


def kill_after_step(number: int) -> None:
    steps = 0

    def after_step(optimizer, args, keywords) -> None:
        nonlocal steps
        steps += 1
        if steps == number:
            kill_self(step=number)

    register_optimizer_step_post_hook(after_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    point = parser.add_mutually_exclusive_group(required=True)
    point.add_argument("--rename", type=int, help="die right before the process's N-th os.replace (1 = the first)")
    point.add_argument("--step", type=int, help="die right after the process's N-th optimizer step (1 = the first)")
    parser.add_argument("script", type=pathlib.Path)
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    if options.rename is not None:
        kill_before_rename(options.rename)
    else:
        kill_after_step(options.step)
    # As `python SCRIPT`: its own folder first on sys.path (not tests/), its path and arguments in sys.argv.
    sys.path[0] = str(options.script.resolve().parent)
    sys.argv = [str(options.script), *options.arguments]
    runpy.run_path(str(options.script), run_name="__main__")


if __name__ == "__main__":
    main()
