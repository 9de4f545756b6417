"""Which encoder sees ink? One command, identical settings for every encoder: the frozen-encoder probe
(and optionally full fine-tuning) on the same segment, split, seeds and schedule.

    python evaluate/encoders.py --pretrained_path random experiments/spark_demo/resnet50_3d_timm_style.pth \
        experiments/vicreg_demo/resnet50_3d_timm_style.pth --names random spark vicreg
    python evaluate/encoders.py --pretrained_path random r3d50_KM_200ep.pth --names random kinetics --model resnet50_3d \
        --full_finetune -- --NUM_EPOCHS 6           # after "--": settings passed to every finetune/train.py run

Each encoder is one `finetune/train.py` run per seed (scheme "validation", `freeze_encoder=True` for the probe),
so the probe is exactly the fine-tuning model and pipeline; seed s is SEED s for every encoder, so runs are paired.
`random` means no pretrained weights (the seeded random initialisation every run shares). Every run reads tiles
the same way: as the checkpoints record they were trained (they must agree; `random` follows them), or as the input
options say. Each run is scored from its whole-segment prediction with its last epoch's weights (`BEST_BY last`:
no epoch is chosen by looking at the band it is scored on), on the held-out band: F0.5 at the threshold that is best on the labelled tiles it trained on
(never the band's own), AUC and average precision, and as an extra the band's oracle F0.5 at its own best threshold.
The table gives, per encoder, the mean and min–max over seeds, and the mean paired difference from `random` with a
95 % t interval. Writes `encoders.md`, `encoders.csv` (per encoder), `runs.csv` (per run), one labels-vs-prediction
image per encoder and mode (seed 0), and a TensorBoard summary, into `--output`.
"""
import argparse
import csv
import dataclasses
import io
import json
import math
import pathlib
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np

from evaluate import encoder_input, provenance
from evaluate.statistics import describe_interval, paired_interval
from finetune.data import Box
from finetune.metrics import NoSkillBand, no_skill_band
from pretrain.data.patches import InputSettings, finetune_options
from pretrain.data.segment import open_segment
from pretrain.utils import errors, ranges, run_log
from pretrain.utils.misc import RenamedOption, TensorboardLogger, write_bytes_atomic

SCORES = {"f05": "validation_calibrated_f05", "f05_oracle": "validation_f05", "auc": "validation_auc",
          "average_precision": "validation_average_precision"}  # what a run reports: its prediction's metrics


def run_finetune(name: str, checkpoint: str, mode: str, seed: int, settings: InputSettings, args,
                 extra: list[str], segment_options: list[str] | None = None) -> dict:
    """One finetune/train.py run; returns its prediction's scores, its best epoch and training time (or raises with
    its error line). The run is on args.segment with a band held out, or with `segment_options` (finetune/train.py's
    segment settings) on several segments, scored on all their held-out pixels pooled."""
    experiment = f"{name}_{mode}_seed{seed}"
    command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--exp_name", experiment,
               "--OUTPUT_DIR", str(args.output / "runs"), "--scheme", "validation", "--BEST_BY", "last",
               *(segment_options or ["--segment_id", args.segment]),
               "--SEED", str(seed), "--freeze_encoder", str(mode == "probe"), *finetune_options(settings)]
    if checkpoint != "random":
        command += ["--pretrained_path", checkpoint]
    experiment_dir = args.output / "runs" / experiment
    # A run folder of other code or inputs (an encoder overwritten in place, another segment) is set aside, so
    # finetune/train.py starts afresh instead of refusing to continue it.
    aside = provenance.claim(experiment_dir, provenance.key(command + extra, provenance.TRAIN_CODE))
    if aside is not None:
        print(f"== {experiment}: {experiment_dir} held a run of other code or inputs: kept in {aside}", flush=True)
    print(f"== {experiment}: {' '.join(command[1:] + extra)}", flush=True)
    if args.jobs == 1:
        result = subprocess.run(command + extra, cwd=REPO_ROOT)
    else:  # runs side by side: each one's output to its own file, not interleaved on the terminal
        experiment_dir.mkdir(parents=True, exist_ok=True)
        with open(experiment_dir / "train.log", "w") as log:
            result = subprocess.run(command + extra, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        where = "above" if args.jobs == 1 else f"in {experiment_dir / 'train.log'}"
        raise RuntimeError(f"the {experiment} run failed (exit {result.returncode}); its error is {where}")
    prediction = run_log.records(experiment_dir, "prediction" if segment_options is None else "pooled_prediction")[-1]
    if SCORES["f05"] not in prediction:
        raise RuntimeError(f"the {experiment} run's labelled tiles hold one class only: no threshold can be chosen on them")
    if seed == 0:  # with several segments, the first scored segment's image
        image = (experiment_dir / "labels_vs_prediction.png" if segment_options is None else
                 experiment_dir / "predictions" / f"{prediction['segments'][0]}_labels_vs_prediction.png")
        shutil.copyfile(image, args.output / f"{name}_{mode}.png")
    return {"encoder": name, "mode": mode, "seed": seed, **{key: prediction[field] for key, field in SCORES.items()},
            "threshold": prediction["validation_calibrated_threshold"],
            "best_epoch": [record for record in run_log.epochs(experiment_dir) if record["best"]][-1]["epoch"],  # scored
            "training_seconds": run_log.epochs(experiment_dir)[-1]["training_seconds"]}


def band_no_skill(segment_spec: str, run_dir: pathlib.Path) -> NoSkillBand:
    """The no-skill band of the held-out band a run was scored on (every run has the same), thresholds calibrated
    on the rest of the papyrus."""
    start = run_log.records(run_dir, "start")[0]
    segment = open_segment(segment_spec)
    ink_yx = segment.inklabels > 0
    band_yx = Box(**start["held_out"]).region_yx(ink_yx.shape) & segment.mask
    return no_skill_band(ink_yx, segment.mask & ~band_yx, band_yx)


def summarise(runs: list[dict], baseline: str) -> list[dict]:
    """Per encoder and mode: mean and min–max over seeds of each score, and the mean paired F0.5 and AUC differences
    from `baseline` (the same mode and seeds) with their intervals."""
    by_key = {(run["encoder"], run["mode"], run["seed"]): run for run in runs}
    rows = []
    for encoder, mode in dict.fromkeys((run["encoder"], run["mode"]) for run in runs):
        group = [run for run in runs if (run["encoder"], run["mode"]) == (encoder, mode)]
        row = {"encoder": encoder, "mode": mode, "seeds": len(group)}
        for key in (*SCORES, "training_seconds"):
            values = [run[key] for run in group]
            row.update({f"{key}_mean": float(np.mean(values)), f"{key}_min": min(values), f"{key}_max": max(values)})
        for key in ("f05", "auc"):
            paired = [run[key] - by_key[(baseline, mode, run["seed"])][key] for run in group
                      if (baseline, mode, run["seed"]) in by_key]
            mean, low, high = paired_interval(paired) if paired and encoder != baseline else (math.nan,) * 3
            row.update({f"{key}_difference": mean, f"{key}_difference_low": low, f"{key}_difference_high": high})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], baseline: str) -> str:
    lines = [f"| encoder | mode | seeds | F0.5 (calibrated threshold), mean (min – max) | F0.5 − {baseline} (95 % interval) "
             f"| AUC, mean (min – max) | AUC − {baseline} (95 % interval) | average precision | oracle F0.5 | "
             "training time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        differences = [("–" if math.isnan(row[f"{key}_difference"]) else
                        f"{row[f'{key}_difference']:+.3f} ({describe_interval(row[f'{key}_difference_low'], row[f'{key}_difference_high'])})")
                       for key in ("f05", "auc")]
        lines.append(f"| {row['encoder']} | {row['mode']} | {row['seeds']} | {row['f05_mean']:.3f} ({row['f05_min']:.3f} – "
                     f"{row['f05_max']:.3f}) | {differences[0]} | {row['auc_mean']:.3f} ({row['auc_min']:.3f} – "
                     f"{row['auc_max']:.3f}) | {differences[1]} | {row['average_precision_mean']:.3f} | "
                     f"{row['f05_oracle_mean']:.3f} | {row['training_seconds_mean'] / 60:.1f} min |")
    return "\n".join(lines)


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, table.getvalue().encode())


def probe_parser(doc: str = __doc__) -> argparse.ArgumentParser:
    """The options of every command that probes each encoder (this one, evaluate/transfer.py), described by its
    `doc`: the encoders and their names, the input options, seeds and --jobs; settings after `--` go to every
    finetune/train.py run."""
    parser = errors.ArgumentParser(description=doc.split("\n\n")[0].replace("\n", " "),
                                     epilog="Settings after `--` go to every finetune/train.py run (-- --NUM_EPOCHS 6).",
                                     formatter_class=encoder_input.HelpFormatter)
    parser.add_argument("--pretrained_path", "--encoders", nargs="+", required=True, action=RenamedOption,
                        help="encoder checkpoints (any kind), or 'random' (--encoders: its older name)")
    parser.add_argument("--names", nargs="*", help="a short name per encoder for the table (default: file names)")
    encoder_input.add_input_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1: finetune/train.py's SEED, the same for every encoder")
    parser.add_argument("--jobs", type=ranges.ranged(int, ranges.AT_LEAST_1), default=1,
                        help="runs at a time (on one GPU, several small runs keep it busier than one); with more than "
                             "one, each run's output goes to its train.log")
    return parser


def check_probe_arguments(args: argparse.Namespace) -> None:
    """probe_parser's options checked, and the encoders named (args.names)."""
    if args.seeds < 1:
        raise encoder_input.EvaluationError(f"--seeds {args.seeds}: at least 1 seed is needed")
    encoder_input.name_encoders(args)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = probe_parser()
    encoder_input.add_segment_argument(parser, "segment spec (ID, zarr, layer folder, demo[:seed])")
    parser.add_argument("--full_finetune", action="store_true", help="also fine-tune every encoder fully")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/encoder_evaluation"),
                        help="folder for the table, the images and the runs")
    args = parser.parse_args(argv)
    check_probe_arguments(args)
    args.segment = encoder_input.segment_for_runs(args.segment)
    return args


def main() -> int:
    own, extra = encoder_input.split_at_double_dash(sys.argv[1:])
    args = parse_args(own)
    settings = encoder_input.common_settings(args.pretrained_path, args)  # checks every file exists and reads
    args.output.mkdir(parents=True, exist_ok=True)

    modes = ["probe", "finetune"] if args.full_finetune else ["probe"]
    planned = [(name, checkpoint, mode, seed) for mode in modes for seed in range(args.seeds)
               for name, checkpoint in zip(args.names, args.pretrained_path)]
    try:  # --jobs at a time; once one fails, no other starts
        runs = list(encoder_input.side_by_side(lambda run: run_finetune(*run, settings, args, extra), planned, args.jobs))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    baseline = "random" if "random" in args.names else args.names[0]
    rows = summarise(runs, baseline)
    table = markdown_table(rows, baseline)
    band = band_no_skill(args.segment, args.output / "runs" / f"{args.names[0]}_{modes[0]}_seed0")
    description = (f"segment {args.segment}, input {settings.describe()}, seeds 0–{args.seeds - 1}, extra settings: "
                   f"{' '.join(extra) or 'none'}; F0.5 on the held-out band at the threshold best on the labelled tiles "
                   f"trained on. No-skill band of the held-out band: {band.describe()}")
    write_bytes_atomic(args.output / "no_skill_band.json", json.dumps(dataclasses.asdict(band), indent=1).encode())
    write_bytes_atomic(args.output / "encoders.md", f"{description}\n\n{table}\n".encode())
    write_csv(args.output / "encoders.csv", rows)
    write_csv(args.output / "runs.csv", runs)
    tensorboard = TensorboardLogger(args.output / "tensorboard_logs")
    tensorboard.text("encoders", f"{description}\n\n{table}")
    for index, row in enumerate(rows):
        tensorboard.scalars(index, **{f"{row['mode']}__{row['encoder']}__f05": row["f05_mean"],
                                      f"{row['mode']}__{row['encoder']}__auc": row["auc_mean"]})
    tensorboard.close()
    print(f"\n{description}\n\n{table}\n\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
