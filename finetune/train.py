"""Fine-tune the 3D encoder for ink detection, predict the whole segment, and label iteratively.

    python finetune/train.py                                       # the settings below: the demo segment
    python finetune/train.py --scheme iterative --inklabel_path inklabels_two_letters.png --data_augmentation True
    python finetune/train.py --pretrained_path experiments/spark_demo/resnet50_3d_timm_style.pth
    torchrun --nproc_per_node 4 finetune/train.py --segment_id 20230827161847 --BATCH_SIZE 32
    python finetune/train.py --help                                # every setting, its value and what it means

With `pretrained_path`, the model and the way tiles are cut and scaled (MODEL, DEPTH, DEPTH_OFFSET,
FOLLOW_SURFACE, NORMALIZATION, TILE_SIZE) are the encoder's own, as its checkpoint records them; a value set
here that contradicts it is an error (TILE_SIZE only warns). Writes to OUTPUT_DIR/exp_name/: last.pth (every
epoch, atomically; running the same command again continues), best.pth (scheme "validation": the epoch of
lowest validation loss; scheme "iterative", which holds nothing out to choose by: the last epoch),
prediction.png, labels_vs_prediction.png, log.jsonl and tensorboard_logs/; the prediction also goes to
save_path. Iterative labeling: open save_path in an image editor, paint better labels, run again with them as
inklabel_path. Each label file makes one round_NN/ (labels, prediction, metrics); new labels start the next
round, trained afresh.
"""
import dataclasses
import functools
import hashlib
import math
import pathlib
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere: package imports

import pretrain.torchvision_compat  # noqa: F401,E402 - must precede segmentation_models_pytorch and timm
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

from finetune import data, evaluation, inference, outputs  # noqa: E402
from finetune.loss import ink_loss  # noqa: E402
from finetune.metrics import all_ink_f05  # noqa: E402
from finetune.config import ConfigError, apply_overrides, check_in_file_settings, settings_in  # noqa: E402
from finetune.model import DEPTH_POOLS, OUTPUT_STRIDES, InkUNet, build_ink_unet  # noqa: E402
from pretrain import checkpoint, dist  # noqa: E402
from pretrain.data.patches import NORMALIZATIONS, InputSettings  # noqa: E402
from pretrain.data.remote import RemoteReadError  # noqa: E402
from pretrain.data.segment import Segment, SegmentError, check_negatives, open_segment  # noqa: E402
from pretrain.models import ENCODER_NAMES  # noqa: E402
from pretrain.utils import misc, schedule  # noqa: E402

# --------------------------------------------------------------------------------------------------
# experiment
exp_name: str = "finetune_demo"  # experiment folder under OUTPUT_DIR; the same name again resumes it
OUTPUT_DIR: str = "experiments"  # where experiment folders go
segment_id: str = "demo"  # any open_segment spec: a segment ID, a zarr or layer folder, "demo[:seed]"
scheme: str = "validation"  # "validation": hold out a band and measure; "iterative": train on all labels, predict
# ink label PNG (a bare name is looked up in the segment's folder); None: the segment's own
inklabel_path: str | None = None
# PNG of pixels painted as not ink. With one, only painted pixels (ink or not ink) train and score; the rest is
# unknown instead of background. None: with the segment's own ink labels, its own negatives (`{id}_negatives.png` or
# `negatives.png` beside them) if it has any; with inklabel_path, none.
negatives_path: str | None = None
mask_path: str | None = None  # PNG of where to predict (within the segment's mask); None: the whole segment mask
# the uint8 prediction PNG to open in an image editor; None: OUTPUT_DIR/exp_name/prediction.png
save_path: str | None = None
# encoder weights: <model>_timm_style.pth, any pretraining, fine-tuning or Kinetics checkpoint; None: random
pretrained_path: str | None = None
freeze_encoder: bool = False  # train only the decoder; the encoder's weights and BatchNorm statistics stay fixed
FREEZE_ENCODER_EPOCHS: int = 0  # LP-FT: train only the decoder for this many epochs first, then everything
# model and input: None takes the pretrained encoder's own (its checkpoint records them), or, without one, the
# default after "else"
MODEL: str | None = None  # 3D encoder; else "resnet50_3d_narrow" (a full-width step took 2.5 s on 2 CPU cores)
DEPTH: int | None = None  # layers per tile (a multiple of the encoder's depth downsample, 8); else 16
DEPTH_OFFSET: int | None = None  # shift of the depth window from the middle layer (or from the surface); else 0
FOLLOW_SURFACE: bool | None = None  # the depth window follows the recto surface found in each tile; else False
# "range" (÷ dtype max), "clip" (Kaggle 50–200 window) or "zscore" (per tile); else "range"
NORMALIZATION: str | None = None
TILE_SIZE: int | None = None  # tile side in pixels (a multiple of 32); else 64
DEPTH_POOL: str = "max"  # how each stage's 3D features are collapsed over depth: "max" or "mean"
OUTPUT_STRIDE: int = 4  # 4: decode to 1/4 resolution and upsample the logits (cheaper); 1: decode to full resolution
# data
STRIDE: int = 32  # training tile stride
VALIDATION_FRACTION: float = 0.2  # width of the held-out band, as a fraction of the segment's longer side
# "iterative": a training tile must hold this much labelled ink (with negatives: painted pixels)
MIN_INK_FRACTION: float = 0.05
# An epoch repeats the (augmented) training tiles until it holds at least this many: a few labelled letters
# make only a few dozen tiles.
MIN_TILES_PER_EPOCH: int = 512
# Flips, rot90, affine, brightness/contrast, noise/blur, dropout, z-shift, slice dropout. Turn it on for scheme
# "iterative": from two labelled letters of the demo, the model found the others with F0.5 0.710-0.735 with it
# (3 seeds, commit e68f381), 0.13 without (commit 1aebe63). Off by default: with the demo's full labels every augmentation tried delayed learning past the
# 20-minute CPU budget (notes/finetune.md).
data_augmentation: bool = False
# self-training (scheme "iterative"): after training on the labels, predict the region and go on training the model
# on the labels plus pseudo-labels, this many times. Each round is recorded in its own round_NN/ (see README).
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
# torch threads per process on CPU (0: torch's default, one per core). On the 2-core machine one thread
# leaves a core to the tile reader, and two threads competing with other jobs ran 5-10× slower.
CPU_THREADS: int = 1
# inference
INFERENCE_STRIDE: int = 32  # sliding-window stride for the whole-segment prediction
TTA: bool = False  # average over flips and a rot90 (4× the inference time)
# --------------------------------------------------------------------------------------------------
DEFAULTS = settings_in(globals())
# The input settings without a pretrained encoder, and the setting that names each field.
INPUT_DEFAULTS = InputSettings(model="resnet50_3d_narrow", depth=16, depth_offset=0, follow_surface=False,
                               normalization="range", tile_size=64)
INPUT_SETTING_NAMES = {"model": "MODEL", "depth": "DEPTH", "depth_offset": "DEPTH_OFFSET",
                       "follow_surface": "FOLLOW_SURFACE", "normalization": "NORMALIZATION", "tile_size": "TILE_SIZE"}
# A run whose final F0.5 is less than this above chance (calling every pixel ink) has shown no skill: the margin by
# which evaluate/label_efficiency.py counts one encoder as beating another. A threshold sweep alone lifts a map
# without skill a little above chance (self-training rounds that never took off ended at 0.141 against 0.140).
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
    training_seconds: float = 0.0
    self_training_round: int = 0  # 0: trained on the human labels; n: on the pseudo-labels of round n − 1's prediction


def encoder_and_input(config) -> tuple[checkpoint.EncoderWeights | None, InputSettings]:
    """The pretrained encoder's weights (None without one) and the input settings to use: the encoder's own,
    except where the config gives a value (a contradiction is an error, see checkpoint.resolve_input_settings)."""
    weights = checkpoint.encoder_weights(config.pretrained_path) if config.pretrained_path is not None else None
    given = {field: getattr(config, name) for field, name in INPUT_SETTING_NAMES.items() if getattr(config, name) is not None}
    return weights, checkpoint.resolve_input_settings(weights, given, INPUT_DEFAULTS, INPUT_SETTING_NAMES)


def check_settings(config, settings: InputSettings) -> None:
    problems = []
    chosen = {**vars(config), **{name: getattr(settings, field) for field, name in INPUT_SETTING_NAMES.items()}}
    for name, allowed in (("scheme", ("validation", "iterative")), ("MODEL", ENCODER_NAMES),
                          ("DEPTH_POOL", DEPTH_POOLS), ("OUTPUT_STRIDE", OUTPUT_STRIDES),
                          ("NORMALIZATION", NORMALIZATIONS)):
        if chosen[name] not in allowed:
            problems.append(f"{name} {chosen[name]!r} is not one of {', '.join(map(str, allowed))}")
    for name in ("NUM_EPOCHS", "BATCH_SIZE", "TILE_SIZE", "STRIDE", "INFERENCE_STRIDE", "DEPTH"):
        if chosen[name] < 1:
            problems.append(f"{name} must be at least 1")
    if not 0 < config.VALIDATION_FRACTION < 1:
        problems.append(f"VALIDATION_FRACTION {config.VALIDATION_FRACTION} is not between 0 and 1")
    if config.SELF_TRAINING_ROUNDS and config.scheme != "iterative":
        problems.append("SELF_TRAINING_ROUNDS needs scheme 'iterative': pseudo-labels would cover the held-out band")
    if config.PRIOR_PATH is not None and config.scheme != "iterative":
        problems.append("PRIOR_PATH needs scheme 'iterative': its labels would cover the held-out band")
    if not (0 < config.PRIOR_INK_FRACTION and 0 < config.PRIOR_NOT_INK_FRACTION
            and config.PRIOR_INK_FRACTION + config.PRIOR_NOT_INK_FRACTION <= 1):
        problems.append(f"need PRIOR_INK_FRACTION and PRIOR_NOT_INK_FRACTION above 0, together at most 1 (got "
                        f"{config.PRIOR_INK_FRACTION}, {config.PRIOR_NOT_INK_FRACTION})")
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


def load_labels(config, segment: Segment) -> Labels:
    """The labels to train on, from inklabel_path / negatives_path or the segment's own, and the region to predict."""
    region_yx = segment.mask
    if config.mask_path is not None:
        mask_file = data.resolve_label_path(config.mask_path, segment, "mask_path")
        region_yx = segment.mask & data.read_label_file(mask_file, segment, "mask_path").astype(bool)
    negatives_yx, negatives_source = None, ""
    if config.inklabel_path is None and config.PRIOR_PATH is not None:
        ink_yx, source = np.zeros(segment.shape[1:], np.uint8), "no human labels"
    elif config.inklabel_path is None:
        if segment.inklabels is None:
            raise SegmentError(f"segment {segment.name} has no ink labels of its own; set inklabel_path")
        ink_yx, source = segment.inklabels, f"{segment.name}'s own ink labels (with the segment, {segment.location})"
        if segment.negatives is not None:
            negatives_yx, negatives_source = segment.negatives, " and its own negatives"
    else:
        path = data.resolve_label_path(config.inklabel_path, segment, "inklabel_path")
        ink_yx, source = data.read_label_file(path, segment, "inklabel_path"), str(path)
        if config.scheme == "iterative" and not ink_yx.any() and config.PRIOR_PATH is None:
            raise SegmentError(f"inklabel_path {path} holds no ink: scheme 'iterative' needs at least one labelled letter")
    if config.negatives_path is not None:
        path = data.resolve_label_path(config.negatives_path, segment, "negatives_path")
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


def build_model(config, settings: InputSettings, weights: checkpoint.EncoderWeights | None) -> InkUNet:
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


def resume_point(config, settings: InputSettings, checkpoint_path: pathlib.Path, labels_digest: str):
    """(the state to start from, the saved checkpoint to load or None): last.pth's when it continues this run. In
    scheme "iterative", other labels start the next round afresh."""
    fresh = RunState(round=1 if config.scheme == "iterative" else 0, labels_digest=labels_digest)
    if not checkpoint_path.is_file():
        return fresh, None
    saved = checkpoint.read(checkpoint_path)
    previous = saved["config"]
    if previous["scheme"] != config.scheme or checkpoint.input_settings(saved) != settings:
        raise checkpoint.CheckpointError(
            f"{checkpoint_path} is a {previous['scheme']} run on {checkpoint.input_settings(saved).describe()} that this "
            f"run ({config.scheme}, {settings.describe()}) cannot continue; set another exp_name")
    state = RunState(**saved["state"])
    if config.scheme == "iterative" and state.labels_digest != labels_digest:
        print(f"new labels: round {state.round + 1} starts from {config.pretrained_path or 'random init'}")
        return dataclasses.replace(fresh, round=state.round + 1), None
    return state, saved


def save_checkpoint(path: pathlib.Path, config, settings: InputSettings, model, state: RunState, optimizer=None) -> None:
    """Weights, settings and state; with the optimizer too when it is for resuming."""
    if dist.is_master():
        entries = {"optimizer": optimizer.state_dict()} if optimizer is not None else {}
        checkpoint.save(path, "finetune", model.state_dict(), settings, config=config.as_dict(),
                        state=dataclasses.asdict(state), **entries)


def train_one_epoch(config, model, ddp_model, optimizer, loader, state, tensorboard, device) -> float:
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
        tensorboard.scalars(state.global_step, train__loss=loss_value, train__grad_norm=grad_norm, hp__lr=lr)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
        state.global_step += 1
    return loss_sum / iterations_per_epoch


def split(config, settings: InputSettings, labelled: Segment, painted_chooses: bool) -> tuple[data.Box | None, np.ndarray]:
    """The held-out band (scheme "validation"; None in "iterative") and the (N, 2) training tile origins. In scheme
    "iterative" a tile needs MIN_INK_FRACTION of ink or, when `painted_chooses`, of painted pixels (ink or not)."""
    held_out = None
    if config.scheme == "validation":
        held_out = data.choose_validation_box(labelled.mask, labelled.inklabels, settings.tile_size,
                                              config.VALIDATION_FRACTION)
    chooser_yx = labelled.inklabels != data.UNKNOWN if painted_chooses else labelled.inklabels == 1
    train_origins = data.training_origins(labelled, settings.tile_size, config.STRIDE, held_out,
                                          config.MIN_INK_FRACTION if config.scheme == "iterative" else 0.0, chooser_yx)
    return held_out, train_origins


def build_loaders(config, settings: InputSettings, labelled: Segment, train_origins: np.ndarray, held_out, device):
    """(training loader, its augmentation, validation loader or None). An epoch repeats the training tiles up to
    MIN_TILES_PER_EPOCH; each process takes its share, reshuffled per (SEED, epoch), from one sampler."""
    margin = data.depth_margin(labelled.shape[0], settings) if config.data_augmentation else 0
    augmentation = data.TileAugmentation(settings.depth, margin, config.data_augmentation, config.SEED)
    repeats = max(1, math.ceil(config.MIN_TILES_PER_EPOCH / len(train_origins)))
    train_set = data.tile_dataset(labelled, np.tile(train_origins, (repeats, 1)), settings, augmentation, margin)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size(), rank=dist.rank(),
                                                  shuffle=True, seed=config.SEED, drop_last=True)
    batch_per_process = config.BATCH_SIZE // dist.world_size()
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_per_process, sampler=sampler, num_workers=config.NUM_WORKERS, drop_last=True,
        worker_init_fn=data.reseed_worker, pin_memory=device.type == "cuda")
    if len(train_loader) == 0:
        raise ConfigError(f"{len(train_set)} training tiles make no batch of {config.BATCH_SIZE}; lower BATCH_SIZE")
    if held_out is None:
        return train_loader, augmentation, None
    validation_origins = data.validation_origins(labelled, settings.tile_size, held_out)[dist.rank()::dist.world_size()]
    validation_set = data.tile_dataset(labelled, validation_origins, settings)
    return train_loader, augmentation, torch.utils.data.DataLoader(validation_set, batch_size=batch_per_process,
                                                                   num_workers=config.NUM_WORKERS)


def predict_and_write(config, settings, model, segment, human: Labels, labels_yx, label_source, held_out,
                      human_origins, state, experiment_dir, device, log, tensorboard) -> np.ndarray:
    """The whole-segment prediction with the best weights, its metrics (against the human labels, where the human
    labels chose the tiles, so every round is measured alike), and every output file. Returns the (Y, X) map."""
    if held_out is not None:  # scheme "validation"; in "iterative" the best weights are the last epoch's, in `model`
        dist.barrier()  # rank 0 wrote best.pth
        model.load_state_dict(checkpoint.read(experiment_dir / "best.pth")["model"])
    started = time.time()
    probabilities_yx = inference.predict_segment(
        model, segment, human.region_yx, settings, config.INFERENCE_STRIDE, config.BATCH_SIZE // dist.world_size(),
        device, config.TTA, config.NUM_WORKERS)
    # The segment's own labels score the prediction where training used others (or none: a prior alone).
    full_labels_yx = segment.inklabels if config.inklabel_path is not None or human.from_prior else None
    metrics = evaluation.prediction_metrics(probabilities_yx, human.human_yx, human.region_yx, held_out,
                                            human_origins, settings.tile_size, full_labels_yx)
    if not dist.is_master():
        return probabilities_yx
    save_path = pathlib.Path(config.save_path) if config.save_path else experiment_dir / "prediction.png"
    prediction_png = outputs.probability_image(probabilities_yx)
    outputs.write_png_atomic(save_path, prediction_png)
    if save_path.resolve() != (experiment_dir / "prediction.png").resolve():
        outputs.write_png_atomic(experiment_dir / "prediction.png", prediction_png)
    comparison = outputs.labels_vs_prediction(labels_yx, probabilities_yx, segment.mask, held_out)
    outputs.write_png_atomic(experiment_dir / "labels_vs_prediction.png", comparison)
    tensorboard.image("prediction/labels_vs_prediction", outputs.preview_chw(comparison), state.global_step)
    group = generalisation_group(metrics)
    if config.scheme == "iterative":  # no held-out band scored each epoch: the round's prediction is its val/ point
        if group is not None:
            tensorboard.scalars(state.global_step, val__f05=metrics[group + "f05"], val__auc=metrics[group + "auc"],
                                val__f05_chance=all_ink_f05(metrics[group + "ink_fraction"]))
        folder = outputs.record_round(experiment_dir, state.round, labels_yx, segment.mask, label_source, prediction_png,
                                      metrics)
        print(f"round {state.round} recorded in {folder}")
    log.write(event="prediction", seconds=round(time.time() - started, 1), save_path=str(save_path),
              round=state.round, **metrics)
    if group is None:  # no human label and none of the segment's own: nothing to score against
        print(f"prediction: {save_path} ({time.time() - started:.0f} s); no labels to score it against")
        return probabilities_yx
    print(f"prediction: {save_path} ({time.time() - started:.0f} s). Scored from the whole-segment prediction "
          f"(overlapping tiles, blended): " + evaluation.describe(metrics))
    warn_if_no_skill(metrics, f"round {state.round}" if config.scheme == "iterative" else "the run")
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


def train(config, settings, model, optimizer, loaders, state, experiment_dir, device, log, tensorboard, labels_yx,
          mask_yx, held_out) -> None:
    """The epoch loop, from state.epoch on; every epoch ends with last.pth, which commits it."""
    train_loader, augmentation, validation_loader = loaders
    loss_function = functools.partial(ink_loss, label_smoothing=config.LABEL_SMOOTHING)
    last_epoch = min(config.NUM_EPOCHS, config.STOP_AFTER_EPOCHS) if config.STOP_AFTER_EPOCHS else config.NUM_EPOCHS
    for epoch in range(state.epoch, last_epoch):
        started = time.time()
        train_loader.sampler.set_epoch(epoch)
        augmentation.set_epoch(epoch, dist.rank())
        torch.manual_seed(misc.epoch_seed(config.SEED, dist.rank(), epoch))  # each rank its own, and again on resume
        model.set_encoder_frozen(config.freeze_encoder or epoch < config.FREEZE_ENCODER_EPOCHS)
        ddp_model = dist.wrap(model, device)  # again each epoch: DDP syncs only what needs gradients when it is built
        statistics = {"train_loss": train_one_epoch(config, model, ddp_model, optimizer, train_loader, state,
                                                    tensorboard, device)}
        if validation_loader is not None:
            validation, band_probabilities_hw = evaluation.validate(model, validation_loader, loss_function, device,
                                                                    labels_yx, mask_yx, held_out)
            statistics.update({f"val_{key}": value for key, value in validation.items()})
            tensorboard.scalars(state.global_step, val__f05_chance=all_ink_f05(validation["ink_fraction"]),
                                **{f"val__{key}": validation[key] for key in ("loss", "f05", "threshold", "auc", "iou")})
            band = (slice(held_out.y0, held_out.y1), slice(held_out.x0, held_out.x1))
            tensorboard.image("validation/labels_vs_prediction", outputs.preview_chw(
                outputs.labels_vs_prediction(labels_yx[band], band_probabilities_hw, mask_yx[band])),
                state.global_step)
        # Scheme "validation": best is the lowest validation loss. "iterative" holds nothing out: best is the last epoch.
        is_best = validation_loader is None or statistics["val_loss"] < state.best_loss
        state.best_loss = statistics.get("val_loss", statistics["train_loss"]) if is_best else state.best_loss
        state.epoch = epoch + 1
        state.training_seconds += time.time() - started
        # last.pth goes last because it commits the epoch: a kill before its rename trains the epoch again and
        # rewrites best.pth and the log record. Written first, a kill after it lost them, as resuming skips the epoch.
        if is_best:
            save_checkpoint(experiment_dir / "best.pth", config, settings, model, state)
        log.write(event="epoch", round=state.round, epoch=state.epoch, global_step=state.global_step,
                  seconds=round(time.time() - started, 1),
                  training_seconds=round(state.training_seconds, 1), best=is_best, **statistics)
        save_checkpoint(experiment_dir / "last.pth", config, settings, model, state, optimizer)
        if dist.is_master():
            held_out_text = "" if validation_loader is None else (
                f"; held-out band, one tile per pixel: {evaluation.describe(validation)}"
                + (" (lowest validation loss so far: best.pth)" if is_best else ""))
            print(f"epoch {state.epoch}: train loss {statistics['train_loss']:.4f}{held_out_text}; "
                  f"{state.training_seconds:.0f} s of training")
        tensorboard.flush()


def round_labels(config, state: RunState, human: Labels, segment: Segment, experiment_dir: pathlib.Path):
    """(Y, X) uint8 training labels of the current round and where they came from: the human labels, or, in a
    self-training round, the round folder's inklabels.png and negatives.png (as next_round wrote them, or as a
    person repainted them before continuing the run)."""
    if state.self_training_round == 0:
        return human.training_yx, human.source
    folder = experiment_dir / f"round_{state.round:02d}"
    ink_yx = data.read_label_file(folder / "inklabels.png", segment, "pseudo-labels")
    negatives_yx = data.read_label_file(folder / "negatives.png", segment, "pseudo-labels")
    source = (f"self-training round {state.self_training_round}: pseudo-labels of round {state.round - 1}'s prediction "
              f"(ink ≥ {config.PSEUDO_INK_THRESHOLD}, not ink ≤ {config.PSEUDO_NOT_INK_THRESHOLD}) under {human.source} "
              f"({folder})")
    return data.training_labels(ink_yx, negatives_yx), source


def next_round(config, state: RunState, probabilities_yx: np.ndarray, model, settings: InputSettings, human: Labels,
               segment: Segment, experiment_dir: pathlib.Path) -> RunState:
    """Write the pseudo-labels of this round's prediction, and the model that made it (the next round starts from
    it), into the next round's folder; returns the next round's fresh state."""
    pseudo_yx = data.pseudo_labels(probabilities_yx, human.region_yx, human.human_yx == 1, human.negatives_yx,
                                   config.PSEUDO_INK_THRESHOLD, config.PSEUDO_NOT_INK_THRESHOLD,
                                   config.PSEUDO_MIN_INK_PIXELS)
    following = RunState(round=state.round + 1, labels_digest=state.labels_digest,
                         self_training_round=state.self_training_round + 1)
    if dist.is_master():
        folder = experiment_dir / f"round_{following.round:02d}"
        outputs.write_round_labels(folder, pseudo_yx, segment.mask)
        checkpoint.save(folder / "start.pth", "finetune", model.state_dict(), settings, config=config.as_dict(),
                        state=dataclasses.asdict(state))
        print(f"self-training round {following.self_training_round}: pseudo-labels in {folder} "
              f"({np.count_nonzero(pseudo_yx == 1)} ink, {np.count_nonzero(pseudo_yx == 0)} not-ink pixels)")
    dist.barrier()  # the other ranks read the labels rank 0 wrote
    return following


def train_round(config, settings, weights, segment: Segment, human: Labels, held_out, human_origins, state: RunState,
                saved: dict | None, experiment_dir: pathlib.Path, device):
    """Train one round and predict; returns (the prediction, the model), or (None, the model) when the run stopped
    early (STOP_AFTER_EPOCHS). A round starts from `saved` when it continues mid-round; a self-training round
    otherwise from the previous round's model (round_NN/start.pth): trained afresh, a round on the pseudo-labels
    did not take off within the demo's 20 epochs (notes/finetune.md)."""
    labels_yx, label_source = round_labels(config, state, human, segment, experiment_dir)
    labelled = dataclasses.replace(segment, inklabels=labels_yx)
    first = state.self_training_round == 0
    painted_chooses = first and (human.negatives_yx is not None or human.from_prior)
    # The first round trains on the tiles the human labels chose, unless a prior's labels lie under them.
    train_origins = human_origins if first and not human.from_prior else split(config, settings, labelled, painted_chooses)[1]
    torch.manual_seed(config.SEED)  # the decoder's initialisation
    model = build_model(config, settings, weights).to(device)
    optimizer = torch.optim.AdamW(schedule.parameter_groups(model), lr=config.LR, weight_decay=config.WEIGHT_DECAY)
    if saved is not None:
        checkpoint.restore(saved, model, optimizer, str(experiment_dir / "last.pth"))
        print(f"resumed from {experiment_dir / 'last.pth'}: round {state.round}, epoch {state.epoch} of "
              f"{config.NUM_EPOCHS} done")
    elif state.self_training_round:
        start = experiment_dir / f"round_{state.round:02d}" / "start.pth"
        model.load_state_dict(checkpoint.read(start)["model"])
        print(f"round {state.round} starts from round {state.round - 1}'s model ({start})")
    loaders = build_loaders(config, settings, labelled, train_origins, held_out, device)

    # From here on the run writes.
    if dist.is_master():
        experiment_dir.mkdir(parents=True, exist_ok=True)
        misc.remove_stale_temporaries(experiment_dir)
    log = misc.JsonLinesLog(experiment_dir / "log.jsonl")
    log.write(event="start", command=" ".join([sys.executable, *sys.argv]), commit=misc.git_commit(),
              config=config.as_dict(), input=settings.as_dict(), round=state.round, labels=label_source,
              held_out=dataclasses.asdict(held_out) if held_out is not None else None)
    board_dir = experiment_dir / "tensorboard_logs"
    tensorboard = misc.TensorboardLogger(board_dir / f"round_{state.round:02d}" if config.scheme == "iterative" else board_dir)
    tensorboard.text("config", "\n".join(f"    {name} = {value!r}" for name, value in config.as_dict().items()))
    if dist.is_master():
        print(f"{settings.model} UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; {segment}; "
              f"input {settings.describe()}; labels: {label_source}; {len(train_origins)} training tiles"
              + (f", validation band {held_out}" if held_out else "")
              + f"; {len(loaders[0])} steps per epoch on {dist.world_size()} process(es)")
    train(config, settings, model, optimizer, loaders, state, experiment_dir, device, log, tensorboard, labels_yx,
          segment.mask, held_out)
    probabilities_yx = None
    if state.epoch < config.NUM_EPOCHS:
        print(f"stopped after epoch {state.epoch} of {config.NUM_EPOCHS}: run the same command again to continue")
    else:
        probabilities_yx = predict_and_write(config, settings, model, segment, human, labels_yx, label_source, held_out,
                                             human_origins, state, experiment_dir, device, log, tensorboard)
    tensorboard.close()
    return probabilities_yx, model


def main(argv: list[str] | None = None) -> int:
    check_in_file_settings(DEFAULTS, __file__)  # the values written above, checked as overrides of them are
    config = apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv, source_file=__file__)
    device = dist.initialize()
    if device.type == "cpu" and config.CPU_THREADS > 0:
        torch.set_num_threads(config.CPU_THREADS)
    experiment_dir = pathlib.Path(config.OUTPUT_DIR, config.exp_name)

    # Every user error (settings, files, shapes, checkpoints) surfaces before anything is written.
    weights, settings = encoder_and_input(config)
    check_settings(config, settings)
    segment = open_segment(config.segment_id)
    human = load_labels(config, segment)
    if human.from_prior and not (human.human_yx == 1).any():  # no human label chooses a tile: the prior's labels do
        held_out, human_origins = None, np.zeros((0, 2), np.int64)
    else:
        held_out, human_origins = split(config, settings, dataclasses.replace(segment, inklabels=human.human_yx),
                                        painted_chooses=human.negatives_yx is not None)
    state, saved = resume_point(config, settings, experiment_dir / "last.pth", human.digest())
    while True:
        probabilities_yx, model = train_round(config, settings, weights, segment, human, held_out, human_origins,
                                              state, saved, experiment_dir, device)
        if probabilities_yx is None or state.self_training_round >= config.SELF_TRAINING_ROUNDS:
            return 0
        state, saved = next_round(config, state, probabilities_yx, model, settings, human, segment, experiment_dir), None


if __name__ == "__main__":
    misc.show_warnings_as_lines()
    try:
        exit_code = main()
    except (ConfigError, SegmentError, RemoteReadError, checkpoint.CheckpointError,
            schedule.NonFiniteLossError) as error:
        print(f"error: {misc.error_line(error)}", file=sys.stderr)
        sys.exit(2 if not isinstance(error, schedule.NonFiniteLossError) else 1)
    dist.finalize()  # main() has returned, so its DDP model is gone before the process group
    sys.exit(exit_code)
