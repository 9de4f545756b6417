"""The encoder evaluation report, end to end: pretrain with SparK and with VICReg, probe each frozen encoder
against a random one, compare representations with CKA, map ink without labels, and write the report.

    python evaluate/report.py                                  # the demo segment: about 2 h on a 2-core CPU
    python evaluate/report.py --kinetics r3d50_KM_200ep.pth    # also a full-width probe: random vs Kinetics-700

Every step is its tool's own command, run as a subprocess and printed, so any number in the report can be
reproduced by hand:
1. `pretrain/main.py` with SparK, then with VICReg (same encoder, segment and depth window; each epoch's
   encoder kept for CKA);
2. `evaluate/encoders.py`: the frozen-encoder probe of random, SparK and VICReg (same split, seed, schedule);
3. `evaluate/cka.py`: linear and RBF CKA between random, every `--cka_every`-th SparK epoch, and VICReg;
4. `evaluate/ink_map.py` for each encoder: PCA and k-means maps, scored against the labels afterwards.
Runs go to `--work`. Running again reuses what is finished: pretraining resumes (a finished run only
reports), a finished probe run only predicts again. The report goes to `--notes`, its figures (small PNGs)
to `--images`, both written atomically.
"""
import argparse
import csv
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import torch  # noqa: E402

from finetune.outputs import write_png_atomic  # noqa: E402
from pretrain.utils.misc import git_commit, write_bytes_atomic  # noqa: E402

FIGURE_WIDTH = 512  # pixels: figures stay small PNGs in the repository
PROBE_SEPARATOR = "::"  # in a variant, between its pretraining settings and its probe settings


class StepError(RuntimeError):
    """A step's command failed; its own error line was printed above."""


def run_step(name: str, command: list[str]) -> None:
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    if subprocess.run([sys.executable, *command], cwd=REPO_ROOT).returncode != 0:
        raise StepError(f"step '{name}' failed; its error is printed above")


def epoch_records(exp_dir: pathlib.Path) -> list[dict]:
    """One record per epoch, the last one written (an epoch killed before its checkpoint is logged twice)."""
    by_epoch = {}
    for line in (exp_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "epoch":
            by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def parse_variant(variant: str) -> tuple[str, str, str]:
    """'name=pretraining settings[ :: probe settings]' → (name, pretraining settings, probe settings)."""
    name, settings = variant.split("=", 1)
    pretraining, _, probe = settings.partition(PROBE_SEPARATOR)
    return name, pretraining.strip(), probe.strip()


def read_probe_rows(folder: pathlib.Path) -> dict:
    """encoders.py's CSV rows by encoder, each with every epoch's F0.5 (how much one run moves about)."""
    rows = {row["encoder"]: row for row in csv.DictReader(open(folder / "encoders.csv"))}
    for name, row in rows.items():
        row["epoch_f05"] = [record["val_f05"] for record in epoch_records(folder / "runs" / f"{name}_probe")]
    return rows


def write_figure(source: pathlib.Path, destination: pathlib.Path) -> str:
    """A copy of an image scaled to FIGURE_WIDTH; returns its path relative to the report."""
    image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    if image.shape[1] > FIGURE_WIDTH:
        height = round(image.shape[0] * FIGURE_WIDTH / image.shape[1])
        image = cv2.resize(image, (FIGURE_WIDTH, height), interpolation=cv2.INTER_AREA)
    write_png_atomic(destination, image)
    return destination.name


def all_ink_f05(ink_fraction: float) -> float:
    """F0.5 of calling every pixel ink: precision = the ink fraction, recall = 1."""
    return 1.25 * ink_fraction / (0.25 * ink_fraction + 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segment", default="demo")
    parser.add_argument("--model", default="resnet50_3d_narrow", help="the encoder every method pretrains and probes")
    parser.add_argument("--spark_epochs", type=int, default=40)
    parser.add_argument("--vicreg_epochs", type=int, default=20)
    parser.add_argument("--vicreg_bs", type=int, default=8, help="VICReg's variance and covariance need a batch")
    parser.add_argument("--cka_every", type=int, default=8,
                        help="SparK epochs between the checkpoints CKA compares; the first is also probed")
    parser.add_argument("--variants", nargs="*",
                        default=["mask0.4=--mask 0.4", "mask0.4_seed1=--mask 0.4 --seed 1", "column=--mask_mode column",
                                 "texture=--target texture",
                                 f"surface=--follow_surface True {PROBE_SEPARATOR} --FOLLOW_SURFACE True",
                                 f"zscore=--normalization zscore {PROBE_SEPARATOR} --NORMALIZATION zscore",
                                 f"zscore_seed1=--normalization zscore --seed 1 {PROBE_SEPARATOR} --NORMALIZATION zscore"],
                        help="more SparK runs to probe, as name=settings (what else was tried); settings after "
                             f"'{PROBE_SEPARATOR}' go to the probe, which then also probes a random encoder with them")
    parser.add_argument("--variant_epochs", type=int, default=20)
    parser.add_argument("--kinetics", default="", help="a Hara r3d50_K*/KM* checkpoint: adds a full-width probe table")
    parser.add_argument("--pretrain_args", default="", help="more pretrain/main.py settings for both methods")
    parser.add_argument("--finetune_args", default="", help="more finetune/train.py settings for every probe")
    parser.add_argument("--feature_args", default="", help="more settings for cka.py and ink_map.py")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("experiments/report"))
    parser.add_argument("--notes", type=pathlib.Path, default=pathlib.Path("notes/encoder_report.md"))
    parser.add_argument("--images", type=pathlib.Path, default=pathlib.Path("images"))
    args = parser.parse_args()
    if args.kinetics and not pathlib.Path(args.kinetics).is_file():
        parser.error(f"Kinetics checkpoint {args.kinetics} does not exist")
    started = time.time()
    for folder in (args.work, args.notes.parent, args.images):
        folder.mkdir(parents=True, exist_ok=True)
    pretrain_args, finetune_args = shlex.split(args.pretrain_args), shlex.split(args.finetune_args)
    feature_args = ["--model", args.model, "--segment", args.segment, *shlex.split(args.feature_args)]

    # 1. Pretraining
    runs = {"spark": args.work / "spark", "vicreg": args.work / "vicreg"}
    run_step("SparK pretraining", [
        "pretrain/main.py", "--method", "spark", "--model", args.model, "--data_path", args.segment,
        "--exp_name", "report_spark", "--exp_dir", str(runs["spark"]), "--ep", str(args.spark_epochs),
        "--keep_epoch_encoders", "True", *pretrain_args])
    run_step("VICReg pretraining", [
        "pretrain/main.py", "--method", "vicreg", "--model", args.model, "--data_path", args.segment,
        "--exp_name", "report_vicreg", "--exp_dir", str(runs["vicreg"]), "--ep", str(args.vicreg_epochs),
        "--bs", str(args.vicreg_bs), "--keep_epoch_encoders", "True", *pretrain_args])
    encoders = {"random": "random", **{name: str(folder / f"{args.model}_timm_style.pth") for name, folder in runs.items()}}
    # What else was tried: SparK stopped early, and other SparK settings.
    variants = {f"spark_ep{args.cka_every}": str(runs["spark"] / "epochs" / f"{args.model}_timm_style_ep{args.cka_every:03d}.pth")}
    own_probes = {}  # variant → its probe settings, for variants that need the probe to read input their way
    for variant in args.variants:
        name, settings, probe_settings = parse_variant(variant)
        folder = args.work / "variants" / name
        run_step(f"SparK pretraining, variant {name}", [
            "pretrain/main.py", "--method", "spark", "--model", args.model, "--data_path", args.segment,
            "--exp_name", f"report_spark_{name}", "--exp_dir", str(folder), "--ep", str(args.variant_epochs),
            *pretrain_args, *shlex.split(settings)])
        if probe_settings:
            own_probes[name] = probe_settings
        else:
            variants[f"spark_{name}"] = str(folder / f"{args.model}_timm_style.pth")

    # The control: an encoder that has seen labels (full fine-tuning, same split, so never the held-out band's),
    # probed frozen like the others. If the probe reads ink from it, the probe is not what fails.
    run_step("supervised control: full fine-tuning", [
        "finetune/train.py", "--exp_name", "supervised", "--OUTPUT_DIR", str(args.work / "control"), "--scheme",
        "validation", "--segment_id", args.segment, "--MODEL", args.model, "--SEED", "0", *finetune_args])
    variants["supervised"] = str(args.work / "control" / "supervised" / "best.pth")

    # 2. Frozen-encoder probes
    probes = args.work / "probes"
    probed = {**encoders, **variants}
    run_step("frozen-encoder probes", [
        "evaluate/encoders.py", "--encoders", *probed.values(), "--names", *probed, "--segment", args.segment,
        "--MODEL", args.model, "--output", str(probes), "--", *finetune_args])
    probe_rows = read_probe_rows(probes)
    baselines = {name: "random" for name in probe_rows}  # the random encoder each row is compared with
    probe_tables = [probes / "encoders.md"]
    # Variants that read their input another way are probed that way, next to a random encoder probed alike
    # (once per distinct probe setting: another seed of the same variant shares its random encoder's probe).
    random_for_settings = {}
    for name, probe_settings in own_probes.items():
        folder = args.work / f"probes_{name}"
        probed_here = {f"spark_{name}": str(args.work / "variants" / name / f"{args.model}_timm_style.pth")}
        if probe_settings not in random_for_settings:
            random_for_settings[probe_settings] = f"random_{name}"
            probed_here = {f"random_{name}": "random", **probed_here}
        run_step(f"frozen-encoder probes, variant {name}", [
            "evaluate/encoders.py", "--encoders", *probed_here.values(), "--names", *probed_here, "--segment",
            args.segment, "--MODEL", args.model, "--output", str(folder), "--", *finetune_args, *shlex.split(probe_settings)])
        rows = read_probe_rows(folder)
        probe_rows.update(rows)
        baselines.update({row_name: random_for_settings[probe_settings] for row_name in rows})
        probe_tables.append(folder / "encoders.md")
    kinetics_table = ""
    if args.kinetics:
        run_step("full-width probes, random vs Kinetics-700", [
            "evaluate/encoders.py", "--encoders", "random", args.kinetics, "--names", "random", "kinetics",
            "--segment", args.segment, "--MODEL", "resnet50_3d", "--output", str(args.work / "probes_kinetics"), "--",
            *finetune_args])
        kinetics_table = (args.work / "probes_kinetics" / "encoders.md").read_text()

    # 3. CKA across SparK epochs and methods
    spark_epochs = [epoch for epoch in range(args.cka_every, args.spark_epochs + 1, args.cka_every)]
    if args.spark_epochs not in spark_epochs:
        spark_epochs.append(args.spark_epochs)
    cka_checkpoints = {"random": "random",
                       **{f"spark ep{epoch}": str(runs["spark"] / "epochs" / f"{args.model}_timm_style_ep{epoch:03d}.pth")
                          for epoch in spark_epochs},
                       "vicreg": encoders["vicreg"]}
    cka_folder = args.work / "cka"
    run_step("CKA", ["evaluate/cka.py", "--checkpoints", *cka_checkpoints.values(), "--labels", *cka_checkpoints,
                     "--output", str(cka_folder), *feature_args])
    cka_rows = [row for row in csv.DictReader(open(cka_folder / "cka.csv"))]

    # 4. Unsupervised ink maps
    ink_maps = {}
    for name, checkpoint in encoders.items():
        folder = args.work / "ink_map" / name
        run_step(f"ink map, {name}", ["evaluate/ink_map.py", "--checkpoint", checkpoint, "--output", str(folder),
                                      *feature_args])
        ink_maps[name] = json.loads((folder / "ink_map.json").read_text())

    # The report
    figures = {
        **{f"probe_{name}": write_figure(probes / f"{name}_probe.png", args.images / f"report_probe_{name}.png")
           for name in encoders},
        "cka": write_figure(cka_folder / "cka_linear_stage4.png", args.images / "report_cka_linear_stage4.png"),
        **{f"ink_map_{name}": write_figure(args.work / "ink_map" / name / "pca_best.png",
                                           args.images / f"report_ink_map_{name}.png") for name in encoders},
    }
    pretraining = {name: epoch_records(folder) for name, folder in runs.items()}
    report = render(args, encoders, probe_rows, baselines, probe_tables, kinetics_table, cka_rows, spark_epochs, ink_maps,
                    pretraining, figures,
                    os.path.relpath(args.images, args.notes.parent), time.time() - started)
    write_bytes_atomic(args.notes, report.encode())
    print(f"\nreport written to {args.notes}, figures to {args.images}/report_*.png")
    return 0


def render(args, encoders, probe_rows, baselines, probe_tables, kinetics_table, cka_rows, spark_epochs, ink_maps,
           pretraining, figures, image_folder, seconds) -> str:
    random_f05 = float(probe_rows["random"]["val_f05"])
    ink_fraction = ink_maps["random"]["ink_fraction"]
    lines = [
        "# Which encoder sees ink? The encoder evaluation report",
        "",
        "Generated by `python evaluate/report.py"
        + "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in (
            ("--segment", args.segment), ("--model", args.model), ("--spark_epochs", args.spark_epochs),
            ("--vicreg_epochs", args.vicreg_epochs), ("--pretrain_args", args.pretrain_args),
            ("--finetune_args", args.finetune_args), ("--feature_args", args.feature_args)) if value not in ("", None))
        + f"` on {time.strftime('%Y-%m-%d')} at commit {git_commit()[:7]}, on {platform.machine()} with "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}. "
          f"This invocation took {seconds / 60:.0f} min (finished runs are reused, so a rerun is quicker than the "
          "runs themselves). Times are wall-clock on the machine as it was: other jobs may have shared it. Every number below is what that run measured; the report is rewritten each time.",
        "",
        "## Setup",
        "",
        f"- **Segment** `{args.segment}`. Its labels mark {ink_fraction:.1%} of the papyrus as ink, so calling "
        f"every pixel ink scores F0.5 {all_ink_f05(ink_fraction):.3f}: that is chance.",
        f"- **Encoder** `{args.model}` for every method, so each checkpoint goes into the same probe.",
    ]
    for name, records in pretraining.items():
        if not records:
            continue
        extra = ""
        if name == "vicreg" and "vicreg__embedding_std" in records[-1]:
            last = records[-1]
            extra = (f"; last epoch's terms: invariance {last['vicreg__invariance']:.3f}, variance "
                     f"{last['vicreg__variance']:.3f}, covariance {last['vicreg__covariance']:.3f}, per-dimension "
                     f"embedding std {last['vicreg__embedding_std']:.3f} (collapse would drive it to 0)")
        lines.append(f"- **{'SparK' if name == 'spark' else 'VICReg'} pretraining**: {len(records)} epoch(s), "
                     f"{sum(record['seconds'] for record in records) / 60:.0f} min; loss {records[0]['loss']:.3f} "
                     f"after epoch 1, {records[-1]['loss']:.3f} after the last{extra}.")
    tried = [f"`spark_ep{args.cka_every}`, the SparK run's encoder after {args.cka_every} of its {args.spark_epochs} epochs"]
    for variant in args.variants:
        name, settings, probe_settings = parse_variant(variant)
        tried.append(f"`spark_{name}`, SparK for {args.variant_epochs} epoch(s) with `{settings}`" + (
            f", probed with `{probe_settings}` next to a random encoder probed with them too"
            if probe_settings else ""))
    lines.append(f"- **Also probed**, to see what changes the result: {'; '.join(tried)}.")
    lines.append("- **Control**: `supervised` is the encoder of a full fine-tuning run (`finetune/train.py`, default "
                 "settings, the same split: it never saw the held-out band), probed frozen like the others. It says "
                 "what the probe reads from an encoder that does carry ink features.")
    lines += [
        "- **Probe**: `finetune/train.py` with `freeze_encoder=True` and its default settings (scheme "
        "\"validation\": a held-out band, the same split, seed and schedule for every encoder). Only the UNet "
        "decoder learns; the encoder's weights and BatchNorm statistics stay as pretraining left them. "
        "Numbers are the validation band's at the epoch of lowest validation loss.",
        "",
        "## Frozen-encoder probe",
        "",
        probe_tables[0].read_text().split("\n\n", 1)[1].strip(),
        # The other probes' rows, without their header.
        *[line for table in probe_tables[1:] for line in table.read_text().split("\n\n", 1)[1].strip().splitlines()[2:]],
        "",
        "| encoder | compared with | F0.5 − random | AUC − random | F0.5 over the run's epochs (min – max) |",
        "|---|---|---|---|---|",
    ]
    for name, row in probe_rows.items():
        baseline = probe_rows[baselines[name]]
        difference = ("– | – | –" if name.startswith("random") else
                      f"{baselines[name]} | {float(row['val_f05']) - float(baseline['val_f05']):+.3f} | "
                      f"{float(row['val_auc']) - float(baseline['val_auc']):+.3f}")
        lines.append(f"| {name} | {difference} | {min(row['epoch_f05']):.3f} – {max(row['epoch_f05']):.3f} |")
    spark_f05 = float(probe_rows["spark"]["val_f05"])
    random_spread = max(probe_rows["random"]["epoch_f05"]) - min(probe_rows["random"]["epoch_f05"])
    if spark_f05 - random_f05 > random_spread:
        verdict = f"beats the frozen random encoder, by more than the random probe's epoch-to-epoch spread ({random_spread:.3f})"
    elif spark_f05 > random_f05:
        verdict = (f"does not clearly beat the frozen random encoder: it is above it by less than the random probe's "
                   f"own epoch-to-epoch spread ({random_spread:.3f})")
    else:
        verdict = "does not beat the frozen random encoder"
    lines += [
        "",
        f"**On validation F0.5, the frozen SparK encoder (default settings) {verdict}: {spark_f05:.3f} against "
        f"{random_f05:.3f} ({spark_f05 - random_f05:+.3f}).**",
        "",
        "Each probe's labels (left: ink white, papyrus grey) and its whole-segment prediction (right), the "
        "held-out band outlined in red; random, SparK, VICReg:",
        "",
        *[f"![probe {name}]({image_folder}/{figures[f'probe_{name}']})" for name in encoders],
        "",
        "## Kinetics-700",
        "",
    ]
    if kinetics_table:
        lines += ["Full-width `resnet50_3d` probes (the Kinetics weights are a ResNet-50):", "", kinetics_table.strip()]
    else:
        lines.append("Not measured: no Kinetics-700 checkpoint is on this machine, and nothing may be downloaded. "
                     "The import itself (Hara's `r3d50_K*`/`r3d50_KM*` format, RGB summed to one channel, `fc` "
                     "dropped) is tested on checkpoints built with that exact key layout. With the file at hand, "
                     "`python evaluate/report.py --kinetics r3d50_KM_200ep.pth` adds a full-width probe table.")

    def cka_value(a: str, b: str, kernel: str = "linear") -> float:
        for row in cka_rows:
            if row["stage"] == "4" and row["kernel"] == kernel and {row["a"], row["b"]} == {a, b}:
                return float(row["cka"])
        raise KeyError(f"no CKA row for {a} and {b}")

    final = f"spark ep{spark_epochs[-1]}"
    lines += [
        "",
        "## CKA: how far the representations move",
        "",
        "Stage-4 features (averaged over depth and space) of one fixed set of tiles, linear kernel; "
        "the RBF heatmaps and earlier stages are in the CSV and PNGs that `evaluate/cka.py` wrote to "
        f"`{args.work / 'cka'}`.",
        "",
        f"![linear CKA]({image_folder}/{figures['cka']})",
        "",
        "| pair | linear CKA | RBF CKA |",
        "|---|---|---|",
        *[f"| {label} and {final} | {cka_value(label, final):.3f} | {cka_value(label, final, 'rbf'):.3f} |"
          for label in ["random", *[f"spark ep{epoch}" for epoch in spark_epochs[:-1]], "vicreg"]],
        "",
        "## Unsupervised ink map",
        "",
        f"Stage-1 features of the frozen encoder over the whole segment, PCA fitted on papyrus pixels, k-means on "
        f"the leading components; only then scored against the labels. Chance (all ink) is F0.5 "
        f"{all_ink_f05(ink_fraction):.3f}. For comparison, a linear probe on the same features (logistic "
        "regression per pixel, fitted outside the probe's held-out band, scored inside) says what a few labels "
        "read from them linearly.",
        "",
        "| encoder | best component: F0.5 | its AUC | best k-means cluster: F0.5 | its AUC | linear probe: F0.5 | its AUC |",
        "|---|---|---|---|---|---|---|",
        *[f"| {name} | {result['best_component']['f05']:.3f} | {result['best_component']['auc']:.3f} | "
          f"{result['best_cluster']['f05']:.3f} | {result['best_cluster']['auc']:.3f} | "
          f"{result['linear_probe']['f05']:.3f} | {result['linear_probe']['auc']:.3f} |" for name, result in ink_maps.items()],
        "",
        "The best principal component of each encoder (random, SparK, VICReg):",
        "",
        *[f"![ink map {name}]({image_folder}/{figures[f'ink_map_{name}']})" for name in ink_maps],
        "",
        "## What it means",
        "",
        *what_it_means(probe_rows, baselines, ink_maps, all_ink_f05(ink_fraction), cka_value("random", final)),
    ]
    return "\n".join(lines) + "\n"


def what_it_means(probe_rows: dict, baselines: dict, ink_maps: dict, chance_f05: float, random_final_cka: float) -> list[str]:
    """The reading of the numbers, worded from the numbers, so a rerun cannot leave stale claims behind."""
    def f05(name: str) -> float:
        return float(probe_rows[name]["val_f05"])

    def auc(name: str) -> float:
        return float(probe_rows[name]["val_auc"])

    def gain(name: str) -> float:  # over the random encoder probed the same way
        return f05(name) - f05(baselines[name])

    random_spread = max(probe_rows["random"]["epoch_f05"]) - min(probe_rows["random"]["epoch_f05"])
    randoms = [name for name in probe_rows if name.startswith("random")]
    pretrained = [name for name in probe_rows if name not in randoms and name != "supervised"]
    best = max(pretrained, key=gain)
    at_chance = [name for name in [*randoms, *pretrained] if auc(name) < 0.6 and f05(name) < chance_f05 + 0.05]
    lines = []
    if len(at_chance) == len(randoms) + len(pretrained):
        lines.append(f"- **No frozen encoder here lets the probe find ink.** Random and every pretrained encoder "
                     f"score F0.5 {min(map(f05, at_chance)):.3f}–{max(map(f05, at_chance)):.3f} and AUC "
                     f"{min(map(auc, at_chance)):.3f}–{max(map(auc, at_chance)):.3f}, where calling everything ink "
                     f"scores {chance_f05:.3f} and AUC 0.5 is a coin.")
    gap = gain(best)
    if abs(gap) <= random_spread:
        lines.append(f"- The best pretrained probe ({best}, {f05(best):.3f}) differs from {baselines[best]} by {gap:+.3f}, "
                     f"less than the {random_spread:.3f} that the random probe's own F0.5 moves between epochs. That is "
                     "noise, not a ranking.")
    else:
        lines.append(f"- The best pretrained probe ({best}) is {'above' if gap > 0 else 'below'} {baselines[best]} by "
                     f"{abs(gap):.3f} F0.5, more than the {random_spread:.3f} that the random probe's own F0.5 moves "
                     "between epochs.")
    if "supervised" in probe_rows:
        works = f05("supervised") > chance_f05 + 0.1
        lines.append(f"- **The control** (the encoder of a supervised run, frozen) scores F0.5 {f05('supervised'):.3f}, "
                     f"AUC {auc('supervised'):.3f}. " + (
                         "The probe does read ink from a frozen encoder whose features hold it, so where a pretrained "
                         "encoder stays near random, it is the encoder that lacks ink features, not the probe that "
                         "cannot read them."
                         if works else "Even that stays near chance, so the probe itself cannot read ink from frozen "
                         "features: the comparison above says nothing about the encoders."))
    best_map = max(ink_maps, key=lambda name: ink_maps[name]["best_component"]["f05"])
    lines.append(f"- **Without labels**, the best principal component of any encoder ({best_map}) scores F0.5 "
                 f"{ink_maps[best_map]['best_component']['f05']:.3f} (AUC {ink_maps[best_map]['best_component']['auc']:.3f}) "
                 f"against chance {chance_f05:.3f}.")
    lines.append(f"- **CKA**: the final SparK encoder's stage-4 representation has linear CKA {random_final_cka:.2f} "
                 "with its random starting point; the table shows how fast it settles over the epochs.")
    if f05("spark") <= f05("random") + random_spread:
        # Every variant above its random baseline by more than the noise, and whether its other seeds agree.
        leads = [name for name in pretrained if "_seed" not in name and name != "spark" and gain(name) > random_spread]
        for lead in sorted(leads, key=gain, reverse=True):
            replicas = [name for name in probe_rows if name.startswith(f"{lead}_seed")]
            replicated = [name for name in replicas if gain(name) > random_spread]
            if not replicas:
                lines.append(f"- **A lead**: {lead} does what the default SparK run does not ({gain(lead):+.3f} over "
                             f"{baselines[lead]}), in one run. Other seeds of the same settings come before making it "
                             "the default.")
            else:
                lines.append(f"- {lead} does what the default SparK run does not ({gain(lead):+.3f} over {baselines[lead]}), "
                             "and the same settings with another seed "
                             f"({', '.join(f'{name}: {gain(name):+.3f}' for name in replicas)}) "
                             + ("do too: a lead to follow." if len(replicated) == len(replicas) else
                                "do not: the difference does not replicate, so it is not a lead yet."))
        lines += [
            "",
            "Why reconstruction pretraining misses this ink is measured in `notes/ink_signal.md`: ink is a fraction "
            "of a percent of the voxels SparK reconstructs, and a few percent of their local contrast.",
            "",
            "Not yet tried, and why each might help:",
            "- Masked cells smaller than a stroke is wide (8 pixels on the demo): a masked 8 × 32 × 32 cell lets the "
            "reconstruction ignore ink and still be right almost everywhere. SparK's cell is the encoder's 32-pixel "
            "downsample, so this needs a finer mask than SparK's sparse convolutions allow.",
            "- Views for VICReg that differ in what is not ink (gain/offset drift, warp), so that invariance removes "
            "them and the embedding's variance has to come from the rest.",
            "- Far longer pretraining, on a GPU: these runs saw a few thousand crops.",
        ]
    return lines


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
