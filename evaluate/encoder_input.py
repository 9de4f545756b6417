"""What every evaluation script shares: an encoder from a checkpoint (or a random one), used with the input settings
it was trained with, on the GPU where there is one.

The input options (`--model`, `--depth`, `--depth_offset`, `--follow_surface`, `--normalization`, `--tile_size`)
default to the checkpoint's own settings. A value given that contradicts them is an error (the tile size only
warns), exactly as in fine-tuning: `pretrain.checkpoint.resolve_input_settings`.
"""
import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import threading

import torch

from pretrain import checkpoint, dist
from pretrain.data.patches import INPUT_OPTIONS, NO_CHECKPOINT_INPUT, NORMALIZATIONS, OPTION_NAMES, InputSettings
from pretrain.data.segment import SegmentError, parse_spec
from pretrain.models import ENCODER_NAMES, build_encoder
from pretrain.utils.errors import OneLineError
from pretrain.utils.misc import RenamedOption

DEFAULTS = NO_CHECKPOINT_INPUT  # without a checkpoint that records them: as fine-tuning reads tiles


def add_segment_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The segment option of every evaluate/ script: --segment_id, as fine-tuning and finetune/predict.py name a
    segment (--segment, its older name in evaluate/, still works), as args.segment."""
    parser.add_argument("--segment_id", "--segment", dest="segment", default="demo", action=RenamedOption, help=help)


def segment_for_runs(spec: str) -> str:
    """The spec as the fine-tuning runs are given it, each a process in the repository root: a local path resolved
    (its `segment_identity`, so that a relative path names the same folder there), anything else as written (a spec
    that names no segment too: opening it says why)."""
    try:
        parsed = parse_spec(spec)
    except SegmentError:
        return spec
    return parsed.identity if parsed.kind == "path" else spec


def automatic_jobs(jobs: int) -> int:
    """`jobs` runs at a time, or for 0 one run per core this process may use on a CPU (a fine-tuning run computes in
    one torch thread, finetune/train.py's CPU_THREADS, so one run leaves the other cores idle) and one on a GPU."""
    if jobs:
        return jobs
    return 1 if torch.cuda.is_available() else len(os.sched_getaffinity(0))


def side_by_side(function, items: list, jobs: int):
    """`function(item)` for every item, `jobs` at a time (each item's work is its own process: a fine-tuning run),
    yielded in the items' order. Once one raises, no further item starts; those running finish, and the error is
    raised in its place in the order."""
    failed = threading.Event()

    def unless_one_failed(item):
        if failed.is_set():
            return None
        try:
            return function(item)
        except BaseException:
            failed.set()
            raise

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        try:
            for result in pool.map(unless_one_failed, items):
                if result is not None:  # None: not started, a later item failed first
                    yield result
        finally:  # also when the caller stops early, on an error or Ctrl-C
            failed.set()
            pool.shutdown(cancel_futures=True)


class EvaluationError(OneLineError, ValueError):
    """A setting or input an evaluation script cannot work with; the message names it."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default, except where there is none to show (required, or None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def true_or_false(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expects True or False, got {text!r}")
    return text.lower() in ("true", "1")


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The input options, each defaulting to the checkpoint's value (or DEFAULTS' without one)."""
    group = parser.add_argument_group("input (default: as the checkpoint records it; else the value in brackets)")
    parsing = {"model": {"choices": ENCODER_NAMES}, "depth": {"type": int}, "depth_offset": {"type": int},
               "follow_surface": {"type": true_or_false, "metavar": "{True,False}"},
               "normalization": {"choices": NORMALIZATIONS}, "tile_size": {"type": int}}
    for field, option in INPUT_OPTIONS.items():
        group.add_argument(OPTION_NAMES[field], **parsing[field], help=f"{option.help} [{getattr(DEFAULTS, field)}]")


def split_at_double_dash(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the settings after `--` that go to every finetune/train.py run)."""
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def name_encoders(args: argparse.Namespace) -> None:
    """args.names: as given, or each checkpoint's file name ("random" stays as it is)."""
    args.names = args.names or [path if path == "random" else pathlib.Path(path).stem for path in args.pretrained_path]
    if len(args.names) != len(args.pretrained_path):
        raise EvaluationError(f"{len(args.names)} names for {len(args.pretrained_path)} encoders")


def given_settings(args: argparse.Namespace) -> dict:
    return {field: getattr(args, field) for field in OPTION_NAMES if getattr(args, field) is not None}


def encoder_weights(path: str) -> checkpoint.EncoderWeights | None:
    """The weights in a checkpoint of any kind; None for "random"."""
    return None if path == "random" else checkpoint.encoder_weights(path)


def common_settings(paths: list[str], args: argparse.Namespace) -> InputSettings:
    """One set of input settings for several checkpoints, which must agree on them (the same tiles go to all)."""
    resolved = {path: checkpoint.resolve_input_settings(encoder_weights(path), given_settings(args), DEFAULTS,
                                                        OPTION_NAMES) for path in paths}
    if len(set(resolved.values())) > 1:
        listing = "; ".join(f"{path}: {settings.describe()}" for path, settings in resolved.items())
        raise EvaluationError(f"the checkpoints were trained on different inputs ({listing}); compare them separately")
    return next(iter(resolved.values()))


def same_tiles_settings(paths: list[str], args: argparse.Namespace) -> list[InputSettings]:
    """Input settings of each checkpoint (in order) for reading the same tiles for all: they must agree on where a tile is cut
    (model, depth window, tile size) and may differ in how its voxels are scaled, each as its encoder was trained.
    "random" reads tiles as the first other checkpoint does, where the options do not say otherwise."""
    trained = [path for path in paths if path != "random"]
    resolved = [checkpoint.resolve_input_settings(encoder_weights(trained[0] if path == "random" and trained else path),
                                                  given_settings(args), DEFAULTS, OPTION_NAMES) for path in paths]
    cuts = {dataclasses.replace(settings, normalization="range")
            for settings in resolved}
    if len(cuts) > 1:
        listing = "; ".join(f"{path}: {settings.describe()}" for path, settings in zip(paths, resolved))
        raise EvaluationError(f"the checkpoints cut tiles differently ({listing}); compare them separately")
    return resolved


def load_encoder(path: str, settings: InputSettings, device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """The encoder of `path` ("random": seeded initialisation), in eval mode on `device`, and what it is."""
    torch.manual_seed(seed)
    encoder = build_encoder(settings.model)
    weights = encoder_weights(path)
    if weights is None:
        description = f"random initialisation (seed {seed})"
    else:
        checkpoint.load_encoder(encoder, weights, settings.model, "--model")
        description = weights.description
    if settings.depth % encoder.get_downsample_ratio()[0] or settings.tile_size % encoder.get_downsample_ratio()[1]:
        raise EvaluationError(f"depth {settings.depth} and tile size {settings.tile_size} must be multiples of "
                              f"{settings.model}'s downsample ratios {encoder.get_downsample_ratio()[:2]}")
    return encoder.to(device).eval(), description


def device() -> torch.device:
    """The GPU where there is one (the same helper as training), else the CPU."""
    return dist.initialize()

