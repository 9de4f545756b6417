"""Fine-tune the 3D encoder for ink detection, predict the whole segment, and label iteratively.

    python finetune/train.py                                       # the settings below: the demo segment
    python finetune/train.py --scheme iterative --inklabel_path inklabels_two_letters.png --data_augmentation True
    python finetune/train.py --pretrained_path experiments/spark_demo/resnet50_3d_timm_style.pth
    torchrun --nproc_per_node 4 finetune/train.py --segment_id 20230827161847 --BATCH_SIZE 32
    python finetune/train.py --segment_id demo:1 demo:2 demo:3 --VALIDATION_SEGMENTS demo:4   # train on 3, validate on 1
    python finetune/train.py --help                                # every setting, its value and what it means

With `pretrained_path`, the model and the way tiles are cut and scaled (MODEL, DEPTH, DEPTH_OFFSET,
FOLLOW_SURFACE, NORMALIZATION, TILE_SIZE) are the encoder's own, as its checkpoint records them; a value set
here that contradicts it is an error (TILE_SIZE only warns). Writes to OUTPUT_DIR/exp_name/: last.pth (every
epoch, atomically; running the same command again continues, from the same encoder and prior content only),
best.pth (scheme "validation": the epoch of lowest validation loss, or with BEST_BY "last" the last epoch; scheme
"iterative", which holds nothing out to choose by: the last epoch),
prediction.png, labels_vs_prediction.png, log.jsonl and tensorboard_logs/; the prediction also goes to
save_path. Iterative labeling: open save_path in an image editor, paint better labels, run again with them as
inklabel_path. Each label file makes one round_NN/ (labels, prediction, metrics); new labels start the next
round, trained afresh.

Several segments (scheme "validation"): each brings its own labels, training tiles are drawn from all of them
(SEGMENT_SAMPLING), and each held-out region (a band of every segment, or of those VALIDATION_FRACTION gives one,
or the VALIDATION_SEGMENTS whole) is scored alone and pooled; each segment's prediction goes to
predictions/<segment>.png, with its labels_vs_prediction beside.
"""
import dataclasses
import functools
import hashlib
import math
import pathlib
import sys
import time
import typing
import warnings

import pretrain.torchvision_compat  # noqa: F401 - must precede segmentation_models_pytorch and timm
import numpy as np
import torch
import tqdm

from finetune import data, evaluation, inference, outputs
from finetune.loss import ink_loss
from finetune.metrics import THRESHOLDS, all_ink_f05, threshold_counts
from finetune.config import Config, ConfigError, apply_overrides, check_in_file_settings, settings_in
from finetune.model import DEPTH_POOLS, OUTPUT_STRIDES, InkUNet, build_ink_unet
from pretrain import checkpoint, dist
from pretrain.data.patches import (FINETUNE_NAMES, INPUT_OPTIONS, NO_CHECKPOINT_INPUT, NORMALIZATIONS,
                                   InputSettings)
from pretrain.data.segment import (Segment, SegmentError, check_negatives, open_segment,
                                   segment_identity)
from pretrain.models import ENCODER_NAMES
from pretrain.utils import errors, folder_lock, misc, ranges, schedule

if __name__ == "__main__":  # before the settings below are read: a mistake typed into them is one line too
    errors.install(__file__)

# --------------------------------------------------------------------------------------------------
# experiment
exp_name: str = "finetune_demo"  # experiment folder under OUTPUT_DIR; the same name again resumes it
OUTPUT_DIR: str = "experiments"  # where experiment folders go
# the segment(s) to train on, each any open_segment spec: a segment ID, scrollN:ID, a zarr or layer folder, "demo[:seed]"
segment_id: str | list[str] = "demo"
# whole segments to validate on, never trained on (scheme "validation"), instead of a band held out of each segment
VALIDATION_SEGMENTS: str | list[str] | None = None
scheme: str = "validation"  # "validation": hold out a band and measure; "iterative": train on all labels, predict
# Scheme "validation": the epoch best.pth keeps and the prediction uses. "validation_loss": the lowest loss on the
# held-out band, which is then scored, so its scores are optimistic; "last": the last epoch, chosen without looking
# at a scored pixel (what evaluate/ uses to judge encoders).
BEST_BY: str = "validation_loss"
# Label files: one, or with several segments one per segment (segment_id's, then VALIDATION_SEGMENTS', in order;
# None for a segment's own). Ink label PNG (a bare name is looked up in the segment's folder); None: the segment's own
inklabel_path: str | list[str] | None = None
# PNG of pixels painted as not ink. With one, only painted pixels (ink or not ink) train and score; the rest is
# unknown instead of background. None: with the segment's own ink labels, its own negatives (`{id}_negatives.png` or
# `negatives.png` beside them) if it has any; with inklabel_path, none.
negatives_path: str | list[str] | None = None
# PNG of where to predict (within the segment's mask); None: the whole segment mask
mask_path: str | list[str] | None = None
# the uint8 prediction PNG to open in an image editor; None: OUTPUT_DIR/exp_name/prediction.png (one segment; with
# several, each goes to OUTPUT_DIR/exp_name/predictions/<segment>.png)
save_path: str | None = None
# encoder weights: <model>_timm_style.pth, any pretraining, fine-tuning or Kinetics checkpoint; None: random
pretrained_path: str | None = None
freeze_encoder: bool = False  # train only the decoder; the encoder's weights and BatchNorm statistics stay fixed
FREEZE_ENCODER_EPOCHS: int = 0  # LP-FT: train only the decoder for this many epochs first, then everything
# model and input: None takes the pretrained encoder's own (its checkpoint records them), or, without one, the
# default after "else" (pretrain/data/patches.py's NO_CHECKPOINT_INPUT). What each means is said once for every
# script, in that file's INPUT_OPTIONS (shown by --help).
MODEL: str | None = None
DEPTH: int | None = None
DEPTH_OFFSET: int | None = None
FOLLOW_SURFACE: bool | None = None
NORMALIZATION: str | None = None
TILE_SIZE: int | None = None
DEPTH_POOL: str = "max"  # how each stage's 3D features are collapsed over depth: "max" or "mean"
OUTPUT_STRIDE: int = 4  # 4: decode to 1/4 resolution and upsample the logits (cheaper); 1: decode to full resolution
# data
STRIDE: int = 32  # training tile stride
# Width of the held-out band, as a fraction of the segment's longer side. With several segments, one value for every
# segment or one per segment of segment_id, 0 meaning no band of that segment (it trains whole): `--segment_id A B C D
# --VALIDATION_FRACTION 0 0 0 0.3` trains on A, B, C and 70 % of D, and validates on the rest of D
VALIDATION_FRACTION: float | list[float] = 0.2
# "iterative": a training tile must hold this much labelled ink (with negatives: painted pixels)
MIN_INK_FRACTION: float = 0.05
# Several training segments: "area" draws each one's share of the tiles in proportion to its labelled area (papyrus
# outside any held-out band; with negatives, painted pixels), "equal" draws as many from each
SEGMENT_SAMPLING: str = "area"
# An epoch repeats the (augmented) training tiles until it holds at least this many: a few labelled letters
# make only a few dozen tiles.
MIN_TILES_PER_EPOCH: int = 512
# Flips, rot90, affine, brightness/contrast, noise/blur, dropout, z-shift, slice dropout. Turn it on for scheme
# "iterative": from two labelled letters of the demo, the model finds the others with it and only memorises the two
# without it. Off by default: with the demo's full labels every augmentation tried delayed learning past the
# 20-minute CPU budget. notes/finetune.md has both measurements and their commands.
data_augmentation: bool = False
# self-training (scheme "iterative"): after training on the labels, predict the region and go on training the model
# on the labels plus pseudo-labels, this many times. Each round is recorded in its own round_NN/ (docs/finetune.md, "Self-training").
SELF_TRAINING_ROUNDS: int = 0
PSEUDO_INK_THRESHOLD: float = 0.8  # a prediction at least this high becomes an ink pseudo-label
PSEUDO_NOT_INK_THRESHOLD: float = 0.2  # at most this low: a not-ink pseudo-label; in between: unknown
# A prior in place of the first labels (scheme "iterative"): a greyscale map of this segment, such as
# finetune/predict.py's prediction by a model trained on other segments, evaluate/ink_map.py's map or
# evaluate/local_contrast.py's. The first round trains on its confident pixels, ranked within the region: the top
# PRIOR_INK_FRACTION as ink, the bottom PRIOR_NOT_INK_FRACTION as not ink, the rest unknown. Human labels
# (inklabel_path, negatives_path) win wherever they say something; without inklabel_path no human label is used,
# not even the segment's own (they only score the prediction). SELF_TRAINING_ROUNDS then refine.
PRIOR_PATH: str | None = None
# Ink covers a few per cent to about 15 % of a segment's papyrus (0.12 of the demo's): a fraction well under that
# keeps only what the prior is surest of.
PRIOR_INK_FRACTION: float = 0.03
PRIOR_NOT_INK_FRACTION: float = 0.5  # ink seldom covers half the papyrus, so its lower half is mostly not ink
# Ink pseudo-labels (the prior's or a round's) in 8-connected specks of fewer pixels become unknown (0: keep all).
PSEUDO_MIN_INK_PIXELS: int = 0
# optimisation
NUM_EPOCHS: int = 20  # passes over the training tiles
# stop cleanly once this many epochs are done (the schedule still spans NUM_EPOCHS); run again to continue
STOP_AFTER_EPOCHS: int = 0
BATCH_SIZE: int = 8  # global batch (all processes together)
LR: float = 1e-3  # AdamW peak learning rate, after a linear warm-up; cosine decay to 1% of it
WARMUP_EPOCHS: int = 1
WEIGHT_DECAY: float = 1e-2
LABEL_SMOOTHING: float = 0.1  # of the BCE targets: labels are drawn by hand, their edges are uncertain
CLIP: float = 10.0  # gradient-norm clip (0: off)
SEED: int = 0
NUM_WORKERS: int = 1  # DataLoader workers per process (0: read tiles in the main process)
# torch threads per process on the CPU; 0: automatic, the cores this process may use less one per DataLoader worker
# (at least 1), not torch's one per core. On the 2-core machine one thread leaves a core to the tile reader, and two
# threads competing with other jobs ran 5-10× slower.
CPU_THREADS: int = 1
# inference
INFERENCE_STRIDE: int = 32  # sliding-window stride for the whole-segment prediction
TTA: bool = False  # average over flips and a rot90 (4× the inference time)
# --------------------------------------------------------------------------------------------------
DEFAULTS = settings_in(globals())
# The range of every numeric setting above, checked for the values written here and for those given on the command
# line alike (a list setting: each of its values; None, "the checkpoint's own", passes).
SETTING_RANGES = {
    "FREEZE_ENCODER_EPOCHS": ranges.AT_LEAST_0, "DEPTH": ranges.AT_LEAST_1, "TILE_SIZE": ranges.AT_LEAST_1,
    "STRIDE": ranges.AT_LEAST_1, "VALIDATION_FRACTION": ranges.FRACTION_BELOW_1, "MIN_INK_FRACTION": ranges.FRACTION,
    "MIN_TILES_PER_EPOCH": ranges.AT_LEAST_0, "SELF_TRAINING_ROUNDS": ranges.AT_LEAST_0,
    "PSEUDO_INK_THRESHOLD": ranges.FRACTION, "PSEUDO_NOT_INK_THRESHOLD": ranges.FRACTION,
    "PRIOR_INK_FRACTION": ranges.FRACTION_ABOVE_0, "PRIOR_NOT_INK_FRACTION": ranges.FRACTION_ABOVE_0,
    "PSEUDO_MIN_INK_PIXELS": ranges.AT_LEAST_0, "NUM_EPOCHS": ranges.AT_LEAST_1, "STOP_AFTER_EPOCHS": ranges.AT_LEAST_0,
    "BATCH_SIZE": ranges.AT_LEAST_1, "LR": ranges.ABOVE_0, "WARMUP_EPOCHS": ranges.AT_LEAST_0,
    "WEIGHT_DECAY": ranges.AT_LEAST_0, "LABEL_SMOOTHING": ranges.FRACTION_BELOW_1, "CLIP": ranges.AT_LEAST_0,
    "SEED": ranges.AT_LEAST_0, "NUM_WORKERS": ranges.AT_LEAST_0, "CPU_THREADS": ranges.AT_LEAST_0,
    "INFERENCE_STRIDE": ranges.AT_LEAST_1,
}
# The input settings without a pretrained encoder, and the setting that names each field.
# A run whose final F0.5 is less than this above chance (calling every pixel ink) has shown no skill: the margin by
# which evaluate/label_efficiency.py counts one encoder as beating another. A threshold sweep alone lifts a map
# without skill a little above chance (notes/finetune.md, "Rounds trained afresh fell to chance").
NO_SKILL_MARGIN = 0.05
# The prediction's pixels that say how well a run generalised, in the order preferred: the held-out band (scheme
# "validation"), else where nothing was labelled (needs the segment's full labels), else the labelled tiles.
GENERALISATION_GROUPS = ("validation_", "unlabelled_area_", "labelled_tiles_")


@dataclasses.dataclass
class RunState:
    """What resuming needs besides weights and optimizer; saved in every checkpoint."""

    epoch: int = 0  # epochs done
    global_step: int = 0
    best_loss: float = math.inf
    round: int = 0  # iterative labeling round (0 in scheme "validation")
    labels_digest: str = ""
    inputs_digest: str = ""  # the content of the files the run starts from (inputs_digest): resume needs the same
    training_seconds: float = 0.0
    self_training_round: int = 0  # 0: trained on the human labels; n: on the pseudo-labels of round n − 1's prediction


@dataclasses.dataclass
class Run:
    """What every step of one run reads: its settings, the encoder it starts from, where it writes and on what
    device; main() makes it once, and each round opens its own TensorBoard folder (train_round)."""

    config: Config  # the settings above, with the command line's overrides
    settings: InputSettings  # how tiles are cut and scaled (the pretrained encoder's own)
    weights: checkpoint.EncoderWeights | None  # the pretrained encoder; None: random
    experiment_dir: pathlib.Path  # OUTPUT_DIR/exp_name
    device: torch.device
    log: misc.JsonLinesLog  # log.jsonl (rank 0 writes)
    tensorboard: misc.TensorboardLogger | None = None  # the current round's


def encoder_and_input(config) -> tuple[checkpoint.EncoderWeights | None, InputSettings]:
    """The pretrained encoder's weights (None without one) and the input settings to use: the encoder's own,
    except where the config gives a value (a contradiction is an error, see checkpoint.resolve_input_settings)."""
    weights = checkpoint.encoder_weights(config.pretrained_path) if config.pretrained_path is not None else None
    given = {field: getattr(config, name) for field, name in FINETUNE_NAMES.items() if getattr(config, name) is not None}
    return weights, checkpoint.resolve_input_settings(weights, given, NO_CHECKPOINT_INPUT, FINETUNE_NAMES)


def check_settings(config, settings: InputSettings) -> None:
    problems = []
    chosen = {**vars(config), **{name: getattr(settings, field) for field, name in FINETUNE_NAMES.items()}}
    for name, allowed in (("scheme", ("validation", "iterative")), ("BEST_BY", ("validation_loss", "last")),
                          ("MODEL", ENCODER_NAMES),
                          ("DEPTH_POOL", DEPTH_POOLS), ("OUTPUT_STRIDE", OUTPUT_STRIDES),
                          ("NORMALIZATION", NORMALIZATIONS)):
        if chosen[name] not in allowed:
            problems.append(f"{name} {chosen[name]!r} is not one of {', '.join(map(str, allowed))}")
    if chosen["INFERENCE_STRIDE"] > chosen["TILE_SIZE"]:
        problems.append(f"INFERENCE_STRIDE {chosen['INFERENCE_STRIDE']} is larger than TILE_SIZE {chosen['TILE_SIZE']}: "
                        "the pixels between tiles would stay unpredicted")
    if isinstance(config.VALIDATION_FRACTION, list):  # one per segment: 0 holds out no band of that segment
        fractions, training_count = config.VALIDATION_FRACTION, len(as_list(config.segment_id))
        if len(fractions) != training_count:
            problems.append(f"VALIDATION_FRACTION gives {len(fractions)} values for {training_count} segments of "
                            "segment_id: give one for all, or one per segment")
        if not all(0 <= fraction < 1 for fraction in fractions) or not any(fractions):
            problems.append(f"VALIDATION_FRACTION {' '.join(map(str, fractions))}: each must be at least 0 (no band) "
                            "and below 1, and one above 0, or nothing is held out")
        if config.VALIDATION_SEGMENTS is not None:
            problems.append("VALIDATION_FRACTION per segment holds out bands, VALIDATION_SEGMENTS whole segments "
                            "instead: give one or the other")
    elif not 0 < config.VALIDATION_FRACTION < 1:
        problems.append(f"VALIDATION_FRACTION {config.VALIDATION_FRACTION} is not between 0 and 1")
    if config.SELF_TRAINING_ROUNDS and config.scheme != "iterative":
        problems.append("SELF_TRAINING_ROUNDS needs scheme 'iterative': pseudo-labels would cover the held-out band")
    if config.PRIOR_PATH is not None and config.scheme != "iterative":
        problems.append("PRIOR_PATH needs scheme 'iterative': its labels would cover the held-out band")
    if not (0 < config.PRIOR_INK_FRACTION and 0 < config.PRIOR_NOT_INK_FRACTION
            and config.PRIOR_INK_FRACTION + config.PRIOR_NOT_INK_FRACTION <= 1):
        problems.append(f"need PRIOR_INK_FRACTION and PRIOR_NOT_INK_FRACTION above 0, together at most 1 (got "
                        f"{config.PRIOR_INK_FRACTION}, {config.PRIOR_NOT_INK_FRACTION})")
    if config.SEGMENT_SAMPLING not in ("area", "equal"):
        problems.append(f"SEGMENT_SAMPLING {config.SEGMENT_SAMPLING!r} is not one of area, equal")
    if config.scheme == "iterative" and several_segments(config):
        problems.append("scheme 'iterative' labels one segment at a time: give one segment_id and no "
                        "VALIDATION_SEGMENTS, or use scheme 'validation' for several segments")
    if config.save_path is not None and several_segments(config):
        problems.append("save_path names one prediction PNG; with several segments each goes to "
                        "OUTPUT_DIR/exp_name/predictions/<segment>.png")
    if not 0 <= config.PSEUDO_NOT_INK_THRESHOLD < config.PSEUDO_INK_THRESHOLD <= 1:
        problems.append(f"need 0 ≤ PSEUDO_NOT_INK_THRESHOLD < PSEUDO_INK_THRESHOLD ≤ 1 (got "
                        f"{config.PSEUDO_NOT_INK_THRESHOLD}, {config.PSEUDO_INK_THRESHOLD})")
    if config.BATCH_SIZE % dist.world_size():
        problems.append(f"BATCH_SIZE {config.BATCH_SIZE} is not divisible by the {dist.world_size()} processes")
    if problems:
        raise ConfigError("; ".join(problems))


@dataclasses.dataclass
class Labels:
    """The labels of a run: the human labels, what the first round trains on (they, or a prior's labels under
    them), where they came from, and where to predict."""

    human_yx: np.ndarray  # (Y, X) uint8: 1 ink, 0 not ink, data.UNKNOWN (only with negatives)
    negatives_yx: np.ndarray | None  # (Y, X) uint8, pixels painted as not ink, or None
    source: str
    region_yx: np.ndarray  # (Y, X) bool
    training_yx: np.ndarray  # (Y, X) uint8: the first round's labels, human_yx itself without a prior
    from_prior: bool = False

    def digest(self) -> str:
        """Identifies the labels: other labels (or another prior) start the next iterative round."""
        ink = np.packbits(self.training_yx == 1).tobytes()
        partial = self.negatives_yx is not None or self.from_prior
        known = np.packbits(self.training_yx != data.UNKNOWN).tobytes() if partial else b""
        return hashlib.sha256(ink + known).hexdigest()


def as_list(value) -> list:
    """A setting that takes one value or several, as a list ([] for None)."""
    return [] if value is None else value if isinstance(value, list) else [value]


def specs_of(config) -> list[str]:
    """The run's segment specs: segment_id's (trained on), then VALIDATION_SEGMENTS' (only validated on)."""
    return as_list(config.segment_id) + as_list(config.VALIDATION_SEGMENTS)


def band_fractions(config) -> list[float]:
    """Each training segment's VALIDATION_FRACTION (segment_id's order; 0: no band)."""
    if isinstance(config.VALIDATION_FRACTION, list):
        return config.VALIDATION_FRACTION
    return [config.VALIDATION_FRACTION] * len(as_list(config.segment_id))


def several_segments(config) -> bool:
    """A run on several segments names its outputs by segment and logs each one's metrics beside the pooled ones;
    a run on one writes what it always has."""
    return len(specs_of(config)) > 1


class LabelFiles(typing.NamedTuple):
    """One segment's inklabel_path, negatives_path and mask_path (None: its own labels, no negatives, its mask)."""

    inklabel: str | None
    negatives: str | None
    mask: str | None


def label_files(config) -> list[LabelFiles]:
    """Each segment's label files (specs_of's order): a label setting is None for every segment, or gives one file
    per segment (a single file for a one-segment run)."""
    count = len(specs_of(config))
    columns = []
    for name in ("inklabel_path", "negatives_path", "mask_path"):
        files = as_list(getattr(config, name)) or [None] * count
        if len(files) != count:
            raise ConfigError(f"{name} gives {len(files)} file(s) for {count} segments: give one per segment, in the "
                              "order of segment_id then VALIDATION_SEGMENTS (None for a segment's own)")
        columns.append(files)
    return [LabelFiles(*files) for files in zip(*columns)]


def load_labels(config, segment: Segment, files: LabelFiles) -> Labels:
    """The labels to train on, from inklabel_path / negatives_path or the segment's own, and the region to predict."""
    region_yx = segment.mask
    if files.mask is not None:
        mask_file = data.resolve_label_path(files.mask, segment, "mask_path")
        region_yx = segment.mask & data.read_label_file(mask_file, segment, "mask_path").astype(bool)
    negatives_yx, negatives_source = None, ""
    if files.inklabel is None and config.PRIOR_PATH is not None:
        ink_yx, source = np.zeros(segment.shape[1:], np.uint8), "no human labels"
    elif files.inklabel is None:
        if segment.inklabels is None:
            raise SegmentError(f"segment {segment.name} has no ink labels of its own; set inklabel_path")
        ink_yx, source = segment.inklabels, f"{segment.name}'s own ink labels (with the segment, {segment.location})"
        if segment.negatives is not None:
            negatives_yx, negatives_source = segment.negatives, " and its own negatives"
    else:
        path = data.resolve_label_path(files.inklabel, segment, "inklabel_path")
        ink_yx, source = data.read_label_file(path, segment, "inklabel_path"), str(path)
        if config.scheme == "iterative" and not ink_yx.any() and config.PRIOR_PATH is None:
            raise SegmentError(f"inklabel_path {path} holds no ink: scheme 'iterative' needs at least one labelled letter")
    if files.negatives is not None:
        path = data.resolve_label_path(files.negatives, segment, "negatives_path")
        negatives_yx, negatives_source = data.read_label_file(path, segment, "negatives_path"), f" and negatives {path}"
        check_negatives(ink_yx, negatives_yx, f"negatives_path {path}")
    human_yx = data.training_labels(ink_yx, negatives_yx)
    if config.PRIOR_PATH is None:
        return Labels(human_yx, negatives_yx, source + negatives_source, region_yx, human_yx)
    path = data.resolve_label_path(config.PRIOR_PATH, segment, "PRIOR_PATH")
    from_prior_yx = data.prior_labels(data.read_prior(path, segment), region_yx, config.PRIOR_INK_FRACTION,
                                      config.PRIOR_NOT_INK_FRACTION, config.PSEUDO_MIN_INK_PIXELS)
    source = (f"prior {path} (its top {config.PRIOR_INK_FRACTION:.0%} of the region as ink, its bottom "
              f"{config.PRIOR_NOT_INK_FRACTION:.0%} as not ink) under {source + negatives_source}")
    training_yx = data.with_human_labels(from_prior_yx, ink_yx, negatives_yx)
    if not (training_yx == 1).any():
        raise SegmentError(f"PRIOR_PATH {path} gives no ink label: its top {config.PRIOR_INK_FRACTION:.0%} is all "
                           f"specks under PSEUDO_MIN_INK_PIXELS {config.PSEUDO_MIN_INK_PIXELS}, or the map is flat")
    return Labels(human_yx, negatives_yx, source, region_yx, training_yx, from_prior=True)


@dataclasses.dataclass
class RunSegment:
    """One segment of the run and what the run does with it: its human labels, the tiles it trains on, what of it
    is held out, and the labels of the current round (the human ones, or in self-training pseudo-labels)."""

    spec: str  # as given in segment_id or VALIDATION_SEGMENTS
    name: str  # names its outputs (predictions/<name>.png) and its entries in the log and TensorBoard
    segment: Segment
    human: Labels
    trains: bool  # False: a VALIDATION_SEGMENTS segment, only validated on
    held_out: data.Box | None  # the validation band, or the whole of a validation segment; None: nothing held out
    human_origins: np.ndarray  # (N, 2) training tile origins the human labels chose ((0, 2) when it does not train)
    full_labels_yx: np.ndarray | None  # (Y, X) the segment's own ink labels when it trains on others, else None
    labels_yx: np.ndarray  # (Y, X) uint8 labels of the current round (see data.UNKNOWN)
    label_source: str
    train_origins: np.ndarray  # (N, 2) the current round's training tiles


def check_segments(config) -> list[str]:
    """Each segment's identity (specs_of's order: `segment_identity`, which opens nothing). One segment given
    twice, or in both segment_id and VALIDATION_SEGMENTS, in whatever spellings (demo:1 and demo:01, an ID bare and
    as scroll1:ID, a path relative and absolute), is an error: a validation segment must be one never trained on."""
    training_count, specs = len(as_list(config.segment_id)), specs_of(config)
    identities = [segment_identity(spec) for spec in specs]
    for index, identity in enumerate(identities):
        if identity not in identities[:index]:
            continue
        first = identities.index(identity)
        also = f" (as {specs[first]} too)" if specs[first] != specs[index] else ""
        if first < training_count <= index:
            raise ConfigError(f"segment {specs[index]} is in both segment_id and VALIDATION_SEGMENTS{also}: a "
                              "validation segment must be one the model never trains on")
        raise ConfigError(f"segment {specs[index]} is given twice{also}")
    return identities


def open_run_segments(config, settings: InputSettings) -> list[RunSegment]:
    """Every segment of the run (specs_of's order), opened, with its labels read and its tiles split."""
    training_specs, specs = as_list(config.segment_id), specs_of(config)
    check_segments(config)
    run_segments, fractions = [], band_fractions(config)
    for index, (spec, name, files) in enumerate(zip(specs, outputs.output_names(specs), label_files(config))):
        segment = open_segment(spec)
        human = load_labels(config, segment, files)
        trains = index < len(training_specs)
        no_tiles = np.zeros((0, 2), np.int64)
        if not trains:
            held_out, origins = data.Box(0, segment.shape[1], 0, segment.shape[2]), no_tiles
        elif human.from_prior and not (human.human_yx == 1).any():  # no human label chooses a tile
            held_out, origins = None, no_tiles
        else:
            held_out, origins = split(config, settings, segment, human.human_yx,
                                      painted_chooses=human.negatives_yx is not None, band_fraction=fractions[index])
        # The first round trains on the tiles the human labels chose, unless a prior's labels lie under them.
        train_origins = split(config, settings, segment, human.training_yx, painted_chooses=True,
                              band_fraction=fractions[index])[1] if human.from_prior else origins
        # The segment's own labels score the prediction where training used others (or none: a prior alone).
        own_labels = files.inklabel is not None or human.from_prior
        run_segments.append(RunSegment(
            spec=spec, name=name, segment=segment, human=human, trains=trains, held_out=held_out,
            human_origins=origins, full_labels_yx=segment.inklabels if own_labels else None,
            labels_yx=human.training_yx, label_source=human.source, train_origins=train_origins))
    return run_segments


def labels_digest(run_segments: list[RunSegment]) -> str:
    """Identifies the human labels of every segment (see Labels.digest)."""
    if len(run_segments) == 1:
        return run_segments[0].human.digest()
    return hashlib.sha256("".join(run_segment.human.digest() for run_segment in run_segments).encode()).hexdigest()


def build_model(run: Run) -> InkUNet:
    config, settings, weights = run.config, run.settings, run.weights
    model = build_ink_unet(settings.model, config.DEPTH_POOL, config.OUTPUT_STRIDE, config.freeze_encoder)
    depth_ratio, height_ratio, _ = model.encoder.get_downsample_ratio()
    if settings.depth % depth_ratio or settings.tile_size % height_ratio:
        raise ConfigError(f"DEPTH {settings.depth} and TILE_SIZE {settings.tile_size} must be multiples of "
                          f"{settings.model}'s downsample ratios {depth_ratio} and {height_ratio}")
    if weights is not None:
        checkpoint.load_encoder(model.encoder, weights, settings.model, "MODEL")
        if dist.is_master():
            print(f"encoder: {weights.description}")
    return model


def inputs_digest(config) -> str:
    """sha256 of the bytes of the files a run starts from besides its labels: the pretrained encoder and the prior.
    Their paths say nothing: a checkpoint overwritten in place is another start."""
    return hashlib.sha256(" ".join(misc.file_sha256(path) if path else "-"
                                   for path in (config.pretrained_path, config.PRIOR_PATH)).encode()).hexdigest()


def resume_point(run: Run, labels_digest: str, start_digest: str):
    """(the state to start from, the saved checkpoint to load or None): last.pth's when it continues this run, which
    needs the same encoder and prior content (`inputs_digest`) and, in scheme "validation", the same labels. In
    scheme "iterative", other labels start the next round afresh."""
    config, settings, checkpoint_path = run.config, run.settings, run.experiment_dir / "last.pth"
    fresh = RunState(round=1 if config.scheme == "iterative" else 0, labels_digest=labels_digest,
                     inputs_digest=start_digest)
    if not checkpoint_path.is_file():
        return fresh, None
    saved = checkpoint.read(checkpoint_path)
    previous = saved["config"]
    if previous["scheme"] != config.scheme or checkpoint.input_settings(saved) != settings:
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} is a {previous['scheme']} run on {checkpoint.input_settings(saved).describe()} that this "
            f"run ({config.scheme}, {settings.describe()}) cannot continue; set another exp_name")
    state = RunState(**saved["state"])
    if state.inputs_digest != start_digest:
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} continues a run that started from another pretrained_path or PRIOR_PATH content (the "
            "files differ from this run's, whatever their names); set another exp_name")
    if config.scheme == "validation" and state.labels_digest != labels_digest:
        raise checkpoint.CheckpointError(f"{checkpoint_path} continues a run on other labels; set another exp_name")
    if config.scheme == "iterative" and state.labels_digest != labels_digest:
        print(f"new labels: round {state.round + 1} starts from {config.pretrained_path or 'random init'}")
        return dataclasses.replace(fresh, round=state.round + 1), None
    return state, saved


def save_checkpoint(run: Run, path: pathlib.Path, model, state: RunState, optimizer=None) -> None:
    """Weights, settings and state; with the optimizer too when it is for resuming."""
    if dist.is_master():
        entries = {"optimizer": optimizer.state_dict()} if optimizer is not None else {}
        checkpoint.save(path, "finetune", model.state_dict(), run.settings, config=run.config.as_dict(),
                        state=dataclasses.asdict(state), **entries)


def train_one_epoch(run: Run, model, ddp_model, optimizer, loader, state: RunState) -> float:
    config, device = run.config, run.device
    model.train()
    iterations_per_epoch = len(loader)
    total_iterations = config.NUM_EPOCHS * iterations_per_epoch
    warmup_iterations = max(1, config.WARMUP_EPOCHS * iterations_per_epoch)
    loss_sum = 0.0
    progress = tqdm.tqdm(loader, desc=f"epoch {state.epoch + 1}/{config.NUM_EPOCHS}", disable=not dist.is_master())
    for batch in progress:
        lr = schedule.lr_at(state.global_step, config.LR, warmup_iterations, total_iterations)
        schedule.apply(optimizer, lr, config.WEIGHT_DECAY)
        volume_b1dhw = batch["volume"].to(device, non_blocking=True)
        labels_b1hw = batch["label"].to(device, non_blocking=True).unsqueeze(1)
        with dist.autocast(device):
            logits_b1hw = ddp_model(volume_b1dhw)
        loss = ink_loss(logits_b1hw.float(), labels_b1hw, config.LABEL_SMOOTHING)
        loss_value, grad_norm = schedule.optimizer_step(loss, model, optimizer, config.CLIP,
                                                        f"epoch {state.epoch + 1}, step {state.global_step}",
                                                        "last.pth holds the last good epoch; try a lower LR")
        loss_sum += loss_value
        run.tensorboard.scalars(state.global_step, train__loss=loss_value, train__grad_norm=grad_norm, hp__lr=lr)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
        state.global_step += 1
    return loss_sum / iterations_per_epoch


def split(config, settings: InputSettings, segment: Segment, labels_yx: np.ndarray, painted_chooses: bool,
          band_fraction: float) -> tuple[data.Box | None, np.ndarray]:
    """The held-out band, `band_fraction` of the segment wide (scheme "validation" without VALIDATION_SEGMENTS, and
    a fraction above 0; else None), and the (N, 2) training tile origins, as the (Y, X) training labels choose them.
    In scheme "iterative" a tile needs MIN_INK_FRACTION of ink or, when `painted_chooses`, of painted pixels (ink or
    not)."""
    held_out = None
    if config.scheme == "validation" and config.VALIDATION_SEGMENTS is None and band_fraction > 0:
        held_out = data.choose_validation_box(segment.mask, labels_yx, settings.tile_size, band_fraction)
    chooser_yx = labels_yx != data.UNKNOWN if painted_chooses else labels_yx == 1
    train_origins = data.training_origins(segment, settings.tile_size, config.STRIDE, held_out,
                                          config.MIN_INK_FRACTION if config.scheme == "iterative" else 0.0, chooser_yx)
    return held_out, train_origins


def labelled_area(run_segment: RunSegment) -> int:
    """Pixels of the segment that train with a label: papyrus outside any held-out band, whose label is known."""
    known_yx = (run_segment.labels_yx != data.UNKNOWN) & run_segment.segment.mask
    if run_segment.held_out is not None:
        known_yx &= ~run_segment.held_out.region_yx(known_yx.shape)
    return int(np.count_nonzero(known_yx))


def build_loaders(run: Run, run_segments: list[RunSegment]):
    """(training loader, its augmentation, [(segment, its validation loader)] for each segment that holds something
    out). An epoch repeats the training tiles up to MIN_TILES_PER_EPOCH, each training segment taking its share
    (SEGMENT_SAMPLING); each process takes its part, reshuffled per (SEED, epoch), from one sampler."""
    config, settings = run.config, run.settings
    training = [run_segment for run_segment in run_segments if run_segment.trains]
    for run_segment in training:
        if len(run_segment.train_origins) == 0:
            raise SegmentError(f"segment {run_segment.spec} holds no training tile of {settings.tile_size} pixels "
                               f"({run_segment.label_source})")
    margin = (min(data.depth_margin(run_segment.segment.shape[0], settings) for run_segment in training)
              if config.data_augmentation else 0)
    augmentation = data.TileAugmentation(settings.depth, margin, config.data_augmentation, config.SEED)
    train_set = data.TrainingTiles([data.tile_dataset(run_segment.segment, run_segment.train_origins, settings,
                                                      run_segment.labels_yx, augmentation, margin)
                                    for run_segment in training], augmentation)
    shares = data.segment_shares([labelled_area(run_segment) for run_segment in training],
                                 equal=config.SEGMENT_SAMPLING == "equal")
    sampler = data.SegmentMixSampler([len(run_segment.train_origins) for run_segment in training], shares,
                                     config.MIN_TILES_PER_EPOCH, config.SEED, dist.rank(), dist.world_size())
    batch_per_process = config.BATCH_SIZE // dist.world_size()
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_per_process, sampler=sampler, num_workers=config.NUM_WORKERS, drop_last=True,
        worker_init_fn=data.reseed_worker, pin_memory=run.device.type == "cuda")
    if len(train_loader) == 0:
        raise ConfigError(f"{sampler.length} training tiles make no batch of {config.BATCH_SIZE}; lower BATCH_SIZE")
    validation_loaders = []
    for run_segment in run_segments:
        if run_segment.held_out is None:
            continue
        origins = data.validation_origins(run_segment.segment, settings.tile_size, run_segment.held_out)
        validation_set = data.tile_dataset(run_segment.segment, origins[dist.rank()::dist.world_size()], settings,
                                           run_segment.labels_yx)
        validation_loaders.append((run_segment, torch.utils.data.DataLoader(
            validation_set, batch_size=batch_per_process, num_workers=config.NUM_WORKERS)))
    return train_loader, augmentation, validation_loaders


def prediction_paths(run: Run, run_segment: RunSegment, several: bool):
    """(the prediction PNG, its labels_vs_prediction image): a run on one segment writes prediction.png (and
    save_path); on several, predictions/<segment>.png as predict.py names them, and <segment>_labels_vs_prediction.png."""
    if several:
        folder = run.experiment_dir / "predictions"
        return folder / f"{run_segment.name}.png", folder / f"{run_segment.name}_labels_vs_prediction.png"
    save_path = pathlib.Path(run.config.save_path) if run.config.save_path else run.experiment_dir / "prediction.png"
    return save_path, run.experiment_dir / "labels_vs_prediction.png"


def predict_and_write(run: Run, model, run_segments: list[RunSegment], state: RunState) -> np.ndarray:
    """Each segment's whole prediction with the best weights, its metrics (against the human labels, where the human
    labels chose the tiles, so every round is measured alike), and every output file; with several segments also
    the metrics of every held-out pixel pooled. Returns the last segment's (Y, X) map: in scheme "iterative", which
    has one segment, the one self-training reads."""
    config, settings, experiment_dir, tensorboard = run.config, run.settings, run.experiment_dir, run.tensorboard
    if config.scheme == "validation":  # in "iterative" the best weights are the last epoch's, in `model`
        dist.barrier()  # rank 0 wrote best.pth
        model.load_state_dict(checkpoint.read(experiment_dir / "best.pth")["model"])
    several = several_segments(config)
    held_out_probabilities, held_out_ink = [], []  # (P,) each, per segment, pooled at the end
    calibration_counts = np.zeros((4, len(THRESHOLDS)), np.int64)  # several segments: over their calibration pixels
    for run_segment in run_segments:
        segment, human = run_segment.segment, run_segment.human
        started = time.time()
        probabilities_yx = inference.predict_segment(
            model, segment, human.region_yx, settings, config.INFERENCE_STRIDE, config.BATCH_SIZE // dist.world_size(),
            run.device, config.TTA, config.NUM_WORKERS)
        # Before anything is scored or written: NaN would be written as 0, a map that scores exactly chance.
        prediction_png = outputs.probability_image(probabilities_yx, f"the prediction of run {experiment_dir} on "
                                                                     f"{run_segment.name} (round {state.round})")
        metrics = evaluation.prediction_metrics(probabilities_yx, human.human_yx, human.region_yx,
                                                run_segment.held_out, run_segment.human_origins, settings.tile_size,
                                                run_segment.full_labels_yx)
        if not dist.is_master():
            continue
        if run_segment.held_out is not None:
            scored_yx = evaluation.held_out_pixels(human.training_yx, human.region_yx, run_segment.held_out)
            held_out_probabilities.append(probabilities_yx[scored_yx])
            held_out_ink.append(human.training_yx[scored_yx] == 1)
        if several:  # the pooled threshold is chosen blind on every segment's training labels, as each segment's is
            calibration_yx = evaluation.calibration_pixels(human.human_yx, human.region_yx, run_segment.held_out,
                                                           run_segment.human_origins, settings.tile_size)
            calibration_counts += threshold_counts(probabilities_yx[calibration_yx],
                                                   human.human_yx[calibration_yx] == 1)
        save_path, comparison_path = prediction_paths(run, run_segment, several)
        outputs.write_png_atomic(save_path, prediction_png)
        if not several and save_path.resolve() != (experiment_dir / "prediction.png").resolve():
            outputs.write_png_atomic(experiment_dir / "prediction.png", prediction_png)
        band = run_segment.held_out if run_segment.trains else None  # a validation segment is held out whole: no box
        comparison = outputs.labels_vs_prediction(run_segment.labels_yx, probabilities_yx, segment.mask, band,
                                                  run_segment.spec if several else "")
        outputs.write_png_atomic(comparison_path, comparison)
        tensorboard.image(f"prediction/{run_segment.name}" if several else "prediction/labels_vs_prediction",
                          outputs.preview_chw(comparison), state.global_step)
        group = generalisation_group(metrics)
        if config.scheme == "iterative":  # no band is scored each epoch: the round's prediction is its validation/ point
            if group is not None:
                tensorboard.scalars(state.global_step, validation__f05=metrics[group + "f05"],
                                    validation__auc=metrics[group + "auc"],
                                    validation__f05_chance=all_ink_f05(metrics[group + "ink_fraction"]))
            folder = outputs.record_round(experiment_dir, state.round, run_segment.labels_yx, segment.mask,
                                          run_segment.label_source, prediction_png, metrics)
            print(f"round {state.round} recorded in {folder}")
        which = {"segment": run_segment.spec, "name": run_segment.name} if several else {}
        run.log.write(event="prediction", **which, seconds=round(time.time() - started, 1), save_path=str(save_path),
                      round=state.round, **metrics)
        if group is None:  # a prior alone on a segment without labels of its own: nothing to score against
            print(f"prediction: {save_path} ({time.time() - started:.0f} s); no labels to score it against")
            continue
        print(f"prediction{f' of {run_segment.name}' if several else ''}: {save_path} ({time.time() - started:.0f} s). "
              f"Scored from the whole-segment prediction (overlapping tiles, blended): "
              + evaluation.describe(metrics, "held-out band " if run_segment.trains else "held-out segment "))
        if not several:
            warn_if_no_skill(metrics, f"round {state.round}" if config.scheme == "iterative" else "the run")
    if several and dist.is_master():
        pooled = evaluation.validation_metrics(np.concatenate(held_out_probabilities), np.concatenate(held_out_ink),
                                               calibration_counts)
        names = [run_segment.name for run_segment in run_segments if run_segment.held_out is not None]
        run.log.write(event="pooled_prediction", segments=names, round=state.round, **pooled)
        print(f"pooled over the held-out pixels of {', '.join(names)}: " + evaluation.describe(pooled, ""))
        warn_if_no_skill(pooled, "the run")
    return probabilities_yx


def generalisation_group(metrics: dict) -> str | None:
    """The prefix of the first of GENERALISATION_GROUPS that `metrics` (as prediction_metrics returns them) holds."""
    return next((prefix for prefix in GENERALISATION_GROUPS if prefix + "f05" in metrics), None)


def warn_if_no_skill(metrics: dict, what: str) -> None:
    """One warning when the prediction's F0.5 where it generalises is within NO_SKILL_MARGIN of chance."""
    group = generalisation_group(metrics)
    f05, chance = metrics[group + "f05"], all_ink_f05(metrics[group + "ink_fraction"])
    if f05 < chance + NO_SKILL_MARGIN:
        where = group.rstrip("_").replace("_", " ")
        warnings.warn(f"{what} shows no skill: its F0.5 ({where}) {f05:.3f} is less than {NO_SKILL_MARGIN} above "
                      f"chance {chance:.3f}, what calling every pixel ink scores; it has not learnt to find ink")


VALIDATION_SCALARS = ("loss", "f05", "threshold", "auc", "iou")  # of each validation, to TensorBoard


def validate_epoch(run: Run, model, validation_loaders, state: RunState):
    """Every held-out region scored with one tile per pixel: (the pooled metrics, {segment name: its metrics}),
    both also to TensorBoard (the pooled ones as validation/, each segment's as validation_<name>/ when there are
    several)."""
    tensorboard, device = run.tensorboard, run.device
    loss_function = functools.partial(ink_loss, label_smoothing=run.config.LABEL_SMOOTHING)
    several = several_segments(run.config)
    scores, per_segment = [], {}
    for run_segment, loader in validation_loaders:
        segment_scores, band_probabilities_hw = evaluation.validate(
            model, loader, loss_function, device, run_segment.labels_yx, run_segment.segment.mask, run_segment.held_out)
        scores.append(segment_scores)
        per_segment[run_segment.name] = evaluation.pooled_metrics([segment_scores])
        box = run_segment.held_out
        band = (slice(box.y0, box.y1), slice(box.x0, box.x1))
        tensorboard.image(f"validation/{run_segment.name}" if several else "validation/labels_vs_prediction",
                          outputs.preview_chw(outputs.labels_vs_prediction(
                              run_segment.labels_yx[band], band_probabilities_hw, run_segment.segment.mask[band],
                              segment=run_segment.spec if several else "")),
                          state.global_step)
        if several:
            segment_scalars = per_segment[run_segment.name]
            tensorboard.scalars(state.global_step, **{f"validation_{run_segment.name}__{key}": segment_scalars[key]
                                                      for key in VALIDATION_SCALARS})
    pooled = evaluation.pooled_metrics(scores)
    tensorboard.scalars(state.global_step, validation__f05_chance=all_ink_f05(pooled["ink_fraction"]),
                        **{f"validation__{key}": pooled[key] for key in VALIDATION_SCALARS})
    return pooled, per_segment


def train(run: Run, model, optimizer, loaders, state: RunState) -> None:
    """The epoch loop, from state.epoch on; every epoch ends with last.pth, which commits it."""
    config, device = run.config, run.device
    train_loader, augmentation, validation_loaders = loaders
    last_epoch = min(config.NUM_EPOCHS, config.STOP_AFTER_EPOCHS) if config.STOP_AFTER_EPOCHS else config.NUM_EPOCHS
    for epoch in range(state.epoch, last_epoch):
        started = time.time()
        train_loader.sampler.set_epoch(epoch)
        augmentation.set_epoch(epoch, dist.rank())
        torch.manual_seed(misc.epoch_seed(config.SEED, dist.rank(), epoch))  # each rank its own, and again on resume
        model.set_encoder_frozen(config.freeze_encoder or epoch < config.FREEZE_ENCODER_EPOCHS)
        ddp_model = dist.wrap(model, device)  # again each epoch: DDP syncs only what needs gradients when it is built
        statistics = {"train_loss": train_one_epoch(run, model, ddp_model, optimizer, train_loader, state)}
        if validation_loaders:
            validation, per_segment = validate_epoch(run, model, validation_loaders, state)
            statistics.update({f"validation_{key}": value for key, value in validation.items()})
            if several_segments(config):
                statistics["validation_segments"] = per_segment
        # Scheme "validation": best is the lowest validation loss, or with BEST_BY "last" the last epoch. "iterative"
        # holds nothing out: best is the last epoch.
        is_best = (not validation_loaders or config.BEST_BY == "last"
                   or statistics["validation_loss"] < state.best_loss)
        state.best_loss = statistics.get("validation_loss", statistics["train_loss"]) if is_best else state.best_loss
        state.epoch = epoch + 1
        state.training_seconds += time.time() - started
        # last.pth goes last because it commits the epoch: a kill before its rename trains the epoch again and
        # rewrites best.pth and the log record. Written first, a kill after it lost them, as resuming skips the epoch.
        if is_best:
            save_checkpoint(run, run.experiment_dir / "best.pth", model, state)
        run.log.write(event="epoch", round=state.round, epoch=state.epoch, global_step=state.global_step,
                      seconds=round(time.time() - started, 1),
                      training_seconds=round(state.training_seconds, 1), best=is_best, **statistics)
        save_checkpoint(run, run.experiment_dir / "last.pth", model, state, optimizer)
        if dist.is_master():
            held_out_text = ""
            if validation_loaders:
                held_out_text = (f"; held-out band, one tile per pixel: {evaluation.describe(validation)}"
                                 if not several_segments(config) else
                                 f"; held out, one tile per pixel, pooled: {evaluation.describe(validation)}"
                                 + "".join(f"; {name}: {evaluation.describe(metrics)}"
                                           for name, metrics in per_segment.items()))
                held_out_text += " (lowest validation loss so far: best.pth)" if is_best else ""
            print(f"epoch {state.epoch}: train loss {statistics['train_loss']:.4f}{held_out_text}; "
                  f"{state.training_seconds:.0f} s of training")
        run.tensorboard.flush()


def round_segments(run: Run, state: RunState, run_segments: list[RunSegment]) -> list[RunSegment]:
    """The segments with the current round's labels and training tiles: as the human labels chose them, or, in a
    self-training round (scheme "iterative": one segment), the round folder's inklabels.png and negatives.png (as
    next_round wrote them, or as a person repainted them before continuing the run)."""
    if state.self_training_round == 0:
        return run_segments
    (run_segment,) = run_segments
    config, folder = run.config, run.experiment_dir / f"round_{state.round:02d}"
    ink_yx = data.read_label_file(folder / "inklabels.png", run_segment.segment, "pseudo-labels")
    negatives_yx = data.read_label_file(folder / "negatives.png", run_segment.segment, "pseudo-labels")
    labels_yx = data.training_labels(ink_yx, negatives_yx)
    source = (f"self-training round {state.self_training_round}: pseudo-labels of round {state.round - 1}'s prediction "
              f"(ink ≥ {config.PSEUDO_INK_THRESHOLD}, not ink ≤ {config.PSEUDO_NOT_INK_THRESHOLD}) under "
              f"{run_segment.human.source} ({folder})")
    train_origins = split(config, run.settings, run_segment.segment, labels_yx, painted_chooses=False,
                          band_fraction=0.0)[1]  # scheme "iterative": nothing is held out
    return [dataclasses.replace(run_segment, labels_yx=labels_yx, label_source=source, train_origins=train_origins)]


def next_round(run: Run, state: RunState, probabilities_yx: np.ndarray, model, run_segment: RunSegment) -> RunState:
    """Write the pseudo-labels of this round's prediction, and the model that made it (the next round starts from
    it), into the next round's folder; returns the next round's fresh state."""
    config, human = run.config, run_segment.human
    pseudo_yx = data.pseudo_labels(probabilities_yx, human.region_yx, human.human_yx == 1, human.negatives_yx,
                                   config.PSEUDO_INK_THRESHOLD, config.PSEUDO_NOT_INK_THRESHOLD,
                                   config.PSEUDO_MIN_INK_PIXELS)
    following = RunState(round=state.round + 1, labels_digest=state.labels_digest, inputs_digest=state.inputs_digest,
                         self_training_round=state.self_training_round + 1)
    if dist.is_master():
        folder = run.experiment_dir / f"round_{following.round:02d}"
        outputs.write_round_labels(folder, pseudo_yx, run_segment.segment.mask)
        checkpoint.save(folder / "start.pth", "finetune", model.state_dict(), run.settings, config=config.as_dict(),
                        state=dataclasses.asdict(state))
        print(f"self-training round {following.self_training_round}: pseudo-labels in {folder} "
              f"({np.count_nonzero(pseudo_yx == 1)} ink, {np.count_nonzero(pseudo_yx == 0)} not-ink pixels)")
    dist.barrier()  # the other ranks read the labels rank 0 wrote
    return following


def describe_segments(run_segments: list[RunSegment], settings: InputSettings) -> tuple[dict, str, str]:
    """What the start record of the log says about the segments, and the header's words on them and the input, and
    lines after it: for one segment its labels and held-out band in the header, as always; for several, a line on
    each."""
    if len(run_segments) == 1:
        (run_segment,) = run_segments
        held_out = run_segment.held_out
        return ({"labels": run_segment.label_source, "held_out": dataclasses.asdict(held_out) if held_out else None},
                f"{run_segment.segment}; input {settings.describe()}; labels: {run_segment.label_source}; "
                f"{len(run_segment.train_origins)} training tiles" + (f", validation band {held_out}" if held_out else ""),
                "")
    records, lines = [], []
    for run_segment in run_segments:
        held_out = run_segment.held_out
        records.append({"segment": run_segment.spec, "name": run_segment.name, "labels": run_segment.label_source,
                        "trains": run_segment.trains, "training_tiles": len(run_segment.train_origins),
                        "held_out": dataclasses.asdict(held_out) if held_out else None})
        role = (f"{len(run_segment.train_origins)} training tiles" + (f", validation band {held_out}" if held_out else "")
                if run_segment.trains else "validation segment, held out whole")
        lines.append(f"\n  {run_segment.name}: {run_segment.segment}; labels: {run_segment.label_source}; {role}")
    training = sum(run_segment.trains for run_segment in run_segments)
    return ({"segments": records}, f"input {settings.describe()}; {len(run_segments)} segments ({training} training)",
            "".join(lines))


def train_round(run: Run, run_segments: list[RunSegment], state: RunState, saved: dict | None):
    """Train one round and predict; returns (the last segment's prediction, the model), or (None, the model) when
    the run stopped early (STOP_AFTER_EPOCHS). A round starts from `saved` when it continues mid-round; a
    self-training round otherwise from the previous round's model (round_NN/start.pth): trained afresh, a round on
    the pseudo-labels did not take off within the demo's 20 epochs (notes/finetune.md)."""
    config, settings, experiment_dir = run.config, run.settings, run.experiment_dir
    run_segments = round_segments(run, state, run_segments)
    torch.manual_seed(config.SEED)  # the decoder's initialisation
    model = build_model(run).to(run.device)
    optimizer = torch.optim.AdamW(schedule.parameter_groups(model), lr=config.LR, weight_decay=config.WEIGHT_DECAY)
    if saved is not None:
        checkpoint.restore(saved, model, optimizer, str(experiment_dir / "last.pth"))
        print(f"resumed from {experiment_dir / 'last.pth'}: round {state.round}, epoch {state.epoch} of "
              f"{config.NUM_EPOCHS} done")
    elif state.self_training_round:
        start = experiment_dir / f"round_{state.round:02d}" / "start.pth"
        model.load_state_dict(checkpoint.read(start)["model"])
        print(f"round {state.round} starts from round {state.round - 1}'s model ({start})")
    loaders = build_loaders(run, run_segments)

    # From here on the run writes.
    folder_lock.hold(experiment_dir, "fine-tuning run")  # made if new; a second run in it stops here
    if dist.is_master():
        misc.remove_stale_temporaries(experiment_dir)
    segments_record, segments_text, segment_lines = describe_segments(run_segments, settings)
    run.log.write(event="start", command=" ".join([sys.executable, *sys.argv]), commit=misc.git_commit(),
                  config=config.as_dict(), input=settings.as_dict(), round=state.round, **segments_record)
    board_dir = experiment_dir / "tensorboard_logs"
    run = dataclasses.replace(run, tensorboard=misc.TensorboardLogger(
        board_dir / f"round_{state.round:02d}" if config.scheme == "iterative" else board_dir))
    run.tensorboard.text("config", "\n".join(f"    {name} = {value!r}" for name, value in config.as_dict().items()))
    if dist.is_master():
        print(f"{settings.model} UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; "
              f"{segments_text}; {len(loaders[0])} steps per epoch on {dist.world_size()} process(es)" + segment_lines)
    train(run, model, optimizer, loaders, state)
    probabilities_yx = None
    if state.epoch < config.NUM_EPOCHS:
        print(f"stopped after epoch {state.epoch} of {config.NUM_EPOCHS}: run the same command again to continue")
    else:
        probabilities_yx = predict_and_write(run, model, run_segments, state)
    run.tensorboard.close()
    return probabilities_yx, model


def main(argv: list[str] | None = None) -> int:
    # The values written above, checked as overrides of them are (the input settings are read through their table).
    check_in_file_settings(DEFAULTS, __file__, read_elsewhere=tuple(FINETUNE_NAMES.values()),
                           setting_ranges=SETTING_RANGES)
    input_help = {option.finetune_name: f"{option.help}; else {getattr(NO_CHECKPOINT_INPUT, field)}"
                  for field, option in INPUT_OPTIONS.items()}
    config = apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv, source_file=__file__,
                             descriptions=input_help, setting_ranges=SETTING_RANGES)
    device = dist.initialize()
    dist.set_cpu_threads(device, config.CPU_THREADS, config.NUM_WORKERS)
    experiment_dir = pathlib.Path(config.OUTPUT_DIR, config.exp_name)
    errors.name_run(config.exp_name, experiment_dir)
    misc.check_writable_folder(experiment_dir, "OUTPUT_DIR/exp_name")

    # Every user error (settings, files, shapes, checkpoints) surfaces before anything is written.
    weights, settings = encoder_and_input(config)
    check_settings(config, settings)
    run = Run(config, settings, weights, experiment_dir, device, log=misc.JsonLinesLog(experiment_dir / "log.jsonl"))
    run_segments = open_run_segments(config, settings)
    try:
        if experiment_dir.is_dir():  # what it holds (last.pth) is read under the lock; a new folder is locked as made
            folder_lock.hold(experiment_dir, "fine-tuning run")
        state, saved = resume_point(run, labels_digest(run_segments), inputs_digest(config))
        while True:
            probabilities_yx, model = train_round(run, run_segments, state, saved)
            if probabilities_yx is None or state.self_training_round >= config.SELF_TRAINING_ROUNDS:
                return 0
            state, saved = next_round(run, state, probabilities_yx, model, run_segments[0]), None
    finally:
        folder_lock.release(experiment_dir)


if __name__ == "__main__":
    exit_code = main()
    dist.finalize()  # main() has returned, so its DDP model is gone before the process group
    sys.exit(exit_code)
