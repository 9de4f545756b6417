"""Does pretraining let a researcher find ink with fewer labels? Few-label fine-tuning curves: for each encoder,
fine-tune from k labelled glyphs (k = 1, 2, 4, 8 by default) with several seeds, score each prediction on papyrus far
from every labelled glyph, and compare every encoder with training from scratch, paired by seed.

    python evaluate/label_efficiency.py --pretrained_path random \
        experiments/report/spark/resnet50_3d_narrow_timm_style.pth \
        experiments/report/vicreg/resnet50_3d_narrow_timm_style.pth --names random spark vicreg --seeds 8
    python evaluate/label_efficiency.py --pretrained_path random spark.pth --modes full lpft -- --NUM_EPOCHS 10

This is how self-supervised encoders are judged (fine-tuning with 1 % or 10 % of the labels against training from
scratch), and what a Vesuvius researcher does: label a letter or two, train, predict, refine.
- **Glyphs** are the connected components of the segment's ink labels (of at least --min_glyph_pixels) that lie
  wholly in the labelling part: the first --label_part of the segment along its longer side. Seed s draws an order
  of them; the k glyphs of seed s are the first k of that order, so each seed's sets grow with k.
- **Scoring**: the papyrus in the last --score_part of the segment along its longer side (the same region for every
  k, seed and encoder). The threshold is chosen without looking at it: the one with the best F0.5 on the
  calibration strip, the papyrus between the labelling part and the scored one, which is neither labelled nor
  scored, and starts a tile past the labelling part, beyond the reach of any training tile (a guard checks every
  run's labels, glyphs and painted negatives, against both regions). The headline is the scored F0.5 at that threshold, beside AUC and average precision (threshold-free);
  the F0.5 at the scored region's own best threshold (an oracle) is an extra column. The region's no-skill band
  says what smooth random maps score there.
- **Verdict** (evaluate/verdict_rule.py; its error rates: notes/verdict_rules.md): each encoder, mode and k (a cell)
  is compared with each random arm, paired by seed (the same glyphs), by a one-sided sign-flip test on signed ranks,
  which stays exact when runs take off or stay at chance; a cell's p-value is its largest over the random arms, and
  Holm's step-down across the cells spends --alpha, so with no true difference any "yes" or "suggestive" comes at
  most that often. A significant cell is "yes" with at most 4 glyphs and a mean gain of at least +0.05 against every
  arm, else "suggestive"; "no" needs every cell with at most 4 glyphs to rule out a gain of 0.05. The verdict is
  printed with the rule's error rates for this command's design, simulated from measured runs.
- **Runs**: each is one `finetune/train.py` run in scheme "iterative" (with data augmentation, which few labels
  need) from the glyph label image, with SEED = the seed; `random` is the seeded random initialisation (training
  from scratch); `full` fine-tunes everything, `lpft` first trains the decoder on the frozen encoder for --lp_epochs
  epochs (LP-FT). `frozen` runs no fine-tuning: a logistic regression reads the frozen encoder's finest-stage
  features (computed once per encoder; per seed for `random`), fitted on the glyphs and the labelling part's
  papyrus within half a tile of them, in this process, in seconds a run; the same glyphs, regions, scores and
  verdict.
  `--random_epochs_factor 2` adds a random arm with twice the epochs, so that a win is about labels rather than
  optimisation speed, trained only where a cell can still be claimed (`claimable_counts`). Every run reads tiles as
  the checkpoints record (they must agree; random follows them), or as the input options say. Everything after `--`
  goes to every run.
- **Cost**: a fine-tuning run trains --run_epochs epochs of --run_tiles_per_epoch tiles, predicts only the
  calibration strip and the scored region, and runs one per core on a CPU (--jobs 0); its CPU seconds are recorded.
  notes/performance.md ("The verdict's cost") has the measurements behind these settings.
- **Partial labels and self-training**: `--negatives on` adds runs whose glyphs come with the negatives a labeler would
  paint around them (the papyrus within NEGATIVES_REACH pixels that the labels call not ink, kept off any ink), so
  that the rest of the segment is unknown rather than background; `--self_training_rounds N` runs N pseudo-label
  rounds after each, and every round's prediction is scored (the arms read "full, negatives, round 2").
- **A prior**: `--prior MAP --prior_name NAME` adds runs whose first labels come from a prior map of the segment
  (finetune/train.py's PRIOR_PATH: its confident pixels, under any labelled glyphs), at every k and at k = 0 (no
  human label at all; allowed in --glyphs only with a prior). The arms read "full, prior NAME".
Writes to --output: `label_efficiency.md`, `.csv` and `.json` (per encoder, mode and k: mean and min–max over seeds,
the paired comparisons, training time, the verdict), `label_efficiency.png` (F0.5 against the number of labelled
glyphs, the seed spread shaded, with chance and the no-skill band), `runs.csv` (every run), and per run
`runs/<name>/` with its label image, prediction.png and result.json. A rerun reuses every run whose key is the same
(evaluate/provenance.py: the code finetune/train.py executes, its command with the content of every file it reads:
the glyph image, the encoder checkpoint, the prior; and the segment; a frozen run's key is `run_frozen`'s), so a
commit that touches only README or notes reuses everything; any other run is moved to `runs/.superseded/` and run
again, unless --reuse_other_code keeps a run whose inputs are the same but whose code differs, and then the report
names its code.
"""
import argparse
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pathlib
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import cv2
import numpy as np
import sklearn.linear_model
import tqdm

from evaluate import encoder_input, ink_map, provenance, verdict_rule
from evaluate.statistics import CONFIDENCE, describe_interval, paired_interval, sign_flip_p
from evaluate.verdict_rule import CLAIMS, GOAL_MARGIN, GOAL_MAX_GLYPHS
from finetune.data import read_prior
from finetune.metrics import (NoSkillBand, average_precision, best_threshold, f05_at, ink_metrics,
                              no_skill_band)
from finetune.outputs import write_png_atomic
from pretrain.data.patches import InputSettings, finetune_options
from pretrain.data.segment import Segment, open_segment
from pretrain.utils import run_log
from pretrain.utils.misc import RenamedOption, git_commit, note_renamed, write_bytes_atomic
from pretrain.utils import errors, ranges

RANDOM = "random"  # no pretrained weights: the seeded random initialisation (training from scratch)
OLDER_RANDOM = "scratch"  # what older code called it: still accepted for --pretrained_path, and as an arm's name
# Every fine-tuning run's step budget: RUN_EPOCHS epochs of at least RUN_TILES_PER_EPOCH tiles, finetune/train.py's
# own (1,280 steps at batch 8), the budget the verdict rule's noise was measured at. A smaller one waits for the pilot
# of F0.5 and AUC against steps (benchmarks/curve_steps.py; notes/performance.md, "The verdict's cost").
RUN_EPOCHS = 20
RUN_TILES_PER_EPOCH = 512
PREDICTED_REGION = "predicted_region.png"  # the calibration strip and the scored region, where runs predict
FROZEN_STAGE = 1  # the finest stage (one feature per 4 pixels): a stroke is a few features wide there
RATE_EXPERIMENTS = 1000  # simulated reports per scenario behind the error rates printed beside the verdict
NEGATIVES_REACH = 32  # pixels around a labelled glyph that a simulated labeler paints as not ink
NEGATIVES_CLEARANCE = 3  # pixels the painted negatives keep off any ink
MODE_WORDS = {"full": "fine-tuned", "lpft": "probed then fine-tuned", "frozen": "read frozen by a linear probe"}


@dataclasses.dataclass(frozen=True)
class Regions:
    """Where glyphs may be labelled, where thresholds are calibrated and where predictions are scored, as (Y, X)
    bool maps, the scored region's no-skill band, and their description."""

    label_yx: np.ndarray
    calibration_yx: np.ndarray
    score_yx: np.ndarray
    band: NoSkillBand
    description: str

    @property
    def chance_f05(self) -> float:  # F0.5 of calling every scored pixel ink
        return self.band.chance_f05


def regions(segment: Segment, label_part: float, score_part: float, tile_size: int) -> Regions:
    """The first `label_part` of the segment along its longer side for labelling, its last `score_part` (papyrus
    only) for scoring, and the papyrus between them for choosing thresholds, less the `tile_size` − 1 pixels next to
    the labelling part that a training tile holding a labelled pixel can reach: no pixel that chooses a threshold or
    scores a run is ever inside a training tile."""
    height, width = segment.shape[1:]
    along_x = width >= height
    length = width if along_x else height
    label_end, score_start = int(label_part * length), int((1 - score_part) * length)
    calibration_start = label_end + tile_size - 1
    axis = "x" if along_x else "y"
    if score_start <= calibration_start:
        raise encoder_input.EvaluationError(
            f"--label_part {label_part} and --score_part {score_part} leave {max(score_start - label_end, 0)} pixels "
            f"between labels and scoring ({axis} {label_end}..{score_start - 1}): more than a training tile "
            f"({tile_size - 1} pixels) is needed, where thresholds are chosen; lower --label_part or --score_part")
    label_yx, calibration_yx, score_yx = (np.zeros((height, width), bool) for _ in range(3))
    if along_x:
        label_yx[:, :label_end], calibration_yx[:, calibration_start:score_start], score_yx[:, score_start:] = True, True, True
    else:
        label_yx[:label_end], calibration_yx[calibration_start:score_start], score_yx[score_start:] = True, True, True
    calibration_yx &= segment.mask
    score_yx &= segment.mask
    check_held_out([label_yx], Regions(label_yx, calibration_yx, score_yx, None, ""), tile_size, "the labelling part")
    ink_yx = segment.inklabels > 0
    if not ink_yx[calibration_yx].any() or ink_yx[calibration_yx].all():
        raise encoder_input.EvaluationError(f"the calibration strip ({axis} {calibration_start}..{score_start - 1}) holds "
                                            "papyrus of one class only: widen it with a smaller --label_part or --score_part")
    band = no_skill_band(ink_yx, calibration_yx, score_yx)
    description = (f"glyphs labelled at {axis} < {label_end}, thresholds chosen on the papyrus at {calibration_start} ≤ "
                   f"{axis} < {score_start} (a training tile reaches {tile_size - 1} pixels past the labels), "
                   f"predictions scored on the papyrus at {axis} ≥ {score_start}, {score_start - label_end} pixels away "
                   f"from any glyph that could be labelled (no-skill band: {band.describe()})")
    return Regions(label_yx, calibration_yx, score_yx, band, description)


def check_held_out(labels: list[np.ndarray], scoring: Regions, tile_size: int, what: str) -> None:
    """Raise unless every pixel that chooses a threshold or is scored lies outside every tile that could hold a
    labelled pixel of `labels` ((Y, X) maps, nonzero = labelled) and the two regions are disjoint: held out means
    held out."""
    if (scoring.calibration_yx & scoring.score_yx).any():
        raise encoder_input.EvaluationError("the calibration strip and the scored region overlap")
    for labels_yx in labels:
        # A tile holding pixel p spans p − (tile − 1) … p + (tile − 1) at most, along each side.
        reach_yx = cv2.dilate((np.asarray(labels_yx) > 0).astype(np.uint8), np.ones((2 * tile_size - 1,) * 2, np.uint8)) > 0
        if (reach_yx & (scoring.calibration_yx | scoring.score_yx)).any():
            raise encoder_input.EvaluationError(f"{what}: a training tile ({tile_size} pixels) around its labels would "
                                                "cover pixels that choose thresholds or are scored")


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
    ink (a brush does not touch the next letter's strokes), within `mask_yx` (run_one: the labelling part's papyrus,
    so that painted pixels, like glyphs, keep a tile away from every pixel that chooses thresholds or is scored)."""
    near_yx = cv2.dilate((glyph_labels_yx > 0).astype(np.uint8), np.ones((2 * NEGATIVES_REACH + 1,) * 2, np.uint8)) > 0
    ink_yx = cv2.dilate((inklabels_yx > 0).astype(np.uint8), np.ones((2 * NEGATIVES_CLEARANCE + 1,) * 2, np.uint8)) > 0
    return (near_yx & mask_yx & ~ink_yx).astype(np.uint8) * 255


def without_epochs(extra: list[str]) -> tuple[list[str], int | None]:
    """The settings after `--` less any NUM_EPOCHS, and that NUM_EPOCHS (None when not given)."""
    kept, epochs, index = [], None, 0
    while index < len(extra):
        item = extra[index]
        if item == "--NUM_EPOCHS" and index + 1 < len(extra):
            epochs, index = int(extra[index + 1]), index + 2
            continue
        if item.startswith("--NUM_EPOCHS="):
            epochs = int(item.split("=", 1)[1])
        else:
            kept.append(item)
        index += 1
    return kept, epochs


def run_command(run: dict, args, settings: InputSettings, extra: list[str], folder: pathlib.Path) -> list[str]:
    command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--exp_name", run["name"],
               "--OUTPUT_DIR", str(args.output / "runs"), "--segment_id", args.segment, "--scheme", "iterative",
               "--data_augmentation", "True", "--SEED", str(run["seed"]), *finetune_options(settings)]
    if not any(item.split("=")[0] == "--MIN_TILES_PER_EPOCH" for item in extra):
        command += ["--MIN_TILES_PER_EPOCH", str(args.run_tiles_per_epoch)]
    if predicts_scored_only(args):
        command += ["--mask_path", str(args.output / PREDICTED_REGION)]
    if run["glyphs"]:  # k = 0: the prior alone
        command += ["--inklabel_path", str(folder / f"glyphs_k{run['glyphs']}_seed{run['seed']}.png")]
    if run["prior"]:
        command += ["--PRIOR_PATH", str(args.prior.resolve())]
    if run["negatives"]:
        command += ["--negatives_path", str(folder / f"negatives_k{run['glyphs']}_seed{run['seed']}.png")]
    if run["checkpoint"] != RANDOM:
        command += ["--pretrained_path", run["checkpoint"]]
    if run["mode"] == "lpft":
        command += ["--FREEZE_ENCODER_EPOCHS", str(args.lp_epochs)]
    if args.self_training_rounds:
        command += ["--SELF_TRAINING_ROUNDS", str(args.self_training_rounds)]
    return command + without_epochs(extra)[0] + ["--NUM_EPOCHS", str(run["epochs"])]


def predicts_scored_only(args) -> bool:
    """Whether runs predict only where predictions are used: the calibration strip and the scored region (a pixel's
    prediction there is the same, the tiles that cover it being the same), not the labelling part. Self-training and
    a prior read the prediction of the whole segment, so their runs predict it all."""
    return not args.self_training_rounds and args.prior is None


def earlier_run(folder: pathlib.Path, run_key: dict, reuse_other_code: bool) -> dict | None:
    """What a finished run in `folder` recorded, when it may stand for this one: the same key (a fine-tuning run's
    from evaluate/provenance.py: the code train.py executes, the command with the content of every file it reads,
    the segment; a frozen run's from `run_frozen`), or with `reuse_other_code` the same inputs from other code.
    Otherwise the folder is moved to runs/.superseded/ (nothing is deleted) and None says to run it; a killed run of
    the same key is left to continue."""
    result_path = folder / "result.json"
    if result_path.is_file():
        earlier = json.loads(result_path.read_text())
        if earlier.get("key") == run_key or (reuse_other_code and earlier.get("key", {}).get("inputs") == run_key["inputs"]):
            return earlier
    aside = provenance.claim(folder, run_key)
    if aside is not None and (aside / "result.json").is_file():
        tqdm.tqdm.write(f"{folder.name} ran with other code or inputs: running it again (the earlier run is kept in "
                        f"{aside}" + ("; --reuse_other_code keeps a run whose inputs are the same)"
                                      if not reuse_other_code else ")"))
    elif aside is not None:  # killed under other settings, or finished by code that recorded no key
        tqdm.tqdm.write(f"{folder.name} holds unfinished work or work without a key: running it afresh "
                        f"(kept in {aside})")
    return None


def run_one(run: dict, args, settings: InputSettings, extra: list[str], segment: Segment, scoring: Regions,
            all_glyphs: list[np.ndarray], code: str) -> list[dict]:
    """One fine-tuning run (or its earlier record, see `earlier_run`): one record per prediction (one, or one per
    self-training round), with the prediction's path, not yet scored."""
    folder = args.output / "runs" / run["name"]
    command = run_command(run, args, settings, extra, folder)
    glyphs_yx = glyph_labels(all_glyphs, segment.shape[1:], run["seed"], run["glyphs"])
    images = {}  # the label images this run trains from, by the path the command names them with
    if run["glyphs"]:  # k = 0 trains from a prior alone: no label image to pass
        images[str(folder / f"glyphs_k{run['glyphs']}_seed{run['seed']}.png")] = glyphs_yx
    if run["negatives"]:
        images[str(folder / f"negatives_k{run['glyphs']}_seed{run['seed']}.png")] = painted_negatives(
            glyphs_yx, segment.inklabels, segment.mask & scoring.label_yx)
    check_held_out(images.values(), scoring, settings.tile_size, run["name"])
    digests = {path: label_digest(image_yx) for path, image_yx in images.items()}
    if predicts_scored_only(args):
        digests[str(args.output / PREDICTED_REGION)] = label_digest(predicted_region(scoring))
    run_key = provenance.key(command, provenance.TRAIN_CODE, digests)
    earlier = earlier_run(folder, run_key, args.reuse_other_code)
    if earlier is not None:
        return [{key: value for key, value in earlier.items() if key not in ("command", "key", "later_rounds")},
                *earlier.get("later_rounds", [])]
    for path, image_yx in images.items():
        write_png_atomic(pathlib.Path(path), image_yx)
    returncode, cpu_seconds = run_training(command, folder / "train.log")
    if returncode != 0:
        tail = (folder / "train.log").read_text().strip().splitlines()[-1:]
        raise encoder_input.EvaluationError(f"run {run['name']} failed: {' '.join(tail)} (whole log: {folder / 'train.log'})")
    results = []
    for self_training_round in range(args.self_training_rounds + 1):
        prediction = folder / (f"round_{self_training_round + 1:02d}" if args.self_training_rounds else "") / "prediction.png"
        epochs = run_log.epochs(folder, round_number=self_training_round + 1)
        results.append({**{key: run[key] for key in ("name", "encoder", "glyphs", "seed")},
                        "mode": arm(run["mode"], run["negatives"], self_training_round if args.self_training_rounds else None,
                                    args.prior_name if run["prior"] else None),
                        "round": self_training_round, "labelled_pixels": int((glyphs_yx > 0).sum()),
                        "prediction": str(prediction), "training_seconds": epochs[-1]["training_seconds"],
                        "cpu_seconds": cpu_seconds, "code": code})
    write_bytes_atomic(folder / "result.json", json.dumps(
        {**results[0], "command": command, "key": run_key, "later_rounds": results[1:]}, indent=1).encode())
    return results


class FrozenFeatures:
    """Each frozen encoder's depth-pooled FROZEN_STAGE features of the whole segment (evaluate/ink_map.py's
    feature_grid), computed once per encoder and kept for every run that reads it; `random` is the seeded random
    initialisation, so its features are computed once per seed, as a fine-tuning run from random starts anew per
    seed. Computing them is the frozen curve's main cost: the CPU seconds are charged to the first run that asks."""

    def __init__(self, segment: Segment, segment_spec: str, settings: InputSettings):
        self.segment, self.settings, self.device = segment, settings, encoder_input.device()
        self.features, self.digests = {}, {}
        reading = {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)
                   if field.compare}  # how tiles are read, not what the checkpoint records of its data
        # What decides every encoder's features besides the encoder itself, the same for all runs of the command.
        self.code = provenance.code_digest(provenance.EVALUATE_CODE)
        self.reading = [json.dumps(reading, sort_keys=True), provenance.segment_key(segment_spec), self.device.type]

    def identity(self, checkpoint_path: str, seed: int) -> str:
        """The encoder as content, for a run's key: the random initialisation's seed, or the checkpoint's digest."""
        if checkpoint_path == RANDOM:
            return f"{RANDOM}:seed{seed}"
        if checkpoint_path not in self.digests:
            self.digests[checkpoint_path] = provenance.file_digest(checkpoint_path)
        return self.digests[checkpoint_path]

    def get(self, checkpoint_path: str, seed: int) -> tuple[np.ndarray, np.ndarray, int, float]:
        """(C, Y/f, X/f) features, the grid's (Y/f, X/f) mask, f, and the CPU seconds spent now (0 when kept)."""
        key = (checkpoint_path, seed if checkpoint_path == RANDOM else None)
        if key in self.features:
            return (*self.features[key], 0.0)
        self.features.clear()  # runs come encoder by encoder: keep one encoder's features in memory at a time
        started = time.process_time()
        encoder, _ = encoder_input.load_encoder(checkpoint_path, self.settings, self.device, seed)
        self.features[key] = ink_map.feature_grid(encoder, self.segment, FROZEN_STAGE, self.settings, self.device)
        return (*self.features[key], time.process_time() - started)


def run_frozen(run: dict, features: FrozenFeatures, scoring: Regions, all_glyphs: list[np.ndarray], args,
               code: str) -> list[dict]:
    """A frozen run: logistic regression from each feature of the frozen encoder to its label, fitted on the glyphs
    (ink) and the labelling part's papyrus within half a tile of them (not ink: as in a fine-tuning run's training
    tiles, or with negatives the painted ones), then the map of ink probability, upsampled to the segment's pixels,
    written as the run's prediction.png for `score`. Every fitted pixel passes `check_held_out`. Like a fine-tuning
    run it is reused (`earlier_run`) when its key is the same: the code of this process (evaluate/, finetune/,
    pretrain/), the encoder's content, the input settings, the segment, the device, and the pixels it fits and
    predicts; the encoder's features are then not computed at all."""
    segment, tile_size = features.segment, features.settings.tile_size
    started = time.process_time()
    glyphs_yx = glyph_labels(all_glyphs, segment.shape[1:], run["seed"], run["glyphs"])
    if run["negatives"]:
        not_ink_yx = painted_negatives(glyphs_yx, segment.inklabels, segment.mask & scoring.label_yx) > 0
    else:
        near_yx = cv2.dilate((glyphs_yx > 0).astype(np.uint8), np.ones((tile_size + 1,) * 2, np.uint8)) > 0
        not_ink_yx = near_yx & segment.mask & scoring.label_yx & (glyphs_yx == 0)
    check_held_out([glyphs_yx, not_ink_yx], scoring, tile_size, run["name"])
    folder = args.output / "runs" / run["name"]
    run_key = {"code": features.code, "inputs": [
        "frozen", features.identity(run["checkpoint"], run["seed"]), *features.reading, label_digest(glyphs_yx),
        label_digest(not_ink_yx.astype(np.uint8)), label_digest(predicted_region(scoring))]}
    earlier = earlier_run(folder, run_key, args.reuse_other_code)
    if earlier is not None:
        return [{key: value for key, value in earlier.items() if key != "key"}]
    features_chw, grid_mask_hw, factor, feature_seconds = features.get(run["checkpoint"], run["seed"])
    height, width = grid_mask_hw.shape

    def on_grid(map_yx: np.ndarray) -> np.ndarray:  # a pixel map, as the fraction of each feature's pixels it covers
        return cv2.resize(map_yx.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)

    ink_hw = (on_grid(glyphs_yx > 0) >= 0.5) & grid_mask_hw
    not_ink_hw = (on_grid(not_ink_yx) >= 0.5) & grid_mask_hw & ~ink_hw
    pixels_nc = features_chw.reshape(len(features_chw), -1).T  # (Y/f · X/f, C)
    fitted = np.flatnonzero((ink_hw | not_ink_hw).ravel())
    mean, std = pixels_nc[fitted].mean(axis=0), pixels_nc[fitted].std(axis=0) + 1e-6
    probe = sklearn.linear_model.LogisticRegression(C=0.1, max_iter=500)
    probe.fit((pixels_nc[fitted] - mean) / std, ink_hw.ravel()[fitted])
    predicted_hw = predicted_region(scoring)[::factor, ::factor][:height, :width] > 0
    probabilities_hw = np.zeros((height, width), np.float32)
    probabilities_hw[predicted_hw] = probe.predict_proba((pixels_nc[predicted_hw.ravel()] - mean) / std)[:, 1]
    # Each feature's value over its f × f pixels (the upsampling of a fine-tuning run's logits is smoother; the
    # same for every encoder).
    probabilities_yx = np.zeros(segment.shape[1:], np.float32)
    upsampled = np.repeat(np.repeat(probabilities_hw, factor, axis=0), factor, axis=1)
    probabilities_yx[:upsampled.shape[0], :upsampled.shape[1]] = upsampled[:segment.shape[1], :segment.shape[2]]
    prediction = folder / "prediction.png"
    write_png_atomic(prediction, np.round(probabilities_yx * 255).astype(np.uint8))
    result = {**{key: run[key] for key in ("name", "encoder", "glyphs", "seed")},
              "mode": arm(run["mode"], run["negatives"], None), "round": 0, "labelled_pixels": int((glyphs_yx > 0).sum()),
              "prediction": str(prediction), "training_seconds": 0.0,
              "cpu_seconds": time.process_time() - started, "feature_cpu_seconds": feature_seconds, "code": code}
    write_bytes_atomic(folder / "result.json", json.dumps({**result, "key": run_key}, indent=1).encode())
    return [result]


def predicted_region(scoring: Regions) -> np.ndarray:
    """(Y, X) uint8 0/255: where runs predict when only the calibration strip and the scored region are used."""
    return (scoring.calibration_yx | scoring.score_yx).astype(np.uint8) * 255


def run_training(command: list[str], log_path: pathlib.Path) -> tuple[int, float]:
    """Run one finetune/train.py command, its output to `log_path`: its exit status and CPU seconds, its own and its
    tile reader's (wait4's, which runs side by side cannot mix up)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return process.returncode, usage.ru_utime + usage.ru_stime


def label_digest(image_yx: np.ndarray) -> str:
    """A label image's content, before it is written: its shape and pixels."""
    return "labels:" + hashlib.sha256(str(image_yx.shape).encode() + image_yx.tobytes()).hexdigest()


def score(result: dict, segment: Segment, scoring: Regions) -> dict:
    """A run's record with its prediction's scores (`scores`)."""
    prediction_yx = cv2.imread(result["prediction"], cv2.IMREAD_UNCHANGED)
    if prediction_yx is None or prediction_yx.shape != segment.shape[1:]:
        raise encoder_input.EvaluationError(f"{result['prediction']} is not a {segment.shape[1:]} prediction image")
    return {**result, **scores(prediction_yx / 255.0, segment, scoring)}


def scores(probabilities_yx: np.ndarray, segment: Segment, scoring: Regions) -> dict:
    """F0.5 at the threshold chosen on the calibration strip (`f05`), AUC and average precision on the scored region,
    and the oracle F0.5 at the scored region's own best threshold, of a (Y, X) map in [0, 1]."""
    ink_yx = segment.inklabels > 0
    threshold = best_threshold(probabilities_yx[scoring.calibration_yx], ink_yx[scoring.calibration_yx])
    scored, labels = probabilities_yx[scoring.score_yx], ink_yx[scoring.score_yx]
    oracle = ink_metrics(scored, labels)
    return {"f05": f05_at(scored, labels, threshold), "threshold": threshold, "auc": oracle.auc,
            "average_precision": average_precision(scored, labels), "f05_oracle": oracle.f05,
            "threshold_oracle": oracle.threshold, "scored_pixels": oracle.pixels}


def arm(mode: str, negatives: bool, self_training_round: int | None, prior: str | None = None) -> str:
    """How a curve was trained, as its label: "full", "lpft", with ", negatives", ", prior NAME" and ", round N" as
    they apply."""
    return mode + (", negatives" if negatives else "") + (f", prior {prior}" if prior else "") + (f", round {self_training_round}"
                                                           if self_training_round is not None else "")


def summarise(results: list[dict]) -> list[dict]:
    """Mean and min–max over seeds of each score and the training time, per encoder, mode and number of glyphs."""
    groups = {}
    for result in results:
        groups.setdefault((result["encoder"], result["mode"], result["glyphs"]), []).append(result)
    rows = []
    for (encoder, mode, count), group in groups.items():
        row = {"encoder": encoder, "mode": mode, "glyphs": count, "seeds": len(group)}
        for key in ("f05", "f05_oracle", "auc", "average_precision", "training_seconds", "cpu_seconds"):
            values = [result.get(key, math.nan) for result in group]  # runs of older code recorded no CPU time
            row.update({f"{key}_mean": float(np.mean(values)), f"{key}_min": min(values), f"{key}_max": max(values)})
        rows.append(row)
    return rows


def claimable_counts(results: list[dict], alpha: float) -> list[int]:
    """The glyph counts at which some encoder's cell beats `random` with a sign-flip p ≤ `alpha` before correction.
    A cell's p-value is its largest over the random arms and Holm's step-down never tests one above `alpha`, so a
    cell beyond these is claimed neither yes nor suggestive whatever a longer-trained random arm scores: that arm is
    trained only at these counts. (A missing arm can only make "no" harder: see `comparisons`.)"""
    rows = comparisons([result for result in results if not result["mode"].startswith("frozen")
                        and (result["encoder"] in (RANDOM, OLDER_RANDOM) or not is_random(result["encoder"]))], alpha)
    return sorted({row["glyphs"] for row in rows if row["p_gain"] <= alpha})


def comparisons(results: list[dict], alpha: float = verdict_rule.ALPHA, planned_arms: int = 1) -> list[dict]:
    """Every pretrained encoder against every random arm, per mode and number of glyphs, paired by seed: the mean
    F0.5 difference, its t interval (a description), the sign-flip p-values of a gain and of a gain below
    GOAL_MARGIN, and the claim of its cell (encoder, mode, glyphs) under evaluate/verdict_rule.py's rule, Holm's
    step-down spending `alpha` across the cells. `planned_arms`: the random arms the design plans (a cell is judged as if it
    had them all, its missing ones standing in as copies of one it has: "no", which needs a small p against some arm
    at ALPHA divided by the arms, is then never easier than with every arm, and yes or suggestive never changes)."""
    by_key = {(result["encoder"], result["mode"], result["glyphs"], result["seed"]): result for result in results}
    random_arms = sorted({result["encoder"] for result in results if is_random(result["encoder"])})
    rows, cells = [], {}
    for encoder, mode, count in sorted({key[:3] for key in by_key if not is_random(key[0])}, key=str):
        for baseline in random_arms:
            seeds = sorted(seed for (name, arm_mode, glyphs, seed) in by_key
                           if (name, arm_mode, glyphs) == (encoder, mode, count) and (baseline, mode, count, seed) in by_key)
            if not seeds:
                continue
            differences = [by_key[(encoder, mode, count, seed)]["f05"] - by_key[(baseline, mode, count, seed)]["f05"]
                           for seed in seeds]
            mean, low, high = paired_interval(differences)
            worst = min(by_key[(encoder, mode, count, seed)]["f05"] for seed in seeds)
            row = {"encoder": encoder, "against": baseline, "mode": mode, "glyphs": count, "seeds": len(seeds),
                   "mean_difference": mean, "low": low, "high": high, "worst_seed_f05": worst,
                   "p_gain": sign_flip_p(differences), "p_below_goal": sign_flip_p(differences, GOAL_MARGIN, "less")}
            rows.append(row)
            cells.setdefault((encoder, mode, count), []).append(row)
    if not cells:
        return rows
    # A cell lacking an arm (no seed in common, or not trained there: claimable_counts) is judged against the arms it has.
    arms = max(planned_arms, *(len(cell) for cell in cells.values()))
    padded = [cell + [cell[-1]] * (arms - len(cell)) for cell in cells.values()]
    claims = verdict_rule.judge(np.array([cell[0]["glyphs"] for cell in padded]),
                                *(np.array([[[row[key] for row in cell] for cell in padded]])
                                  for key in ("mean_difference", "p_gain", "p_below_goal")), alpha)[0]
    for cell, claim_index in zip(cells.values(), claims):
        for row in cell:
            row["claim"] = CLAIMS[claim_index]
    return rows


def is_random(name: str) -> bool:
    """An arm without pretrained weights: `random`, `random_xN` (N times the epochs), or `scratch`, as older code
    named it: an older command's `--names scratch` (and the runs it left) is still a baseline."""
    return name in (RANDOM, OLDER_RANDOM) or name.startswith(f"{RANDOM}_x")


def verdict(compared: list[dict], band: NoSkillBand, rates: verdict_rule.ErrorRates | None = None,
            alpha: float = verdict_rule.ALPHA) -> str:
    """The answer, from the cells' claims (`comparisons`), with the rule and, given `rates`, its error rates."""
    if not compared:
        return "Not measured: the runs hold no pretrained encoder and random in the same mode."
    cells = {}
    for row in compared:
        cells.setdefault((row["encoder"], row["mode"], row["glyphs"]), []).append(row)
    claims = [rows[0]["claim"] for rows in cells.values()]
    within_goal = [rows[0]["claim"] for rows in cells.values() if rows[0]["glyphs"] <= GOAL_MAX_GLYPHS]
    overall = next((level for level in ("yes", "suggestive") if level in claims),
                   "no" if within_goal and set(within_goal) == {"no"} else "inconclusive")

    def account(rows: list[dict]) -> str:
        row = min(rows, key=lambda row: row["mean_difference"])  # the arm it beats least
        interval = "no interval: one seed" if math.isnan(row["low"]) else f"t interval {row['low']:+.3f} to {row['high']:+.3f}"
        inside = "; its worst seed is inside the no-skill band" if row["worst_seed_f05"] <= band.blind_p95 else ""
        p_value = max(other["p_gain"] for other in rows)
        return (f"{row['encoder']} ({row['mode']}) with {row['glyphs']} glyph(s) against {row['against']}: "
                f"{row['mean_difference']:+.3f} F0.5 over {row['seeds']} seed(s), {interval}, sign-flip p {p_value:.4f}"
                f"{inside}")

    named = [account(rows) for rows in cells.values() if rows[0]["claim"] == overall] if overall != "no" else []
    best = max(cells.values(), key=lambda rows: min(row["mean_difference"] for row in rows))
    rule = (f"a paired signed-rank sign-flip test per cell against every random arm, Holm's step-down across the "
            f"{len(cells)} cell(s) at family-wise {alpha:.3g}; yes also needs at most {GOAL_MAX_GLYPHS} glyphs and a "
            f"mean gain of at least {GOAL_MARGIN:+.2f}; no needs every cell to rule out a gain of {GOAL_MARGIN:.2f}")
    rule += f". Error rates of this rule for this design (evaluate/simulate_verdict.py): {rates.describe()}" if rates else ""
    if overall == "yes":
        return f"**Yes** ({rule}): " + "; ".join(named) + "."
    if overall == "suggestive":
        return f"**Suggestive**, not yet shown ({rule}): " + "; ".join(named) + "."
    if overall == "no":
        return f"**No** ({rule}): every cell rules out a gain of {GOAL_MARGIN}; the largest mean gain is {account(best)}."
    return f"**Inconclusive** ({rule}): the evidence does not decide; the largest mean gain is {account(best)}."


def markdown(rows: list[dict], compared: list[dict], description: str, band: NoSkillBand, codes: list[str],
             answer: str, prior_alone: str = "") -> str:
    counts = sorted({row["glyphs"] for row in rows})
    curves = {}
    for row in rows:
        curves.setdefault((row["encoder"], row["mode"]), {})[row["glyphs"]] = row

    def table(title: str, key: str, extra_column: bool = False) -> list[str]:
        lines = ["", title, "", "| encoder | mode | " + " | ".join(f"{count} glyph(s)" for count in counts) + " |"
                 + (" time per run (wall, CPU) |" if extra_column else ""),
                 "|---|---|" + "---|" * len(counts) + ("---|" if extra_column else "")]
        for (encoder, mode), by_count in curves.items():
            cells = [f"{by_count[count][f'{key}_mean']:.3f} ({by_count[count][f'{key}_min']:.3f} – "
                     f"{by_count[count][f'{key}_max']:.3f})" if count in by_count else "–" for count in counts]
            minutes = np.mean([row["training_seconds_mean"] for row in by_count.values()]) / 60
            cpu_seconds = np.mean([row["cpu_seconds_mean"] for row in by_count.values()])
            lines.append(f"| {encoder} | {mode} | " + " | ".join(cells) + " |"
                         + (f" {minutes:.1f} min, {cpu_seconds:.0f} CPU-s |" if extra_column else ""))
        return lines

    lines = [description, "",
             f"No-skill band of the scored region: {band.describe()}. A score at or below the band's 95th percentile "
             f"({band.blind_p95:.3f}) is not evidence of skill."]
    lines += [prior_alone] if prior_alone else []
    lines += table("F0.5 at the threshold chosen on the calibration strip (mean over seeds, min – max):", "f05", True)
    lines += table("AUC (threshold-free):", "auc")
    lines += table("Average precision (threshold-free):", "average_precision")
    lines += table("Extra: F0.5 at the scored region's own best threshold (an oracle; skill-less maps reach "
                   f"{band.oracle_mean:.3f}, 95th percentile {band.oracle_p95:.3f}):", "f05_oracle")
    lines += ["", f"Paired by seed (same glyphs), F0.5 difference against each random arm, {CONFIDENCE * 100:.0f} % t "
              "interval (a description), one-sided sign-flip p-values of a gain and of a gain below "
              f"{GOAL_MARGIN:+.2f}, and the claim of the cell (every arm at once, Holm across cells):", "",
              "| encoder | against | mode | glyphs | seeds | mean difference | 95 % interval | p (gain) | "
              f"p (below {GOAL_MARGIN:+.2f}) | claim |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in compared:
        interval = describe_interval(row["low"], row["high"])
        lines.append(f"| {row['encoder']} | {row['against']} | {row['mode']} | {row['glyphs']} | {row['seeds']} | "
                     f"{row['mean_difference']:+.3f} | {interval} | {row['p_gain']:.4f} | {row['p_below_goal']:.4f} | "
                     f"{row['claim']} |")
    # The question names how the encoders were used: a frozen probe can miss ink that fine-tuning finds.
    used = [MODE_WORDS[mode] for mode in MODE_WORDS if mode in {row["mode"] for row in compared}]
    question = f"Does a pretrained encoder, {' or '.join(used)}, find ink" if used else "Does a pretrained encoder find ink"
    lines += ["", f"{question} with fewer labels? {answer}", "",
              f"Runs from code {', '.join(codes)}." if len(codes) > 1 else f"Every run from code {codes[0]}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], band: NoSkillBand, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    counts = sorted({row["glyphs"] for row in rows})
    axes.axhspan(band.blind_mean, band.blind_p95, color="grey", alpha=0.25, label="no-skill band (random maps)")
    axes.axhline(band.chance_f05, color="black", linestyle="--", linewidth=1, label="chance (every pixel ink)")
    curves = {}
    for row in rows:
        curves.setdefault(f"{row['encoder']} ({row['mode']})", []).append(row)
    for label, curve in curves.items():
        curve = sorted(curve, key=lambda row: row["glyphs"])
        glyph_counts = [row["glyphs"] for row in curve]
        line, = axes.plot(glyph_counts, [row["f05_mean"] for row in curve], marker="o", label=label)
        axes.fill_between(glyph_counts, [row["f05_min"] for row in curve], [row["f05_max"] for row in curve],
                          color=line.get_color(), alpha=0.2)
    axes.set_xscale("symlog", base=2, linthresh=1)  # doubling glyphs, evenly spaced; 0 (a prior alone) fits too
    axes.set_xticks(counts, [str(count) for count in counts])
    axes.set_ylim(0, 1)  # the whole scale: a zoomed axis makes noise look like a gap
    axes.set_xlabel("labelled glyphs")
    axes.set_ylabel("F0.5 far from the labels (calibrated threshold)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
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
    description = __doc__.split("\n\n")[0].replace("\n", " ")
    epilog = ("Settings after `--` go to every finetune/train.py run, e.g. `-- --NUM_EPOCHS 10 --BATCH_SIZE 4` "
              "(python finetune/train.py --help lists them). See the top of evaluate/label_efficiency.py for how runs "
              "are scored and judged.")
    parser = errors.ArgumentParser(description=description, epilog=epilog, formatter_class=encoder_input.HelpFormatter)
    parser.add_argument("--pretrained_path", "--encoders", nargs="+", required=True, action=RenamedOption,
                        help="'random' or encoder checkpoints (any kind) (--encoders: its older name)")
    parser.add_argument("--names", nargs="*", help="a short name per encoder (default: file names)")
    encoder_input.add_segment_argument(parser, "segment spec with ink labels (ID, zarr, layer folder, demo)")
    encoder_input.add_input_arguments(parser)
    parser.add_argument("--glyphs", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of labelled glyphs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3],
                        help="seeds 0 … n-1: glyph choice and fine-tuning SEED (notes/verdict_rules.md: how many a "
                             "'yes' needs); one "
                             "count for every --glyphs value, or one count per value (--glyphs 1 2 4 --seeds 8 8 3)")
    parser.add_argument("--modes", nargs="+", default=["full"], choices=["full", "lpft", "frozen"],
                        help="full fine-tuning, LP-FT (frozen encoder first, then everything), and/or a frozen encoder "
                             "read by logistic regression from its features (seconds a run, beside minutes)")
    parser.add_argument("--lp_epochs", type=ranges.ranged(int, ranges.AT_LEAST_0), default=5,
                        help="LP-FT: epochs with the encoder frozen")
    parser.add_argument("--random_epochs_factor", "--scratch_epochs_factor", type=ranges.ranged(int, ranges.AT_LEAST_1),
                        default=1, action=RenamedOption,
                        help="above 1: also a random arm trained this many times the epochs (random_xN; "
                             "--scratch_epochs_factor: its older name)")
    parser.add_argument("--random_epochs_when", choices=["claimable", "always"], default="claimable",
                        help="train the longer random arm only at the glyph counts where a cell could still be claimed "
                             "(a gain over random with p ≤ --alpha before correction), or at every count")
    parser.add_argument("--run_epochs", type=ranges.ranged(int, ranges.AT_LEAST_1), default=RUN_EPOCHS,
                        help="NUM_EPOCHS of every run (unless given after --), each of at least --run_tiles_per_epoch "
                             "tiles (notes/performance.md: the pilot that chose them)")
    parser.add_argument("--run_tiles_per_epoch", type=ranges.ranged(int, ranges.AT_LEAST_1), default=RUN_TILES_PER_EPOCH,
                        help="MIN_TILES_PER_EPOCH of every run (unless given after --)")
    parser.add_argument("--negatives", nargs="+", default=["off"], choices=["off", "on"],
                        help="also (or only) runs whose glyphs come with painted negatives around them, the rest unknown")
    parser.add_argument("--self_training_rounds", type=ranges.ranged(int, ranges.AT_LEAST_0), default=0,
                        help="SELF_TRAINING_ROUNDS of every run; each round's prediction is scored")
    parser.add_argument("--prior", type=pathlib.Path,
                        help="a prior map of the segment (greyscale PNG): adds runs whose first labels come from it")
    parser.add_argument("--prior_name", default="prior", help="the prior's name in the arms and tables")
    parser.add_argument("--label_part", type=ranges.ranged(float, ranges.FRACTION_INSIDE), default=0.4,
                        help="fraction of the longer side where glyphs are labelled")
    parser.add_argument("--score_part", type=ranges.ranged(float, ranges.FRACTION_INSIDE), default=0.5,
                        help="fraction of the longer side, at its far end, scored")
    parser.add_argument("--min_glyph_pixels", type=ranges.ranged(int, ranges.AT_LEAST_0), default=200,
                        help="smaller components are not glyphs (specks)")
    parser.add_argument("--alpha", type=ranges.ranged(float, ranges.FRACTION_INSIDE), default=verdict_rule.ALPHA,
                        help="family-wise error this command's yes/suggestive claims may spend (evaluate/report.py "
                             "splits 0.05 across its commands)")
    parser.add_argument("--jobs", type=ranges.ranged(int, ranges.AT_LEAST_0), default=0,
                        help="fine-tuning runs at a time; 0: one per core on a CPU (each run computes in one thread), "
                             "one on a GPU (where several small runs may keep it busier)")
    parser.add_argument("--reuse_other_code", action="store_true",
                        help="reuse finished runs made by other code (the report then names their code)")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/label_efficiency"),
                        help="folder for the tables, the plot and the runs")
    args = parser.parse_args(argv)
    if min(args.seeds) < 1:
        raise encoder_input.EvaluationError(f"--seeds {' '.join(map(str, args.seeds))}: at least 1 seed is needed")
    if len(args.seeds) not in (1, len(args.glyphs)):
        raise encoder_input.EvaluationError(f"--seeds gives {len(args.seeds)} counts for {len(args.glyphs)} --glyphs values: "
                                            "give one count, or one per value")
    if min(args.glyphs) < (0 if args.prior else 1):
        raise encoder_input.EvaluationError(f"--glyphs {' '.join(map(str, args.glyphs))}: every count must be at least 1 "
                                            "(0, no human label, needs a --prior)")
    if "frozen" in args.modes and (args.prior is not None or args.self_training_rounds):
        raise encoder_input.EvaluationError("--modes frozen fits a probe to the glyphs alone: it takes neither --prior "
                                            "nor --self_training_rounds")
    if args.prior is not None and not args.prior.is_file():
        raise encoder_input.EvaluationError(f"--prior {args.prior} does not exist")
    args.seeds_per_glyphs = dict(zip(args.glyphs, args.seeds * len(args.glyphs) if len(args.seeds) == 1 else args.seeds))
    if OLDER_RANDOM in args.pretrained_path:
        note_renamed(OLDER_RANDOM, RANDOM)
        args.pretrained_path = [RANDOM if path == OLDER_RANDOM else path for path in args.pretrained_path]
    encoder_input.name_encoders(args)
    args.segment = encoder_input.segment_for_runs(args.segment)
    args.jobs = encoder_input.automatic_jobs(args.jobs)
    return args


def main() -> int:
    own, extra = encoder_input.split_at_double_dash(sys.argv[1:])
    args = parse_args(own)
    pretrained = [path for path in args.pretrained_path if path != RANDOM]
    settings = encoder_input.common_settings(pretrained or [RANDOM], args)
    segment = open_segment(args.segment)
    if segment.inklabels is None:
        raise encoder_input.EvaluationError(f"segment {segment.name} has no ink labels to draw glyphs from and score with")
    scoring = regions(segment, args.label_part, args.score_part, settings.tile_size)
    all_glyphs = glyphs(segment.inklabels, scoring.label_yx, args.min_glyph_pixels)
    if len(all_glyphs) < max(args.glyphs):
        raise encoder_input.EvaluationError(f"the labelling part holds {len(all_glyphs)} glyphs of at least "
                                            f"{args.min_glyph_pixels} pixels; --glyphs asks for {max(args.glyphs)}")
    given_epochs = without_epochs(extra)[1]
    epochs = args.run_epochs if given_epochs is None else given_epochs
    arms = [(name, checkpoint, epochs) for name, checkpoint in zip(args.names, args.pretrained_path)]
    longer_arm = (f"{RANDOM}_x{args.random_epochs_factor}", RANDOM, epochs * args.random_epochs_factor)
    planned_random_arms = 1 + (args.random_epochs_factor > 1 and any(mode != "frozen" for mode in args.modes))
    suffix = f"_st{args.self_training_rounds}" if args.self_training_rounds else ""
    priors = [False, True] if args.prior else [False]

    def plan(arms: list[tuple], counts: list[int]) -> list[dict]:
        return [{"name": f"{name}_{mode}{'_negatives' if negatives == 'on' else ''}{'_prior' if prior else ''}{suffix}"
                         f"_k{count}_seed{seed}",
                 "encoder": name, "checkpoint": checkpoint, "epochs": epochs, "mode": mode, "negatives": negatives == "on",
                 "prior": prior, "glyphs": count, "seed": seed}
                for mode in args.modes for negatives in args.negatives for prior in priors for count in counts
                for seed in range(args.seeds_per_glyphs[count]) for name, checkpoint, epochs in arms
                if count > 0 or (prior and negatives == "off")]  # no glyph: the prior alone, nothing to paint around

    seeds = ", ".join(f"{count}: {seeds}" for count, seeds in args.seeds_per_glyphs.items())
    steps = -(-args.run_tiles_per_epoch // 8) * epochs  # at the default BATCH_SIZE of 8
    description = (f"Segment `{segment.name}`: {scoring.description}; {len(all_glyphs)} glyphs to draw from; "
                   f"input {settings.describe()}; seeds per glyph count: {seeds}; each run {epochs} epochs of at least "
                   f"{args.run_tiles_per_epoch} tiles (about {steps} steps at batch 8)"
                   + (f", `{longer_arm[0]}` {longer_arm[2]} epochs " + (
                       "at every glyph count" if args.random_epochs_when == "always" else
                       f"where an encoder's gain over `{RANDOM}` has p ≤ {args.alpha:.3g} before correction (only "
                       "such a cell can be claimed)") if planned_random_arms > 1 else "") + "; "
                   + (f"prior `{args.prior_name}`: {args.prior}; " if args.prior else "") + f"extra fine-tuning settings: "
                   f"{' '.join(extra) or 'none'}.")
    print(description)
    if predicts_scored_only(args):
        write_png_atomic(args.output / PREDICTED_REGION, predicted_region(scoring))
    code = git_commit()
    frozen_features = FrozenFeatures(segment, args.segment, settings)

    def execute(runs: list[dict]) -> list[dict]:
        """Frozen runs first, here, encoder by encoder (each one's features computed once); then fine-tuning runs,
        --jobs at a time, each its own process. Each is scored here, in order, as it finishes. Once one fails no
        other starts (those running finish and are kept), and its error is the command's."""
        frozen = sorted((run for run in runs if run["mode"] == "frozen"),
                        key=lambda run: (run["checkpoint"], run["seed"] if run["checkpoint"] == RANDOM else -1))
        finished = itertools.chain(
            (run_frozen(run, frozen_features, scoring, all_glyphs, args, code) for run in frozen),
            encoder_input.side_by_side(lambda run: run_one(run, args, settings, extra, segment, scoring, all_glyphs, code),
                                       [run for run in runs if run["mode"] != "frozen"], args.jobs))
        results = []
        for run_results in tqdm.tqdm(finished, total=len(runs), desc="runs", unit="run"):
            results += [score(result, segment, scoring) for result in run_results]
            tqdm.tqdm.write(f"{run_results[-1]['name']}: F0.5 {results[-1]['f05']:.3f} (threshold "
                            f"{results[-1]['threshold']:.2f}, chosen on the calibration strip), AUC {results[-1]['auc']:.3f};"
                            f" chance {scoring.chance_f05:.3f}, no-skill band up to {scoring.band.blind_p95:.3f}; "
                            f"{run_results[-1].get('cpu_seconds', math.nan):.0f} CPU-s")
        order = {run["name"]: index for index, run in enumerate(runs)}
        return sorted(results, key=lambda result: order[result["name"]])  # as planned, whatever ran first

    results = execute(plan(arms, args.glyphs))
    if planned_random_arms > 1:
        counts = args.glyphs if args.random_epochs_when == "always" else claimable_counts(results, args.alpha)
        if counts != args.glyphs:
            print(f"{longer_arm[0]}: at glyph count(s) {', '.join(map(str, counts)) or 'none'}, where a gain over {RANDOM} "
                  f"has p ≤ {args.alpha:.3g} before correction; no other cell can be claimed, whatever it would score")
        results += execute([run for run in plan([longer_arm], counts) if run["mode"] != "frozen"])
    rows, compared = summarise(results), comparisons(results, args.alpha, planned_random_arms)
    design = verdict_rule.Design(encoders_per_group=(len({(row["encoder"], row["mode"]) for row in compared}) or 1,),
                                 glyphs=tuple(args.glyphs), seeds=tuple(args.seeds_per_glyphs[count] for count in args.glyphs),
                                 random_arms=len({row["against"] for row in compared}) or 1, alpha=args.alpha)
    rates = verdict_rule.error_rates(design, RATE_EXPERIMENTS)
    answer = verdict(compared, scoring.band, rates, args.alpha)
    codes = sorted({result["code"] if "code" in result else "unrecorded" for result in results})
    prior_alone, prior_text = None, ""
    if args.prior:  # round 0: the prior map itself, scored like every prediction
        prior_alone = scores(read_prior(args.prior, segment), segment, scoring)
        prior_text = (f"\nThe prior `{args.prior_name}` alone (no training): F0.5 {prior_alone['f05']:.3f} at the threshold "
                      f"chosen on the calibration strip, AUC {prior_alone['auc']:.3f}, average precision "
                      f"{prior_alone['average_precision']:.3f}, oracle F0.5 {prior_alone['f05_oracle']:.3f}.")
    report = markdown(rows, compared, description, scoring.band, codes, answer, prior_text)
    write_csv(args.output / "runs.csv", results)
    write_csv(args.output / "label_efficiency.csv", rows)
    write_bytes_atomic(args.output / "label_efficiency.md", report.encode())
    write_bytes_atomic(args.output / "label_efficiency.json", json.dumps(
        {"description": description, "no_skill_band": dataclasses.asdict(scoring.band), "summary": rows,
         "comparisons": compared, "verdict": answer, "design": dataclasses.asdict(design),
         "error_rates": dataclasses.asdict(rates), "codes": codes,
         "prior_alone": prior_alone}, indent=1).encode())
    plot(rows, scoring.band, args.output / "label_efficiency.png", f"{segment.name}: {settings.describe()}")
    print(report)
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
