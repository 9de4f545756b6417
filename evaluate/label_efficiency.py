"""Does pretraining let a researcher find ink with fewer labels? Few-label fine-tuning curves: for each encoder,
fine-tune from k labelled glyphs (k = 1, 2, 4, 8 by default) with several seeds, and score the prediction on
papyrus far from every labelled glyph.

    python evaluate/label_efficiency.py --encoders scratch experiments/report/spark/resnet50_3d_narrow_timm_style.pth \
        experiments/report/vicreg/resnet50_3d_narrow_timm_style.pth --names scratch spark vicreg
    python evaluate/label_efficiency.py --encoders scratch spark.pth --modes full lpft -- --NUM_EPOCHS 10

This is how self-supervised encoders are judged (fine-tuning with 1 % or 10 % of the labels against training from
scratch), and what a Vesuvius researcher does: label a letter or two, train, predict, refine.
- **Glyphs** are the connected components of the segment's ink labels (of at least --min_glyph_pixels) that lie
  wholly in the labelling part: the first --label_part of the segment along its longer side. Seed s draws an order
  of them; the k glyphs of seed s are the first k of that order, so each seed's sets grow with k.
- **Scoring**: the papyrus in the last --score_part of the segment along its longer side, at least
  (1 − --label_part − --score_part) of the segment away from every glyph that could be labelled (the same region
  for every k, seed and encoder); F0.5 at its best threshold and AUC, computed from the prediction PNG a run writes.
- **Runs**: each is one `finetune/train.py` run in scheme "iterative" (with data augmentation, which few labels
  need) from the glyph label image, with SEED = the seed; `scratch` is random initialisation; `full` fine-tunes
  everything, `lpft` first trains the decoder on the frozen encoder for --lp_epochs epochs (LP-FT). Every run reads
  tiles as the checkpoints record (they must agree; scratch follows them), or as the input options say. Everything
  after `--` goes to every run.
- **Partial labels and self-training**: `--negatives on` adds runs whose glyphs come with the negatives a labeler would
  paint around them (the papyrus within NEGATIVES_REACH pixels that the labels call not ink, kept off any ink), so
  that the rest of the segment is unknown rather than background; `--self_training_rounds N` runs N pseudo-label
  rounds after each, and every round's prediction is scored (the arms read "full, negatives, round 2").
Writes to --output: `label_efficiency.md`, `.csv` and `.json` (mean and min–max over seeds of F0.5 and AUC, per
encoder, mode and k, training time, and the verdict), `label_efficiency.png` (F0.5 against the number of labelled glyphs, the seed spread
shaded), `runs.csv` (every run), and per run `runs/<name>/` with its label image, prediction.png and result.json.
A rerun reuses every finished run.
"""
import argparse
import csv
import dataclasses
import io
import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from evaluate import encoder_input  # noqa: E402
from evaluate.encoders import input_overrides  # noqa: E402
from finetune.metrics import all_ink_f05, ink_metrics  # noqa: E402
from finetune.outputs import write_png_atomic  # noqa: E402
from pretrain.data.patches import InputSettings  # noqa: E402
from pretrain.data.segment import Segment, open_segment  # noqa: E402
from pretrain.utils.misc import write_bytes_atomic  # noqa: E402

SCRATCH = ("scratch", "random")  # names that mean: no pretrained weights
GOAL_MARGIN = 0.05  # F0.5 over scratch that counts as "finds ink with fewer labels"
GOAL_MAX_GLYPHS = 4
NEGATIVES_REACH = 32  # pixels around a labelled glyph that a simulated labeler paints as not ink
NEGATIVES_CLEARANCE = 3  # pixels the painted negatives keep off any ink


@dataclasses.dataclass(frozen=True)
class Regions:
    """Where glyphs may be labelled and where predictions are scored, as (Y, X) bool maps, and their description."""

    label_yx: np.ndarray
    score_yx: np.ndarray
    description: str
    chance_f05: float  # F0.5 of calling every scored pixel ink


def regions(segment: Segment, label_part: float, score_part: float) -> Regions:
    """The first `label_part` of the segment along its longer side for labelling, its last `score_part` (papyrus
    only) for scoring."""
    height, width = segment.shape[1:]
    along_x = width >= height
    length = width if along_x else height
    label_end, score_start = int(label_part * length), int((1 - score_part) * length)
    if score_start <= label_end:
        raise encoder_input.EvaluationError(f"--label_part {label_part} and --score_part {score_part} overlap: "
                                            "they must leave a gap between labels and scoring")
    label_yx, score_yx = np.zeros((height, width), bool), np.zeros((height, width), bool)
    axis = "x" if along_x else "y"
    if along_x:
        label_yx[:, :label_end], score_yx[:, score_start:] = True, True
    else:
        label_yx[:label_end], score_yx[score_start:] = True, True
    score_yx &= segment.mask
    chance_f05 = all_ink_f05(float((segment.inklabels[score_yx] > 0).mean()))
    description = (f"glyphs labelled at {axis} < {label_end}, predictions scored on the papyrus at {axis} ≥ "
                   f"{score_start}, {score_start - label_end} pixels away (chance there, calling every pixel ink: "
                   f"F0.5 {chance_f05:.3f})")
    return Regions(label_yx, score_yx, description, chance_f05)


def glyphs(inklabels_yx: np.ndarray, label_yx: np.ndarray, min_pixels: int) -> list[np.ndarray]:
    """The connected components of the ink labels (8-connected) that lie wholly in the labelling part and have at
    least `min_pixels` pixels, as (N, 2) (y, x) pixel lists in reading order."""
    count, components_yx, statistics, _ = cv2.connectedComponentsWithStats(inklabels_yx.astype(np.uint8), connectivity=8)
    found = []
    for component in range(1, count):
        pixels = np.argwhere(components_yx == component)
        if len(pixels) >= min_pixels and label_yx[pixels[:, 0], pixels[:, 1]].all():
            found.append(pixels)
    return found


def glyph_labels(all_glyphs: list[np.ndarray], shape_yx: tuple[int, int], seed: int, count: int) -> np.ndarray:
    """(Y, X) uint8 0/255: the first `count` glyphs of seed's order."""
    order = np.random.default_rng(seed).permutation(len(all_glyphs))
    labels_yx = np.zeros(shape_yx, np.uint8)
    for index in order[:count]:
        labels_yx[all_glyphs[index][:, 0], all_glyphs[index][:, 1]] = 255
    return labels_yx


def painted_negatives(glyph_labels_yx: np.ndarray, inklabels_yx: np.ndarray, mask_yx: np.ndarray) -> np.ndarray:
    """(Y, X) uint8 0/255: what a labeler would paint as not ink around the labelled glyphs: the papyrus within
    NEGATIVES_REACH pixels of them that the segment's labels call not ink, kept NEGATIVES_CLEARANCE pixels off any
    ink (a brush does not touch the next letter's strokes)."""
    near_yx = cv2.dilate((glyph_labels_yx > 0).astype(np.uint8), np.ones((2 * NEGATIVES_REACH + 1,) * 2, np.uint8)) > 0
    ink_yx = cv2.dilate((inklabels_yx > 0).astype(np.uint8), np.ones((2 * NEGATIVES_CLEARANCE + 1,) * 2, np.uint8)) > 0
    return (near_yx & mask_yx & ~ink_yx).astype(np.uint8) * 255


def run_command(run: dict, args, settings: InputSettings, extra: list[str], folder: pathlib.Path) -> list[str]:
    command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--exp_name", run["name"],
               "--OUTPUT_DIR", str(args.output / "runs"), "--segment_id", args.segment, "--scheme", "iterative",
               "--inklabel_path", str(folder / f"glyphs_k{run['glyphs']}_seed{run['seed']}.png"),
               "--data_augmentation", "True", "--SEED", str(run["seed"]), *input_overrides(settings)]
    if run["negatives"]:
        command += ["--negatives_path", str(folder / f"negatives_k{run['glyphs']}_seed{run['seed']}.png")]
    if run["checkpoint"] not in SCRATCH:
        command += ["--pretrained_path", run["checkpoint"]]
    if run["mode"] == "lpft":
        command += ["--FREEZE_ENCODER_EPOCHS", str(args.lp_epochs)]
    if args.self_training_rounds:
        command += ["--SELF_TRAINING_ROUNDS", str(args.self_training_rounds)]
    return command + extra


def run_one(run: dict, args, settings: InputSettings, extra: list[str], segment: Segment, scoring: Regions,
            all_glyphs: list[np.ndarray]) -> list[dict]:
    """One fine-tuning run (or its earlier results, when it finished with the same command), scored: one result,
    or one per round with self-training."""
    folder = args.output / "runs" / run["name"]
    command = run_command(run, args, settings, extra, folder)
    result_path = folder / "result.json"
    if result_path.is_file():
        earlier = json.loads(result_path.read_text())
        if earlier["command"][1:] != command[1:]:
            raise encoder_input.EvaluationError(f"{folder} was run with other settings ({' '.join(earlier['command'][1:])});"
                                                " use another --output")
        return [{key: value for key, value in earlier.items() if key not in ("command", "later_rounds")},
                *earlier.get("later_rounds", [])]
    folder.mkdir(parents=True, exist_ok=True)
    glyphs_yx = glyph_labels(all_glyphs, segment.shape[1:], run["seed"], run["glyphs"])
    write_png_atomic(folder / f"glyphs_k{run['glyphs']}_seed{run['seed']}.png", glyphs_yx)
    if run["negatives"]:
        write_png_atomic(folder / f"negatives_k{run['glyphs']}_seed{run['seed']}.png",
                         painted_negatives(glyphs_yx, segment.inklabels, segment.mask))
    with open(folder / "train.log", "w") as log:
        finished = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        tail = (folder / "train.log").read_text().strip().splitlines()[-1:]
        raise encoder_input.EvaluationError(f"run {run['name']} failed: {' '.join(tail)} (whole log: {folder / 'train.log'})")
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    results = []
    for self_training_round in range(args.self_training_rounds + 1):
        prediction = folder / (f"round_{self_training_round + 1:02d}" if args.self_training_rounds else "") / "prediction.png"
        prediction_yx = cv2.imread(str(prediction), cv2.IMREAD_UNCHANGED) / 255.0
        metrics = ink_metrics(prediction_yx[scoring.score_yx], segment.inklabels[scoring.score_yx])
        epochs = [record for record in records
                  if record["event"] == "epoch" and record.get("round", 1) == self_training_round + 1]
        results.append({**{key: run[key] for key in ("name", "encoder", "glyphs", "seed")},
                        "mode": arm(run["mode"], run["negatives"], self_training_round if args.self_training_rounds else None),
                        "round": self_training_round, "f05": metrics.f05, "threshold": metrics.threshold,
                        "auc": metrics.auc, "scored_pixels": metrics.pixels,
                        "labelled_pixels": int((glyphs_yx > 0).sum()), "prediction": str(prediction),
                        "training_seconds": epochs[-1]["training_seconds"]})
    write_bytes_atomic(result_path, json.dumps({**results[0], "command": command, "later_rounds": results[1:]},
                                               indent=1).encode())
    return results


def arm(mode: str, negatives: bool, self_training_round: int | None) -> str:
    """How a curve was trained, as its label: "full", "lpft", with ", negatives" and ", round N" as they apply."""
    return mode + (", negatives" if negatives else "") + (f", round {self_training_round}"
                                                           if self_training_round is not None else "")


def summarise(results: list[dict]) -> list[dict]:
    """Mean and min–max over seeds of F0.5, AUC and training time, per encoder, mode and number of glyphs."""
    groups = {}
    for result in results:
        groups.setdefault((result["encoder"], result["mode"], result["glyphs"]), []).append(result)
    rows = []
    for (encoder, mode, count), group in groups.items():
        row = {"encoder": encoder, "mode": mode, "glyphs": count, "seeds": len(group)}
        for key in ("f05", "auc", "training_seconds"):
            values = [result[key] for result in group]
            row.update({f"{key}_mean": float(np.mean(values)), f"{key}_min": min(values), f"{key}_max": max(values)})
        rows.append(row)
    return rows


def verdict(rows: list[dict], chance_f05: float) -> str:
    """Whether a pretrained encoder beats scratch (same mode) by GOAL_MARGIN F0.5 with at most GOAL_MAX_GLYPHS
    glyphs, beyond the seed spread (its worst seed above scratch's best); each win names its worst seed and chance,
    because a win over a scratch that stayed at chance can rest on a worst seed that is barely above it."""
    by_key = {(row["encoder"], row["mode"], row["glyphs"]): row for row in rows}
    wins, closest = [], None
    for (encoder, mode, count), row in by_key.items():
        scratch = next((by_key[(name, mode, count)] for name in SCRATCH if (name, mode, count) in by_key), None)
        if encoder in SCRATCH or scratch is None or count > GOAL_MAX_GLYPHS:
            continue
        gain = row["f05_mean"] - scratch["f05_mean"]
        if gain >= GOAL_MARGIN and row["f05_min"] > scratch["f05_max"]:
            wins.append(f"{encoder} ({mode}) with {count} glyph(s): {gain:+.3f} (worst seed {row['f05_min']:.3f}, "
                        f"scratch's best {scratch['f05_max']:.3f}, chance {chance_f05:.3f})")
        if closest is None or gain > closest[0]:
            closest = (gain, f"{encoder} ({mode}) with {count} glyph(s)")
    if wins:
        return f"**Yes**: beyond the seed spread, by at least {GOAL_MARGIN} F0.5 — " + "; ".join(wins) + "."
    if closest is None:
        return "Not measured: the runs hold no pretrained encoder and scratch in the same mode."
    return (f"**No**: no pretrained encoder beats scratch by {GOAL_MARGIN} F0.5 or more beyond the seed spread with at "
            f"most {GOAL_MAX_GLYPHS} glyphs; the largest mean gain is {closest[0]:+.3f} ({closest[1]}).")


def markdown(rows: list[dict], description: str, chance_f05: float) -> str:
    counts = sorted({row["glyphs"] for row in rows})
    lines = [description, "", "F0.5 at the best threshold (mean over seeds, min – max), then AUC, on the scoring region:",
             "", "| encoder | mode | " + " | ".join(f"{count} glyph(s)" for count in counts) + " | training time per run |",
             "|---|---|" + "---|" * len(counts) + "---|"]
    curves = {}
    for row in rows:
        curves.setdefault((row["encoder"], row["mode"]), {})[row["glyphs"]] = row
    for (encoder, mode), by_count in curves.items():
        cells = [f"{by_count[count]['f05_mean']:.3f} ({by_count[count]['f05_min']:.3f} – {by_count[count]['f05_max']:.3f})"
                 if count in by_count else "–" for count in counts]
        minutes = np.mean([row["training_seconds_mean"] for row in by_count.values()]) / 60
        lines.append(f"| {encoder} | {mode} | " + " | ".join(cells) + f" | {minutes:.1f} min |")
    lines += ["", "| encoder | mode | " + " | ".join(f"AUC, {count}" for count in counts) + " |",
              "|---|---|" + "---|" * len(counts)]
    for (encoder, mode), by_count in curves.items():
        cells = [f"{by_count[count]['auc_mean']:.3f} ({by_count[count]['auc_min']:.3f} – {by_count[count]['auc_max']:.3f})"
                 if count in by_count else "–" for count in counts]
        lines.append(f"| {encoder} | {mode} | " + " | ".join(cells) + " |")
    lines += ["", f"Does a pretrained encoder find ink with fewer labels? {verdict(rows, chance_f05)}", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    curves = {}
    for row in rows:
        curves.setdefault(f"{row['encoder']} ({row['mode']})", []).append(row)
    for label, curve in curves.items():
        curve = sorted(curve, key=lambda row: row["glyphs"])
        counts = [row["glyphs"] for row in curve]
        line, = axes.plot(counts, [row["f05_mean"] for row in curve], marker="o", label=label)
        axes.fill_between(counts, [row["f05_min"] for row in curve], [row["f05_max"] for row in curve],
                          color=line.get_color(), alpha=0.2)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted({row["glyphs"] for row in rows}), [str(count) for count in sorted({row["glyphs"] for row in rows})])
    axes.set_xlabel("labelled glyphs")
    axes.set_ylabel("F0.5 far from the labels")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, image.getvalue())


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, table.getvalue().encode())


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=encoder_input.HelpFormatter)
    parser.add_argument("--encoders", nargs="+", required=True, help="'scratch' or encoder checkpoints (any kind)")
    parser.add_argument("--names", nargs="*", help="a short name per encoder (default: file names)")
    parser.add_argument("--segment", default="demo", help="segment spec with ink labels (ID, zarr, layer folder, demo)")
    encoder_input.add_input_arguments(parser)
    parser.add_argument("--glyphs", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of labelled glyphs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … n-1: glyph choice and fine-tuning SEED")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=["full", "lpft"],
                        help="full fine-tuning, and/or LP-FT (frozen encoder first, then everything)")
    parser.add_argument("--lp_epochs", type=int, default=5, help="LP-FT: epochs with the encoder frozen")
    parser.add_argument("--negatives", nargs="+", default=["off"], choices=["off", "on"],
                        help="also (or only) runs whose glyphs come with painted negatives around them, the rest unknown")
    parser.add_argument("--self_training_rounds", type=int, default=0,
                        help="SELF_TRAINING_ROUNDS of every run; each round's prediction is scored")
    parser.add_argument("--label_part", type=float, default=0.4, help="fraction of the longer side where glyphs are labelled")
    parser.add_argument("--score_part", type=float, default=0.5, help="fraction of the longer side, at its far end, scored")
    parser.add_argument("--min_glyph_pixels", type=int, default=200, help="smaller components are not glyphs (specks)")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/label_efficiency"),
                        help="folder for the tables, the plot and the runs")
    args = parser.parse_args(argv)
    encoder_input.name_encoders(args, SCRATCH)
    return args


def main() -> int:
    own, extra = encoder_input.split_at_double_dash(sys.argv[1:])
    args = parse_args(own)
    pretrained = [path for path in args.encoders if path not in SCRATCH]
    settings = encoder_input.common_settings(pretrained or ["random"], args)
    segment = open_segment(args.segment)
    if segment.inklabels is None:
        raise encoder_input.EvaluationError(f"segment {segment.name} has no ink labels to draw glyphs from and score with")
    scoring = regions(segment, args.label_part, args.score_part)
    all_glyphs = glyphs(segment.inklabels, scoring.label_yx, args.min_glyph_pixels)
    if len(all_glyphs) < max(args.glyphs):
        raise encoder_input.EvaluationError(f"the labelling part holds {len(all_glyphs)} glyphs of at least "
                                            f"{args.min_glyph_pixels} pixels; --glyphs asks for {max(args.glyphs)}")
    suffix = f"_st{args.self_training_rounds}" if args.self_training_rounds else ""
    runs = [{"name": f"{name}_{mode}{'_negatives' if negatives == 'on' else ''}{suffix}_k{count}_seed{seed}",
             "encoder": name, "checkpoint": checkpoint, "mode": mode, "negatives": negatives == "on", "glyphs": count,
             "seed": seed}
            for mode in args.modes for negatives in args.negatives for count in args.glyphs for seed in range(args.seeds)
            for name, checkpoint in zip(args.names, args.encoders)]
    description = (f"Segment `{segment.name}`: {scoring.description}; {len(all_glyphs)} glyphs to draw from; "
                   f"input {settings.describe()}; {args.seeds} seed(s); extra fine-tuning settings: "
                   f"{' '.join(extra) or 'none'}.")
    print(description)
    results = []
    for run in tqdm.tqdm(runs, desc="fine-tuning runs", unit="run"):
        results += run_one(run, args, settings, extra, segment, scoring, all_glyphs)
        tqdm.tqdm.write(f"{run['name']}: F0.5 {results[-1]['f05']:.3f}, AUC {results[-1]['auc']:.3f}")
    rows = summarise(results)
    write_csv(args.output / "runs.csv", results)
    write_csv(args.output / "label_efficiency.csv", rows)
    write_bytes_atomic(args.output / "label_efficiency.md", markdown(rows, description, scoring.chance_f05).encode())
    write_bytes_atomic(args.output / "label_efficiency.json", json.dumps(
        {"description": description, "summary": rows, "verdict": verdict(rows, scoring.chance_f05)}, indent=1).encode())
    plot(rows, args.output / "label_efficiency.png", f"{segment.name}: {settings.describe()}")
    print(markdown(rows, description, scoring.chance_f05))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    encoder_input.exit_on_user_error(main)
