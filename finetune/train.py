"""Fine-tune the 3D encoder for ink detection, predict the whole segment, and label iteratively.

    python finetune/train.py                                       # the settings below: the demo segment
    python finetune/train.py --scheme iterative --inklabel_path inklabels_two_letters.png --data_augmentation True
    python finetune/train.py --MODEL resnet50_3d --pretrained_path experiments/spark_demo/resnet50_3d_timm_style.pth
    torchrun --nproc_per_node 4 finetune/train.py --segment_id 20230827161847 --BATCH_SIZE 32

Writes to OUTPUT_DIR/exp_name/: last.pth (every epoch, atomically; running the same command again
continues), best.pth (lowest validation loss), prediction.png, labels_vs_prediction.png, log.jsonl and
tensorboard_logs/; the prediction also goes to save_path. Iterative labeling: open save_path in an image
editor, paint better labels, run again with them as inklabel_path. Each label file makes one round_NN/
(labels, prediction, metrics); new labels start the next round, trained afresh.
"""
import dataclasses
import hashlib
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere: package imports

import pretrain.torchvision_compat  # noqa: F401,E402 - must precede segmentation_models_pytorch and timm
import numpy as np  # noqa: E402
import segmentation_models_pytorch.losses  # noqa: E402
import torch  # noqa: E402
import tqdm  # noqa: E402

from finetune import data, evaluation, inference, outputs  # noqa: E402
from finetune.config import ConfigError, apply_overrides, settings_in  # noqa: E402
from finetune.model import DEPTH_POOLS, OUTPUT_STRIDES, InkUNet, build_ink_unet, load_pretrained_encoder  # noqa: E402
from pretrain import dist  # noqa: E402
from pretrain.data.patches import NORMALIZATIONS  # noqa: E402
from pretrain.data.remote import RemoteReadError  # noqa: E402
from pretrain.data.segment import Segment, SegmentError, open_segment  # noqa: E402
from pretrain.models import ENCODER_NAMES  # noqa: E402
from pretrain.utils import misc, schedule  # noqa: E402

# --------------------------------------------------------------------------------------------------
# experiment
exp_name = "finetune_demo"  # experiment folder under OUTPUT_DIR; the same name again resumes it
OUTPUT_DIR = "experiments"  # where experiment folders go
segment_id = "demo"  # any open_segment spec: a segment ID, a zarr or layer folder, "demo[:seed]"
scheme = "validation"  # "validation": hold out a band and measure; "iterative": train on all labels, predict
inklabel_path = None  # ink label PNG (a bare name is looked up in the segment's folder); None: the segment's own
mask_path = None  # PNG of where to predict (within the segment's mask); None: the whole segment mask
save_path = None  # the uint8 prediction PNG to open in an image editor; None: OUTPUT_DIR/exp_name/prediction.png
pretrained_path = None  # encoder weights: <MODEL>_timm_style.pth, a pretraining or a Kinetics checkpoint; None: random
freeze_encoder = False  # train only the decoder; the encoder's weights and BatchNorm statistics stay fixed
# model
MODEL = "resnet50_3d_narrow"  # 3D encoder; a pretrained checkpoint needs its own (e.g. "resnet50_3d")
DEPTH_POOL = "max"  # how each stage's 3D features are collapsed over depth: "max" or "mean"
OUTPUT_STRIDE = 4  # 4: decode to 1/4 resolution and upsample the logits (cheaper); 1: decode to full resolution
# data
DEPTH = 16  # layers per tile, centred on the middle layer (a multiple of the encoder's depth downsample, 8)
DEPTH_OFFSET = 0  # shift of the depth window from the middle layer (or from the surface, below)
FOLLOW_SURFACE = False  # the depth window follows the recto surface found in each tile; as the encoder was pretrained
TILE_SIZE = 64  # tile side in pixels (a multiple of 32)
STRIDE = 32  # training tile stride
NORMALIZATION = "range"  # "range" (÷ dtype max), "clip" (Kaggle 50–200 window) or "zscore" (per tile)
VALIDATION_FRACTION = 0.2  # width of the held-out band, as a fraction of the segment's longer side
MIN_INK_FRACTION = 0.05  # "iterative": a training tile must hold this much labelled ink
# An epoch repeats the (augmented) training tiles until it holds at least this many: a few labelled letters
# make only a few dozen tiles.
MIN_TILES_PER_EPOCH = 512
# Flips, rot90, affine, brightness/contrast, noise/blur, dropout, z-shift, slice dropout. Turn it on for scheme
# "iterative": from two labelled letters of the demo, the model found the others with F0.5 0.69 with it, 0.13
# without. Off by default: with the demo's full labels every augmentation tried delayed learning past the
# 20-minute CPU budget (notes/finetune.md).
data_augmentation = False
# optimisation
NUM_EPOCHS = 20  # passes over the training tiles
STOP_AFTER_EPOCHS = 0  # stop cleanly once this many epochs are done (the schedule still spans NUM_EPOCHS); run again to continue
BATCH_SIZE = 8  # global batch (all processes together)
LR = 1e-3  # AdamW peak learning rate, after a linear warm-up; cosine decay to 1% of it
WARMUP_EPOCHS = 1
WEIGHT_DECAY = 1e-2
LABEL_SMOOTHING = 0.1  # of the BCE targets: labels are drawn by hand, their edges are uncertain
CLIP = 10.0  # gradient-norm clip (0: off)
SEED = 0
NUM_WORKERS = 1  # DataLoader workers per process (0: read tiles in the main process)
# torch threads per process on CPU (0: torch's default, one per core). On the 2-core machine one thread
# leaves a core to the tile reader, and two threads competing with other jobs ran 5-10× slower.
CPU_THREADS = 1
# inference
INFERENCE_STRIDE = 32  # sliding-window stride for the whole-segment prediction
TTA = False  # average over flips and a rot90 (4× the inference time)
# --------------------------------------------------------------------------------------------------
DEFAULTS = settings_in(globals())


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class RunState:
    """What resuming needs besides weights and optimizer; saved in every checkpoint."""

    epoch: int = 0  # epochs done
    global_step: int = 0
    best_loss: float = math.inf
    round: int = 0  # iterative labeling round (0 in scheme "validation")
    labels_digest: str = ""
    training_seconds: float = 0.0


def check_settings(config) -> None:
    problems = []
    for name, allowed in (("scheme", ("validation", "iterative")), ("MODEL", ENCODER_NAMES),
                          ("DEPTH_POOL", DEPTH_POOLS), ("OUTPUT_STRIDE", OUTPUT_STRIDES),
                          ("NORMALIZATION", NORMALIZATIONS)):
        if getattr(config, name) not in allowed:
            problems.append(f"{name} {getattr(config, name)!r} is not one of {', '.join(map(str, allowed))}")
    for name in ("NUM_EPOCHS", "BATCH_SIZE", "TILE_SIZE", "STRIDE", "INFERENCE_STRIDE", "DEPTH"):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1")
    if not 0 < config.VALIDATION_FRACTION < 1:
        problems.append(f"VALIDATION_FRACTION {config.VALIDATION_FRACTION} is not between 0 and 1")
    if config.BATCH_SIZE % dist.world_size():
        problems.append(f"BATCH_SIZE {config.BATCH_SIZE} is not divisible by the {dist.world_size()} processes")
    if problems:
        raise ConfigError("; ".join(problems))


def load_labels(config, segment: Segment) -> tuple[np.ndarray, str, np.ndarray]:
    """(Y, X) uint8 labels to train on, where they came from, and the (Y, X) bool region to predict."""
    region_yx = segment.mask
    if config.mask_path is not None:
        mask_file = data.resolve_label_path(config.mask_path, segment, "mask_path")
        region_yx = segment.mask & data.read_label_file(mask_file, segment, "mask_path").astype(bool)
    if config.inklabel_path is None:
        if segment.inklabels is None:
            raise SegmentError(f"segment {segment.name} has no ink labels of its own; set inklabel_path")
        return segment.inklabels, f"{segment.name} ink labels", region_yx
    path = data.resolve_label_path(config.inklabel_path, segment, "inklabel_path")
    labels_yx = data.read_label_file(path, segment, "inklabel_path")
    if config.scheme == "iterative" and not labels_yx.any():
        raise SegmentError(f"inklabel_path {path} holds no ink: scheme 'iterative' needs at least one labelled letter")
    return labels_yx, str(path), region_yx


def build_model(config) -> InkUNet:
    model = build_ink_unet(config.MODEL, config.DEPTH_POOL, config.OUTPUT_STRIDE, config.freeze_encoder)
    depth_ratio, height_ratio, _ = model.encoder.get_downsample_ratio()
    if config.DEPTH % depth_ratio or config.TILE_SIZE % height_ratio:
        raise ConfigError(f"DEPTH {config.DEPTH} and TILE_SIZE {config.TILE_SIZE} must be multiples of {config.MODEL}'s "
                          f"downsample ratios {depth_ratio} and {height_ratio}")
    if config.pretrained_path is not None:
        loaded = load_pretrained_encoder(model, config.pretrained_path, config.MODEL)
        if dist.is_master():
            print(f"encoder: {loaded}")
    return model


def resume(config, model, optimizer, checkpoint_path: pathlib.Path, labels_digest: str) -> RunState:
    """Continue from last.pth when it exists. In scheme "iterative", other labels start the next round afresh."""
    fresh = RunState(round=1 if config.scheme == "iterative" else 0, labels_digest=labels_digest)
    if not checkpoint_path.is_file():
        return fresh
    checkpoint = misc.load_checkpoint(checkpoint_path)
    previous = checkpoint["config"]
    mismatch = misc.describe_state_dict_mismatch(model.state_dict(), checkpoint["model"])
    if mismatch or previous["scheme"] != config.scheme:
        raise misc.CheckpointError(
            f"{checkpoint_path} is a {previous['scheme']} run of {previous['MODEL']} that this run ({config.scheme}, "
            f"{config.MODEL}) cannot continue{': ' + mismatch if mismatch else ''}; set another exp_name")
    state = RunState(**checkpoint["state"])
    if config.scheme == "iterative" and state.labels_digest != labels_digest:
        print(f"new labels: round {state.round + 1} starts from {config.pretrained_path or 'random init'}")
        return dataclasses.replace(fresh, round=state.round + 1)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    misc.restore_rng_states(checkpoint["rng"])
    print(f"resumed from {checkpoint_path}: epoch {state.epoch} of {config.NUM_EPOCHS} done")
    return state


def save_checkpoint(path: pathlib.Path, config, model, state: RunState, optimizer=None) -> None:
    """Weights, settings and state; with the optimizer and RNG states too when it is for resuming."""
    if dist.is_master():
        checkpoint = {"config": config.as_dict(), "state": dataclasses.asdict(state), "model": model.state_dict(),
                      "commit": misc.git_commit()}
        if optimizer is not None:
            checkpoint.update(optimizer=optimizer.state_dict(), rng=misc.rng_states())
        misc.save_atomic(checkpoint, path)


def ink_loss(label_smoothing: float):
    """0.5 · BCE with smoothed targets + 0.5 · Dice, as ScrollMAE and the Grand Prize winner."""
    bce = segmentation_models_pytorch.losses.SoftBCEWithLogitsLoss(smooth_factor=label_smoothing)
    dice = segmentation_models_pytorch.losses.DiceLoss(mode="binary", from_logits=True)
    return lambda logits_b1hw, labels_b1hw: 0.5 * bce(logits_b1hw, labels_b1hw) + 0.5 * dice(logits_b1hw, labels_b1hw)


def train_one_epoch(config, model, ddp_model, optimizer, loader, loss_function, state, tensorboard, device) -> float:
    model.train()
    iterations_per_epoch = len(loader)
    total_iterations = config.NUM_EPOCHS * iterations_per_epoch
    warmup_iterations = max(1, config.WARMUP_EPOCHS * iterations_per_epoch)
    use_autocast = device.type == "cuda"  # bf16 is 20-50× slower than fp32 on CPU
    loss_sum = 0.0
    progress = tqdm.tqdm(loader, desc=f"epoch {state.epoch + 1}/{config.NUM_EPOCHS}", disable=not dist.is_master())
    for batch in progress:
        lr = schedule.lr_at(state.global_step, config.LR, warmup_iterations, total_iterations)
        schedule.apply(optimizer, lr, config.WEIGHT_DECAY)
        volume_b1dhw = batch["volume"].to(device, non_blocking=True)
        labels_b1hw = batch["label"].to(device, non_blocking=True).unsqueeze(1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            logits_b1hw = ddp_model(volume_b1dhw)
        loss = loss_function(logits_b1hw.float(), labels_b1hw)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"loss is {loss.item()} at epoch {state.epoch + 1}, step {state.global_step}; "
                                     "stopping (last.pth holds the last good epoch); try a lower LR")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], config.CLIP if config.CLIP > 0 else math.inf)
        optimizer.step()
        loss_value = dist.all_reduce_mean(loss).item()
        loss_sum += loss_value
        tensorboard.scalars(state.global_step, train__loss=loss_value, train__grad_norm=float(grad_norm), hp__lr=lr)
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.1e}")
        state.global_step += 1
    return loss_sum / iterations_per_epoch


def predict_and_write(config, model, segment, labels_yx, label_source, region_yx, held_out, train_origins, state,
                      experiment_dir, device, log, tensorboard) -> None:
    """The whole-segment prediction with the best weights, its metrics, and every output file."""
    dist.barrier()  # rank 0 wrote best.pth
    model.load_state_dict(misc.load_checkpoint(experiment_dir / "best.pth")["model"])
    started = time.time()
    probabilities_yx = inference.predict_segment(
        model, segment, region_yx, config.DEPTH, config.DEPTH_OFFSET, config.TILE_SIZE, config.INFERENCE_STRIDE,
        config.NORMALIZATION, config.BATCH_SIZE // dist.world_size(), device, config.TTA, config.NUM_WORKERS,
        follow_surface=config.FOLLOW_SURFACE)
    full_labels_yx = segment.inklabels if config.inklabel_path is not None else None
    metrics = evaluation.prediction_metrics(probabilities_yx, labels_yx, region_yx, held_out, train_origins,
                                            config.TILE_SIZE, full_labels_yx)
    if not dist.is_master():
        return
    save_path = pathlib.Path(config.save_path) if config.save_path else experiment_dir / "prediction.png"
    prediction_png = outputs.probability_image(probabilities_yx)
    outputs.write_png_atomic(save_path, prediction_png)
    if save_path.resolve() != (experiment_dir / "prediction.png").resolve():
        outputs.write_png_atomic(experiment_dir / "prediction.png", prediction_png)
    comparison = outputs.labels_vs_prediction(labels_yx, probabilities_yx, segment.mask, held_out)
    outputs.write_png_atomic(experiment_dir / "labels_vs_prediction.png", comparison)
    tensorboard.image("prediction/labels_vs_prediction", outputs.preview_chw(comparison), state.global_step)
    if config.scheme == "iterative":
        folder = outputs.record_round(experiment_dir, state.round, labels_yx, label_source, prediction_png, metrics)
        print(f"round {state.round} recorded in {folder}")
    log.write(event="prediction", seconds=round(time.time() - started, 1), save_path=str(save_path),
              round=state.round, **metrics)
    print(f"prediction: {save_path} ({time.time() - started:.0f} s); "
          + ", ".join(f"{key} {value:.3f}" for key, value in metrics.items() if key.endswith(("f05", "auc"))))


def main(argv: list[str] | None = None) -> int:
    config = apply_overrides(DEFAULTS, sys.argv[1:] if argv is None else argv)
    device = dist.initialize()
    check_settings(config)
    if device.type == "cpu" and config.CPU_THREADS > 0:
        torch.set_num_threads(config.CPU_THREADS)
    torch.manual_seed(config.SEED + dist.rank())
    experiment_dir = pathlib.Path(config.OUTPUT_DIR, config.exp_name)

    # Every user error (settings, files, shapes, checkpoints) surfaces here, before anything is written.
    segment = open_segment(config.segment_id)
    labels_yx, label_source, region_yx = load_labels(config, segment)
    labelled = dataclasses.replace(segment, inklabels=labels_yx)
    held_out = None
    if config.scheme == "validation":
        held_out = data.choose_validation_box(segment.mask, labels_yx, config.TILE_SIZE, config.VALIDATION_FRACTION)
    train_origins = data.training_origins(labelled, config.TILE_SIZE, config.STRIDE, held_out,
                                          config.MIN_INK_FRACTION if config.scheme == "iterative" else 0.0)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(schedule.parameter_groups(model), lr=config.LR, weight_decay=config.WEIGHT_DECAY)
    labels_digest = hashlib.sha256(np.packbits(labels_yx > 0).tobytes()).hexdigest()
    state = resume(config, model, optimizer, experiment_dir / "last.pth", labels_digest)
    ddp_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
                 if dist.is_distributed() else model)

    margin = data.depth_margin(segment.shape[0], config.DEPTH, config.DEPTH_OFFSET) if config.data_augmentation else 0
    augmentation = data.TileAugmentation(config.DEPTH, margin, config.data_augmentation, config.SEED)
    repeats = max(1, math.ceil(config.MIN_TILES_PER_EPOCH / len(train_origins)))
    train_set = data.tile_dataset(labelled, np.tile(train_origins, (repeats, 1)), config.DEPTH, config.DEPTH_OFFSET,
                                  config.TILE_SIZE, config.NORMALIZATION, augmentation, margin, config.FOLLOW_SURFACE)
    # One sampler for 1 or N processes: each process takes its share, reshuffled per (SEED, epoch).
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size(), rank=dist.rank(),
                                                  shuffle=True, seed=config.SEED, drop_last=True)
    batch_per_process = config.BATCH_SIZE // dist.world_size()
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=batch_per_process, sampler=sampler, num_workers=config.NUM_WORKERS, drop_last=True,
        worker_init_fn=data.reseed_worker, pin_memory=device.type == "cuda")
    if len(train_loader) == 0:
        raise ConfigError(f"{len(train_set)} training tiles make no batch of {config.BATCH_SIZE}; lower BATCH_SIZE")
    validation_loader = None
    if held_out is not None:
        validation_origins = data.validation_origins(labelled, config.TILE_SIZE, held_out)[dist.rank()::dist.world_size()]
        validation_set = data.tile_dataset(labelled, validation_origins, config.DEPTH, config.DEPTH_OFFSET,
                                           config.TILE_SIZE, config.NORMALIZATION, follow_surface=config.FOLLOW_SURFACE)
        validation_loader = torch.utils.data.DataLoader(validation_set, batch_size=batch_per_process,
                                                        num_workers=config.NUM_WORKERS)

    # From here on the run writes.
    if dist.is_master():
        experiment_dir.mkdir(parents=True, exist_ok=True)
        misc.remove_stale_temporaries(experiment_dir)
    log = misc.JsonLinesLog(experiment_dir / "log.jsonl")
    log.write(event="start", command=" ".join([sys.executable, *sys.argv]), commit=misc.git_commit(),
              config=config.as_dict(), round=state.round, labels=label_source, held_out=held_out)
    tensorboard = misc.TensorboardLogger(experiment_dir / "tensorboard_logs")
    tensorboard.text("config", "\n".join(f"    {name} = {value!r}" for name, value in config.as_dict().items()))
    if dist.is_master():
        print(f"{config.MODEL} UNet: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; {segment}; "
              f"{len(train_origins)} training tiles" + (f", validation band {held_out}" if held_out else "")
              + f"; {len(train_loader)} steps per epoch on {dist.world_size()} process(es)")

    loss_function = ink_loss(config.LABEL_SMOOTHING)
    last_epoch = min(config.NUM_EPOCHS, config.STOP_AFTER_EPOCHS) if config.STOP_AFTER_EPOCHS else config.NUM_EPOCHS
    for epoch in range(state.epoch, last_epoch):
        started = time.time()
        sampler.set_epoch(epoch)
        augmentation.set_epoch(epoch, dist.rank())
        statistics = {"train_loss": train_one_epoch(config, model, ddp_model, optimizer, train_loader, loss_function,
                                                    state, tensorboard, device)}
        if validation_loader is not None:
            validation, band_probabilities_hw = evaluation.validate(model, validation_loader, loss_function, device,
                                                                    labels_yx, segment.mask, held_out)
            statistics.update({f"val_{key}": value for key, value in validation.items()})
            tensorboard.scalars(state.global_step, **{f"val__{key}": validation[key]
                                                      for key in ("loss", "f05", "threshold", "auc", "iou")})
            band = (slice(held_out.y0, held_out.y1), slice(held_out.x0, held_out.x1))
            tensorboard.image("validation/labels_vs_prediction", outputs.preview_chw(
                outputs.labels_vs_prediction(labels_yx[band], band_probabilities_hw, segment.mask[band])),
                state.global_step)
        # "best" is the lowest validation loss; without a held-out set (scheme "iterative") it is the last epoch.
        current_loss = statistics.get("val_loss", statistics["train_loss"])
        is_best = validation_loader is None or current_loss < state.best_loss
        state.best_loss = current_loss if is_best else state.best_loss
        state.epoch = epoch + 1
        state.training_seconds += time.time() - started
        # last.pth goes last because it commits the epoch: a kill before its rename trains the epoch again and
        # rewrites best.pth and the log record. Written first, a kill after it lost them, as resuming skips the epoch.
        if is_best:
            save_checkpoint(experiment_dir / "best.pth", config, model, state)
        log.write(event="epoch", epoch=state.epoch, seconds=round(time.time() - started, 1),
                  training_seconds=round(state.training_seconds, 1), best=is_best, **statistics)
        save_checkpoint(experiment_dir / "last.pth", config, model, state, optimizer)
        if dist.is_master():
            print(f"epoch {state.epoch}: " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                                                        for key, value in statistics.items())
                  + f", {state.training_seconds:.0f} s" + (" (best)" if is_best else ""))
        tensorboard.flush()

    if state.epoch < config.NUM_EPOCHS:
        print(f"stopped after epoch {state.epoch} of {config.NUM_EPOCHS}: run the same command again to continue")
    else:
        predict_and_write(config, model, segment, labels_yx, label_source, region_yx, held_out, train_origins, state,
                          experiment_dir, device, log, tensorboard)
    tensorboard.close()
    return 0


if __name__ == "__main__":
    try:
        exit_code = main()
    except (ConfigError, SegmentError, RemoteReadError, misc.CheckpointError, NonFiniteLossError) as error:
        print(f"error: {misc.error_line(error)}", file=sys.stderr)
        sys.exit(2 if not isinstance(error, NonFiniteLossError) else 1)
    dist.finalize()  # main() has returned, so its DDP model is gone before the process group
    sys.exit(exit_code)
