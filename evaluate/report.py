"""The encoder evaluation report, end to end: pretrain with every registered method (pretrain/methods.py: SparK,
VICReg and any method added there), fine-tune each encoder from a few
labelled glyphs against training from scratch (`random`), probe each frozen encoder against a random one, compare
representations with CKA, map ink without labels, and write the report.

    python evaluate/report.py                                  # the demo segment (pretraining: hours on a 2-core CPU)
    python evaluate/report.py --pretrain_only                  # the pretraining alone, a sitting of its own
    python evaluate/report.py --curve_segments demo demo:1     # the verdict on demo and on demo:1 too
    python evaluate/report.py --curve_segments demo demo:1 --verdict_only   # that verdict alone (minutes)
    python evaluate/report.py --curve_modes frozen full        # fine-tuning curves too (a GPU's hours)
    python evaluate/report.py --variants mask0.4="--mask 0.4" surface="--follow_surface True"
    python evaluate/report.py --kinetics r3d50_KM_200ep.pth    # also a full-width probe: random vs Kinetics-700

Every step runs its tool's own command as a subprocess, prints it, and writes what it measured, with that command,
to `--work`/results/<step>.json; `evaluate/render_report.py` then turns those results into `--notes` (and its
figures, small PNGs, into `--images`), so any number in the report can be reproduced by hand. The steps:
1. `pretrain/main.py`: every registered method (each epoch's encoder kept for CKA), and each `--variants` SparK run;
2. `evaluate/label_efficiency.py`: curves from k labelled glyphs, random against the `--curves` encoders, each
   encoder frozen and read by a logistic regression (`--curve_modes frozen`, the default) and/or fine-tuned, on
   each `--curve_segments` segment (a verdict each);
3. `evaluate/encoders.py`: the frozen-encoder probes of random, every pretrained encoder and a supervised control.
   Encoders read tiles as their checkpoints record; those trained on other input settings (a variant's) are
   probed in a group of their own, next to a random encoder probed with the same settings;
4. `evaluate/cka.py`: linear and RBF CKA between random, every `--cka_every`-th SparK epoch, and the other methods;
5. `evaluate/ink_map.py` for random and every method.
Running again reuses what is finished, keyed by content (evaluate/provenance.py: the code each step executes, its
command with the content of every file it reads, the segment), so a commit that touches only README or notes reuses
everything: a step that finished with the same key is not started again, pretraining resumes only a run of the
same key (one of other settings, e.g. other --spark_epochs, is moved to .superseded/ and run afresh), fine-tuning
runs are reused or only predict again, and an encoder overwritten in place is probed and fine-tuned again.
"""
import argparse
import csv
import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

from evaluate import encoder_input, provenance, render_report, verdict_rule
from pretrain import checkpoint, methods
from pretrain.data.patches import InputSettings, evaluate_options, finetune_options
from pretrain.data.segment import SegmentError, parse_spec
from pretrain.utils import errors, ranges, run_log
from pretrain.utils.misc import RenamedOption, git_commit, write_bytes_atomic
from pretrain.utils.errors import OneLineError


class StepError(OneLineError, RuntimeError):
    """A step's command failed; its own error line was printed above."""

    exit_status = 1


def run_step(name: str, command: list[str], output: pathlib.Path | None = None, log: pathlib.Path | None = None,
             folder: pathlib.Path | None = None) -> str:
    """Run a repository script with this Python; returns the command as a person would type it. A step is keyed by
    what decides its result (evaluate/provenance.py: the code the script executes, its command with the content of
    every file it names, the segment). With `output` (a file the step writes; its key is recorded beside it once the
    step succeeds), a step that finished with the same key is not run again. With `folder` (the folder the step
    works in), work there of another key is moved to .superseded/ first, so that nothing of other settings or inputs
    is continued. With `log`, the step's output goes there (steps that run side by side)."""
    printable = shlex.join(["python", *command])
    step_key = provenance.key([sys.executable, *command], provenance.code_of(command[0]))
    record = output.with_name(output.name + ".key.json") if output is not None else None
    if record is not None and output.is_file() and record.is_file():
        if json.loads(record.read_text()) == step_key:
            print(f"\n== {name}: finished earlier with the same command and code: {printable}", flush=True)
            return printable
        print(f"\n== {name}: finished earlier, but not with this code or these inputs: running it again", flush=True)
    if folder is not None:
        aside = provenance.claim(folder, step_key)
        if aside is not None:
            print(f"\n== {name}: {folder} holds work of other code or inputs: kept in {aside}, starting afresh", flush=True)
    print(f"\n== {name}: {printable}" + (f" (output in {log})" if log else ""), flush=True)
    if log is None:
        returncode = subprocess.run([sys.executable, *command], cwd=REPO_ROOT).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as stream:
            returncode = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, stdout=stream, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        raise StepError(f"step '{name}' failed; its error is printed " + (f"in {log}" if log else "above"))
    if record is not None:
        write_bytes_atomic(record, json.dumps(step_key, indent=1).encode())
    return printable


def save_results(args, step: str, results) -> None:
    (args.work / "results").mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.work / "results" / f"{step}.json", json.dumps(results, indent=1, default=str).encode())


def pretraining_runs(args) -> dict:
    """{name: (pretrain/main.py settings, description)}: one run per registered method, then the SparK variants."""
    epochs = {"spark": args.spark_epochs, "vicreg": args.vicreg_epochs}
    settings = {"vicreg": ["--bs", str(args.vicreg_bs)]}
    for method_settings in args.method_args:
        name, _, options = method_settings.partition("=")
        settings[name] = [*settings.get(name, []), *shlex.split(options)]
    runs = {}
    for name in methods.METHODS:
        extra = settings.get(name, [])
        runs[name] = (["--method", name, "--ep", str(epochs.get(name, args.method_epochs)), *extra],
                      methods.get(name).title + (f" with `{shlex.join(extra)}`" if extra else ", default settings"))
    for variant in args.variants:
        name, _, options = variant.partition("=")
        runs[f"spark_{name}"] = (["--method", "spark", "--ep", str(args.variant_epochs), *shlex.split(options)],
                                 f"SparK with `{options}`")
    return runs


def pretrain(args) -> dict:
    """Step 1: every pretraining run; returns {name: encoder checkpoint path}."""
    runs = pretraining_runs(args)
    exp_dirs = {name: args.work / name if name in methods.METHODS
                else args.work / "variants" / name.removeprefix("spark_") for name in runs}

    def run_pretraining(name: str) -> str:
        return run_step(f"pretraining, {name}", [
            "pretrain/main.py", "--model", args.model, "--data_path", args.segment, "--exp_name", f"report_{name}",
            "--exp_dir", str(exp_dirs[name]), "--keep_epoch_encoders", "True", "--samples_per_ep",
            str(args.pretrain_samples), *shlex.split(args.pretrain_args),
            *runs[name][0]], checkpoint.encoder_file(exp_dirs[name], args.model),
            log=exp_dirs[name].with_name(exp_dirs[name].name + ".log") if jobs > 1 else None, folder=exp_dirs[name])

    # The runs are independent: side by side on a GPU, with --jobs (a pretraining run takes every core of a CPU).
    jobs = args.jobs or 1
    commands = dict(zip(runs, encoder_input.side_by_side(run_pretraining, list(runs), jobs)))
    results, encoders = {}, {}
    for name, (settings, description) in runs.items():
        exp_dir, command = exp_dirs[name], commands[name]
        encoders[name] = str(checkpoint.encoder_file(exp_dir, args.model))
        settings_used = checkpoint.input_settings(checkpoint.read(encoders[name]))
        arguments = run_log.records(exp_dir, "start")[0]["args"]
        results[name] = {"command": command, "description": description, "exp_dir": str(exp_dir),
                         "input": settings_used.as_dict(), "samples_per_epoch": arguments["samples_per_ep"],
                         "batch_size": arguments["bs"], "epochs": run_log.epochs(exp_dir)}
    encoders[f"spark_ep{args.cka_every}"] = str(checkpoint.encoder_file(args.work / "spark", args.model, args.cka_every))
    save_results(args, "pretraining", results)
    return encoders


def groups_by_input(encoders: dict, tile_size: int) -> list[dict]:
    """The encoders grouped by the input settings they were trained with, all at the fine-tuning tile size (the
    tile size changes the context a convolutional encoder sees, not what its input means). The group of the first
    encoder comes first."""
    groups = {}
    for name, path in encoders.items():
        settings = dataclasses.replace(checkpoint.input_settings(checkpoint.read(path)), tile_size=tile_size)
        groups.setdefault(settings, {"settings": settings, "encoders": {}})["encoders"][name] = path
    return list(groups.values())


def input_options(settings: InputSettings, tile_size: int) -> list[str]:
    """The evaluate/ scripts' input options for `settings`, with the fine-tuning tile size."""
    return evaluate_options(dataclasses.replace(settings, tile_size=tile_size))


def curve_folders(args) -> dict:
    """{segment spec: the folder its curves go to}, for each --curve_segments segment: --segment_id's in --work (so
    that a report of that segment alone keeps its runs), each other's in --work/segments/<its identity>."""
    folders = {}
    for segment in args.curve_segments:
        identity = parse_spec(segment).identity
        folders[segment] = args.work if identity == parse_spec(args.segment).identity else \
            args.work / "segments" / identity.replace(":", "_").replace("/", "_")
    return folders


def label_efficiency(args, encoders: dict) -> None:
    """Step 2: few-label curves of random against each --curves encoder, per input-settings group, on each
    --curve_segments segment: a verdict per segment, each with the report's family-wise error."""
    chosen = {name: encoders[name] for name in args.curves}
    results = []
    for segment, folder in curve_folders(args).items():
        for index, group in enumerate(groups_by_input(chosen, args.finetune_tile_size)):
            names = list(group["encoders"])
            output = folder / ("label_efficiency" if index == 0 else f"label_efficiency_{names[0]}")
            command = run_step(f"label efficiency, {segment}, {', '.join(names)}", [
                "evaluate/label_efficiency.py", "--pretrained_path", "random", *group["encoders"].values(), "--names",
                "random", *names, "--segment_id", segment, "--modes", *args.curve_modes, "--seeds", *map(str, args.seeds),
                "--glyphs", *map(str, args.glyphs), "--random_epochs_factor", str(args.random_epochs_factor), "--jobs",
                str(args.jobs),
                # A segment's family-wise error (verdict_rule.ALPHA) shared by the groups, by their encoders.
                "--alpha", f"{verdict_rule.ALPHA * len(names) / len(chosen):.6g}",
                *input_options(group["settings"], args.finetune_tile_size), *shlex.split(args.curve_args),
                "--output", str(output), "--",
                *shlex.split(args.finetune_args)], output / "label_efficiency.json")
            results.append({"command": command, "output": str(output), "encoders": names, "segment": segment,
                            **json.loads((output / "label_efficiency.json").read_text()),
                            "table": (output / "label_efficiency.md").read_text(),
                            "plot": str(output / "label_efficiency.png")})
    save_results(args, "label_efficiency", results)


def probes(args, encoders: dict) -> None:
    """Step 3: the frozen-encoder probes, with a supervised control, per input-settings group."""
    # The control: an encoder that has seen labels (full fine-tuning from scratch, the same split, so never the
    # held-out band's), probed frozen like the others. If the probe reads ink from it, the probe is not what fails.
    spark_settings = dataclasses.replace(checkpoint.input_settings(checkpoint.read(encoders["spark"])),
                                         tile_size=args.finetune_tile_size)
    control = run_step("supervised control: full fine-tuning", [
        "finetune/train.py", "--exp_name", "supervised", "--OUTPUT_DIR", str(args.work / "control"), "--scheme",
        "validation", "--BEST_BY", "last", "--segment_id", args.segment, "--SEED", "0", *finetune_options(spark_settings),
        *shlex.split(args.finetune_args)], args.work / "control" / "supervised" / "last.pth",
        folder=args.work / "control" / "supervised")
    probed = {**encoders, "supervised": str(args.work / "control" / "supervised" / "best.pth")}
    results = {"control_command": control, "groups": []}
    for index, group in enumerate(groups_by_input(probed, args.finetune_tile_size)):
        random_name = "random" if index == 0 else f"random_{next(iter(group['encoders']))}"
        output = args.work / ("probes" if index == 0 else f"probes_{next(iter(group['encoders']))}")
        names = [random_name, *group["encoders"]]
        command = run_step(f"frozen-encoder probes, {', '.join(names)}", [
            "evaluate/encoders.py", "--pretrained_path", "random", *group["encoders"].values(), "--names", *names,
            "--segment_id", args.segment, "--seeds", str(args.probe_seeds), "--jobs", str(encoder_input.automatic_jobs(args.jobs)),
            *input_options(group["settings"], args.finetune_tile_size), "--output", str(output), "--",
            *shlex.split(args.finetune_args)], output / "encoders.csv")
        rows = list(csv.DictReader(open(output / "encoders.csv")))
        results["groups"].append({"command": command, "baseline": random_name, "input": group["settings"].as_dict(),
                                  "rows": rows, "images": {name: str(output / f"{name}_probe.png") for name in names},
                                  "no_skill_band": json.loads((output / "no_skill_band.json").read_text())})
    if args.kinetics:
        output = args.work / "probes_kinetics"
        command = run_step("full-width probes, random vs Kinetics-700", [
            "evaluate/encoders.py", "--pretrained_path", "random", args.kinetics, "--names", "random", "kinetics",
            "--segment_id", args.segment, "--model", "resnet50_3d", "--tile_size", str(args.finetune_tile_size), "--seeds",
            str(args.probe_seeds), "--output", str(output),
            "--", *shlex.split(args.finetune_args)], output / "encoders.csv")
        results["kinetics"] = {"command": command, "rows": list(csv.DictReader(open(output / "encoders.csv")))}
    save_results(args, "probes", results)


def representations(args, encoders: dict) -> None:
    """Steps 4 and 5: CKA across SparK's epochs and methods, and the unsupervised ink maps."""
    spark_epochs = sorted({*range(args.cka_every, args.spark_epochs + 1, args.cka_every), args.spark_epochs})
    settings = checkpoint.input_settings(checkpoint.read(encoders["spark"]))

    def feature_options(encoder_settings, scaling: bool = True) -> list[str]:
        """cka.py's and ink_map.py's options for tiles cut as `encoder_settings` say (and scaled so, with `scaling`:
        without it, each checkpoint scales tiles as it was trained)."""
        options = input_options(encoder_settings, settings.tile_size)
        if not scaling:
            at = options.index("--normalization")
            options = options[:at] + options[at + 2:]
        return [*options, "--segment_id", args.segment, *shlex.split(args.feature_args)]

    cka_checkpoints = {"random": "random", **{f"spark ep{epoch}": str(checkpoint.encoder_file(args.work / "spark", args.model, epoch))
                                              for epoch in spark_epochs},
        **{name: encoders[name] for name in methods.METHODS if name != "spark"}}
    command = run_step("CKA", ["evaluate/cka.py", "--pretrained_path", *cka_checkpoints.values(), "--labels",
                               *cka_checkpoints, "--output", str(args.work / "cka"), *feature_options(settings, False)],
                       args.work / "cka" / "cka.csv")
    save_results(args, "cka", {"command": command, "spark_epochs": spark_epochs,
                               "rows": list(csv.DictReader(open(args.work / "cka" / "cka.csv"))),
                               "heatmap": str(args.work / "cka" / "cka_linear_stage4.png")})
    ink_maps = {}
    for name in ("random", *methods.METHODS):
        folder = args.work / "ink_map" / name
        own = settings if name == "random" else checkpoint.input_settings(checkpoint.read(encoders[name]))
        command = run_step(f"ink map, {name}", ["evaluate/ink_map.py", "--pretrained_path", encoders.get(name, "random"),
                                                "--output", str(folder), *feature_options(own)], folder / "ink_map.json")
        ink_maps[name] = {"command": command, **json.loads((folder / "ink_map.json").read_text()),
                          "map": str(folder / "pca_best.png")}
    save_results(args, "ink_maps", ink_maps)


def parse_args() -> argparse.Namespace:
    parser = errors.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=encoder_input.HelpFormatter)
    encoder_input.add_segment_argument(parser, "segment spec with ink labels")
    parser.add_argument("--model", default="resnet50_3d_narrow", help="the encoder every method pretrains")
    parser.add_argument("--spark_epochs", type=ranges.ranged(int, ranges.AT_LEAST_1), default=40,
                        help="SparK pretraining epochs")
    parser.add_argument("--vicreg_epochs", type=ranges.ranged(int, ranges.AT_LEAST_1), default=20,
                        help="VICReg pretraining epochs")
    parser.add_argument("--vicreg_bs", type=ranges.ranged(int, ranges.AT_LEAST_2), default=8,
                        help="VICReg's variance and covariance need a batch")
    parser.add_argument("--method_epochs", type=ranges.ranged(int, ranges.AT_LEAST_1), default=20,
                        help="pretraining epochs of any other registered method")
    parser.add_argument("--method_args", nargs="*", default=[],
                        help="more pretraining settings of one method, as name=\"settings\" "
                             "(e.g. vicreg=\"--projector 512-512\")")
    parser.add_argument("--variants", nargs="*", default=[],
                        help="more SparK runs, as name=\"pretraining settings\"; each is probed reading tiles as it learnt")
    parser.add_argument("--variant_epochs", type=ranges.ranged(int, ranges.AT_LEAST_1), default=20,
                        help="epochs of each variant")
    parser.add_argument("--curves", nargs="+", default=list(methods.METHODS),
                        help="encoders (a registered method's name, or spark_<variant>) whose few-label curves are "
                             "measured against random (default: every method)")
    parser.add_argument("--curve_segments", nargs="+", default=[],
                        help="segments the few-label curves are measured on, a verdict each, with the encoders "
                             "pretrained on --segment_id (default: that segment alone)")
    parser.add_argument("--curve_modes", nargs="+", default=["frozen"], choices=["frozen", "full", "lpft"],
                        help="how the curves use each encoder (evaluate/label_efficiency.py --modes): frozen, read by a "
                             "logistic regression (minutes for the whole verdict on a CPU), and/or fine-tuned (full, "
                             "lpft: a run's minutes each, hours of a GPU at the verdict's seeds)")
    parser.add_argument("--glyphs", type=ranges.ranged(int, ranges.AT_LEAST_1), nargs="+", default=[1, 2, 4],
                        help="labelled glyphs per curve point")
    parser.add_argument("--seeds", type=ranges.ranged(int, ranges.AT_LEAST_1), nargs="+",
                        default=[verdict_rule.Design().seeds[0]],
                        help="seeds per curve point (the count evaluate/simulate_verdict.py chose: "
                             "notes/verdict_rules.md): one count, or one per --glyphs value")
    parser.add_argument("--random_epochs_factor", "--scratch_epochs_factor", type=ranges.ranged(int, ranges.AT_LEAST_1),
                        default=2, action=RenamedOption,
                        help="the curves' second random arm trains this many times the epochs (1: none), so that a "
                             "win is about labels, not optimisation speed (--scratch_epochs_factor: its older name)")
    parser.add_argument("--probe_seeds", type=ranges.ranged(int, ranges.AT_LEAST_1), default=3,
                        help="seeds per frozen-encoder probe")
    parser.add_argument("--curve_args", default="", help="more evaluate/label_efficiency.py settings")
    parser.add_argument("--cka_every", type=ranges.ranged(int, ranges.AT_LEAST_1), default=8,
                        help="SparK epochs between the checkpoints CKA compares; the first is also probed")
    parser.add_argument("--kinetics", default="", help="a Hara r3d50_K*/KM* checkpoint: adds a full-width probe table")
    parser.add_argument("--finetune_tile_size", type=ranges.ranged(int, ranges.AT_LEAST_1), default=64,
                        help="TILE_SIZE of every fine-tuning run")
    parser.add_argument("--jobs", type=ranges.ranged(int, ranges.AT_LEAST_0), default=0,
                        help="runs at a time: pretraining runs, fine-tuning curves and probes (on one GPU, several small "
                             "runs keep it busier than one); with more than one, pretraining output goes to <run>.log; "
                             "0: fine-tuning runs one per core on a CPU and one on a GPU, pretraining runs one at a time")
    parser.add_argument("--pretrain_samples", type=int, default=180,
                        help="crops per pretraining epoch, with a GPU or without (pretrain/main.py would take fewer "
                             "on a CPU)")
    parser.add_argument("--pretrain_args", default="", help="more pretrain/main.py settings for every pretraining run")
    parser.add_argument("--finetune_args", default="", help="more finetune/train.py settings for every fine-tuning run")
    parser.add_argument("--feature_args", default="", help="more settings for cka.py and ink_map.py")
    parser.add_argument("--pretrain_only", action="store_true",
                        help="stop after step 1 (a sitting of its own: the rest reuses it when run with the same settings)")
    parser.add_argument("--verdict_only", action="store_true",
                        help="the few-label curves and their verdict, then the report: no frozen-encoder probes, CKA "
                             "or ink maps (the probes are hours of a CPU)")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("experiments/report"), help="runs and results")
    parser.add_argument("--notes", type=pathlib.Path, default=pathlib.Path("notes/encoder_report.md"), help="the report")
    parser.add_argument("--images", type=pathlib.Path, default=pathlib.Path("images"), help="the report's figures")
    args = parser.parse_args()
    for method_settings in args.method_args:
        if method_settings.partition("=")[0] not in methods.METHODS:
            parser.error(f"--method_args {method_settings}: no registered method {method_settings.partition('=')[0]!r} "
                         f"(pretrain/methods.py has {', '.join(methods.METHODS)})")
    args.curve_segments = args.curve_segments or [args.segment]
    identities = []
    for segment in args.curve_segments:
        try:
            identities.append(parse_spec(segment).identity)
        except SegmentError as error:
            parser.error(f"--curve_segments: {error}")
    if len(set(identities)) < len(identities):
        parser.error(f"--curve_segments names a segment twice ({' '.join(args.curve_segments)} are "
                     f"{' '.join(identities)})")
    if args.kinetics and not pathlib.Path(args.kinetics).is_file():
        parser.error(f"Kinetics checkpoint {args.kinetics} does not exist")
    return args


def main() -> int:
    args = parse_args()
    started = time.time()
    encoders = pretrain(args)
    if args.pretrain_only:
        print(f"\npretraining done: {', '.join(encoders.values())}; the same command without --pretrain_only goes on")
        return 0
    label_efficiency(args, encoders)
    if not args.verdict_only:
        probes(args, encoders)
        representations(args, encoders)
    steps = render_report.VERDICT_STEPS if args.verdict_only else render_report.STEPS
    save_results(args, "run", {"command": shlex.join(["python", "evaluate/report.py", *sys.argv[1:]]),
                               "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                               "seconds": time.time() - started, "segment": args.segment, "steps": list(steps)})
    render_report.render_to_files(args.work / "results", args.notes, args.images)
    print(f"\nreport written to {args.notes}, figures to {args.images}/report_*.png")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
