"""Which encoder sees ink? One command, identical settings for every encoder: the frozen-encoder probe
(and optionally full fine-tuning) on the same segment, split, seed and schedule.

    python evaluate/encoders.py --encoders random experiments/spark_demo/resnet50_3d_timm_style.pth \
        experiments/vicreg_demo/resnet50_3d_timm_style.pth --names random spark vicreg --MODEL resnet50_3d
    python evaluate/encoders.py --encoders random r3d50_KM_200ep.pth --names random kinetics --full_finetune \
        -- --NUM_EPOCHS 6 --TILE_SIZE 96           # after "--": settings passed to every finetune/train.py run

Each encoder is one `finetune/train.py` run (scheme "validation", `freeze_encoder=True` for the probe), so
the probe is exactly the fine-tuning model and pipeline. `random` means no pretrained weights (the seeded
random initialisation every run shares). Results come from each run's log.jsonl: the epoch of lowest
validation loss (the `best` checkpoint) gives F0.5 at its best threshold, AUC and the loss; training time
is the sum of epoch times. Writes `encoders.md`, `encoders.csv`, one labels-vs-prediction image per
encoder and mode, and a TensorBoard summary, into `--output`.
"""
import argparse
import csv
import json
import pathlib
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pretrain.utils.misc import TensorboardLogger  # noqa: E402

COLUMNS = ["encoder", "mode", "val_f05", "val_threshold", "val_auc", "val_iou", "val_loss", "best_epoch",
           "training_seconds"]


def run_finetune(name: str, checkpoint: str, mode: str, args, extra: list[str]) -> dict:
    """One finetune/train.py run; returns its best epoch's validation metrics (or raises with its error line)."""
    experiment = f"{name}_{mode}"
    command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--exp_name", experiment,
               "--OUTPUT_DIR", str(args.output / "runs"), "--scheme", "validation", "--segment_id", args.segment,
               "--MODEL", args.MODEL, "--SEED", str(args.SEED), "--freeze_encoder", str(mode == "probe")]
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


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoders", nargs="+", required=True, help="encoder checkpoints (any kind), or 'random'")
    parser.add_argument("--names", nargs="*", help="a short name per encoder for the table (default: file names)")
    parser.add_argument("--segment", default="demo")
    parser.add_argument("--MODEL", default="resnet50_3d", help="the encoder architecture every checkpoint holds")
    parser.add_argument("--SEED", type=int, default=0)
    parser.add_argument("--full_finetune", action="store_true", help="also fine-tune every encoder fully")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/encoder_evaluation"))
    args = parser.parse_args(argv)
    names = args.names or [pathlib.Path(path).stem if path != "random" else "random" for path in args.encoders]
    if len(names) != len(args.encoders):
        parser.error(f"{len(names)} names for {len(args.encoders)} encoders")
    for path in args.encoders:
        if path != "random" and not pathlib.Path(path).is_file():
            parser.error(f"encoder checkpoint {path} does not exist")
    args.output.mkdir(parents=True, exist_ok=True)

    modes = ["probe", "finetune"] if args.full_finetune else ["probe"]
    rows = []
    try:
        for mode in modes:
            for name, checkpoint in zip(names, args.encoders):
                rows.append(run_finetune(name, checkpoint, mode, args, extra))
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    table = markdown_table(rows)
    settings = f"segment {args.segment}, MODEL {args.MODEL}, seed {args.SEED}, extra settings: {' '.join(extra) or 'none'}"
    (args.output / "encoders.md").write_text(f"{settings}\n\n{table}\n")
    with open(args.output / "encoders.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tensorboard = TensorboardLogger(args.output / "tensorboard_logs")
    tensorboard.text("encoders", f"{settings}\n\n{table}")
    for index, row in enumerate(rows):
        tensorboard.scalars(index, **{f"{row['mode']}__{row['encoder']}__val_f05": row["val_f05"],
                                      f"{row['mode']}__{row['encoder']}__val_auc": row["val_auc"]})
    tensorboard.close()
    print(f"\n{settings}\n\n{table}\n\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
