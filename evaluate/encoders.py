"""Which encoder sees ink? One command, identical settings for every encoder: the frozen-encoder probe
(and optionally full fine-tuning) on the same segment, split, seed and schedule.

    python evaluate/encoders.py --encoders random experiments/spark_demo/resnet50_3d_timm_style.pth \
        experiments/vicreg_demo/resnet50_3d_timm_style.pth --names random spark vicreg
    python evaluate/encoders.py --encoders random r3d50_KM_200ep.pth --names random kinetics --model resnet50_3d \
        --full_finetune -- --NUM_EPOCHS 6           # after "--": settings passed to every finetune/train.py run

Each encoder is one `finetune/train.py` run (scheme "validation", `freeze_encoder=True` for the probe), so
the probe is exactly the fine-tuning model and pipeline. `random` means no pretrained weights (the seeded
random initialisation every run shares). Every run reads tiles the same way: as the checkpoints record they
were trained (they must agree; `random` follows them), or as the input options say. Results come from each
run's log.jsonl: the epoch of lowest validation loss (the `best` checkpoint) gives F0.5 at its best threshold,
AUC and the loss; training time is the sum of epoch times. Writes `encoders.md`, `encoders.csv`, one
labels-vs-prediction image per encoder and mode, and a TensorBoard summary, into `--output`.
"""
import argparse
import csv
import io
import json
import pathlib
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from evaluate import encoder_input  # noqa: E402
from pretrain.data.patches import InputSettings  # noqa: E402
from pretrain.utils.misc import TensorboardLogger, write_bytes_atomic  # noqa: E402

COLUMNS = ["encoder", "mode", "val_f05", "val_threshold", "val_auc", "val_iou", "val_loss", "best_epoch",
           "training_seconds"]


def input_overrides(settings: InputSettings) -> list[str]:
    """finetune/train.py settings that make a run read tiles as `settings` say."""
    return ["--MODEL", settings.model, "--DEPTH", str(settings.depth), "--DEPTH_OFFSET", str(settings.depth_offset),
            "--FOLLOW_SURFACE", str(settings.follow_surface), "--NORMALIZATION", settings.normalization,
            "--TILE_SIZE", str(settings.tile_size)]


def run_finetune(name: str, checkpoint: str, mode: str, settings: InputSettings, args, extra: list[str]) -> dict:
    """One finetune/train.py run; returns its best epoch's validation metrics (or raises with its error line)."""
    experiment = f"{name}_{mode}"
    command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--exp_name", experiment,
               "--OUTPUT_DIR", str(args.output / "runs"), "--scheme", "validation", "--segment_id", args.segment,
               "--SEED", str(args.seed), "--freeze_encoder", str(mode == "probe"), *input_overrides(settings)]
    if checkpoint != "random":
        command += ["--pretrained_path", checkpoint]
    print(f"== {experiment}: {' '.join(command[1:] + extra)}", flush=True)
    result = subprocess.run(command + extra, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"the {experiment} run failed (exit {result.returncode}); its error is printed above")
    experiment_dir = args.output / "runs" / experiment
    records = [json.loads(line) for line in (experiment_dir / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record["event"] == "epoch"]
    best = min(epochs, key=lambda record: record["val_loss"])
    shutil.copyfile(experiment_dir / "labels_vs_prediction.png", args.output / f"{experiment}.png")
    return {"encoder": name, "mode": mode, "best_epoch": best["epoch"], "training_seconds": epochs[-1]["training_seconds"],
            **{column: best[column] for column in COLUMNS if column.startswith("val_")}}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| encoder | mode | val F0.5 (threshold) | val AUC | val IoU | val loss | best epoch | training time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['encoder']} | {row['mode']} | {row['val_f05']:.3f} ({row['val_threshold']:.2f}) | "
                     f"{row['val_auc']:.3f} | {row['val_iou']:.3f} | {row['val_loss']:.4f} | {row['best_epoch']} | "
                     f"{row['training_seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=encoder_input.HelpFormatter)
    parser.add_argument("--encoders", nargs="+", required=True, help="encoder checkpoints (any kind), or 'random'")
    parser.add_argument("--names", nargs="*", help="a short name per encoder for the table (default: file names)")
    parser.add_argument("--segment", default="demo", help="segment spec (ID, zarr, layer folder, demo[:seed])")
    encoder_input.add_input_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="finetune/train.py's SEED for every run")
    parser.add_argument("--full_finetune", action="store_true", help="also fine-tune every encoder fully")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/encoder_evaluation"),
                        help="folder for the table, the images and the runs")
    args = parser.parse_args(argv)
    encoder_input.name_encoders(args, ("random",))
    return args


def main() -> int:
    own, extra = encoder_input.split_at_double_dash(sys.argv[1:])
    args = parse_args(own)
    settings = encoder_input.common_settings(args.encoders, args)  # checks every file exists and reads
    args.output.mkdir(parents=True, exist_ok=True)

    modes = ["probe", "finetune"] if args.full_finetune else ["probe"]
    rows = []
    try:
        for mode in modes:
            for name, checkpoint in zip(args.names, args.encoders):
                rows.append(run_finetune(name, checkpoint, mode, settings, args, extra))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = markdown_table(rows)
    description = (f"segment {args.segment}, input {settings.describe()}, seed {args.seed}, extra settings: "
                   f"{' '.join(extra) or 'none'}")
    write_bytes_atomic(args.output / "encoders.md", f"{description}\n\n{table}\n".encode())
    csv_text = io.StringIO()
    writer = csv.DictWriter(csv_text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(args.output / "encoders.csv", csv_text.getvalue().encode())
    tensorboard = TensorboardLogger(args.output / "tensorboard_logs")
    tensorboard.text("encoders", f"{description}\n\n{table}")
    for index, row in enumerate(rows):
        tensorboard.scalars(index, **{f"{row['mode']}__{row['encoder']}__val_f05": row["val_f05"],
                                      f"{row['mode']}__{row['encoder']}__val_auc": row["val_auc"]})
    tensorboard.close()
    print(f"\n{description}\n\n{table}\n\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    encoder_input.exit_on_user_error(main)
