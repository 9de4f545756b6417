"""The pilot behind evaluate/label_efficiency.py's step budget: F0.5 and AUC far from the labels against the training
steps of each run, for random and a pretrained encoder, at a few glyph counts and seeds.

    python benchmarks/curve_steps.py --pretrained_path experiments/report/spark/epochs/resnet50_3d_narrow_timm_style_ep004.pth \
        --epochs 4 8 16 --glyphs 1 2 --seeds 3 --output experiments/curve_steps --plot images/curve_steps.png

Each budget is one evaluate/label_efficiency.py command (--run_epochs E of --run_tiles_per_epoch tiles: each run has
its own schedule, warm-up and cosine decay, as a run of that budget would), into --output/epochs_E; the runs are
reused by content, so a second sitting adds budgets or seeds to the first. Then, per encoder, glyph count and budget:
the mean F0.5 and AUC over seeds, the paired change from the budget before (same seeds, same glyphs; 95 % t interval)
and the CPU seconds per run; written to --output/curve_steps.md and .json, and the plot.
"""
import argparse
import csv
import io
import json
import pathlib
import subprocess
import sys

import numpy as np

from evaluate.statistics import paired_interval
from pretrain.utils import errors
from pretrain.utils.misc import write_bytes_atomic

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_path", required=True, help="the pretrained encoder beside random")
    parser.add_argument("--name", default="spark", help="its name in the tables")
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 8, 16], help="budgets: NUM_EPOCHS of each run")
    parser.add_argument("--tiles_per_epoch", type=int, default=128, help="MIN_TILES_PER_EPOCH of each run")
    parser.add_argument("--glyphs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--segment_id", default="demo")
    parser.add_argument("--tile_size", type=int, default=64, help="fine-tuning's tile side (evaluate/report.py's "
                        "--finetune_tile_size), whatever the encoder was pretrained on")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/curve_steps"))
    parser.add_argument("--plot", type=pathlib.Path, default=pathlib.Path("images/curve_steps.png"))
    return parser.parse_args()


def run_budget(args, epochs: int) -> list[dict]:
    output = args.output / f"epochs_{epochs}"
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--pretrained_path", "random",
               args.pretrained_path, "--names", "random", args.name, "--segment_id", args.segment_id, "--glyphs",
               *map(str, args.glyphs), "--seeds", str(args.seeds), "--tile_size", str(args.tile_size), "--run_epochs", str(epochs), "--run_tiles_per_epoch",
               str(args.tiles_per_epoch), "--output", str(output)]
    print("+", " ".join(command[1:]), flush=True)
    with open(args.output / f"epochs_{epochs}.log", "w") as log:
        subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return [{**row, "epochs": epochs} for row in csv.DictReader(open(output / "runs.csv"))]


def summarise(runs: list[dict], tiles_per_epoch: int) -> list[dict]:
    by_key = {(run["encoder"], int(run["glyphs"]), run["epochs"], int(run["seed"])): run for run in runs}
    rows = []
    for encoder, glyphs in sorted({key[:2] for key in by_key}):
        budgets = sorted({key[2] for key in by_key if key[:2] == (encoder, glyphs)})
        for index, epochs in enumerate(budgets):
            seeds = sorted(key[3] for key in by_key if key[:3] == (encoder, glyphs, epochs))
            runs_here = [by_key[(encoder, glyphs, epochs, seed)] for seed in seeds]
            row = {"encoder": encoder, "glyphs": glyphs, "epochs": epochs, "steps": -(-tiles_per_epoch // 8) * epochs,
                   "seeds": len(seeds), "cpu_seconds": float(np.mean([float(run["cpu_seconds"]) for run in runs_here]))}
            for score in ("f05", "auc"):
                row[score] = float(np.mean([float(run[score]) for run in runs_here]))
                if index:  # the paired change from the budget before, on the seeds both have
                    before = budgets[index - 1]
                    common = [seed for seed in seeds if (encoder, glyphs, before, seed) in by_key]
                    row[f"{score}_change"] = paired_interval(
                        [float(by_key[(encoder, glyphs, epochs, seed)][score]) - float(by_key[(encoder, glyphs, before, seed)][score])
                         for seed in common])
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| encoder | glyphs | steps | seeds | F0.5 | change from the budget before (95 % interval) | AUC | change "
             "(95 % interval) | CPU-s per run |", "|---|---|---|---|---|---|---|---|---|"]

    def change(row, score):
        if f"{score}_change" not in row:
            return "–"
        mean, low, high = row[f"{score}_change"]
        return f"{mean:+.3f} ({low:+.3f} to {high:+.3f})" if np.isfinite(low) else f"{mean:+.3f} (one seed)"

    for row in rows:
        lines.append(f"| {row['encoder']} | {row['glyphs']} | {row['steps']} | {row['seeds']} | {row['f05']:.3f} | "
                     f"{change(row, 'f05')} | {row['auc']:.3f} | {change(row, 'auc')} | {row['cpu_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for encoder, glyphs in sorted({(row["encoder"], row["glyphs"]) for row in rows}):
        curve = [row for row in rows if (row["encoder"], row["glyphs"]) == (encoder, glyphs)]
        for axis, score in zip(axes, ("f05", "auc")):
            axis.plot([row["steps"] for row in curve], [row[score] for row in curve], marker="o",
                      linestyle="-" if encoder == "random" else "--", label=f"{encoder}, {glyphs} glyph(s)")
    for axis, label in zip(axes, ("F0.5 far from the labels (mean over seeds)", "AUC (mean over seeds)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training steps per run (batch 8)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=80)
    plt.close(figure)
    write_bytes_atomic(path, image.getvalue())


def main() -> int:
    args = parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    runs = [run for epochs in args.epochs for run in run_budget(args, epochs)]
    rows = summarise(runs, args.tiles_per_epoch)
    table = markdown(rows)
    write_bytes_atomic(args.output / "curve_steps.md", table.encode())
    write_bytes_atomic(args.output / "curve_steps.json", json.dumps(rows, indent=1).encode())
    plot(rows, args.plot)
    print(table)
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
