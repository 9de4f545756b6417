"""Pretraining arguments: edit the defaults here, or override any of them on the command line
(`python pretrain/main.py --ep 3 --data_path 20230827161847`).

The defaults pretrain the 3D ResNet-50 on the generated demo segment; without a GPU, the narrow one on fewer crops
(CPU_DEFAULTS below), unless the command line says otherwise. For real segments on a GPU, see docs/pretrain.md,
"On a GPU: settings for real segments" (ScrollMAE-like: depth 32, tile_size 256, bs 8, ep 500+).
"""
import argparse
import ast
import json
import os
import sys
import typing

from tap import Tap

from pretrain import checkpoint, methods
from pretrain.data.patches import INPUT_OPTIONS, MOSTLY_PAPYRUS, NORMALIZATIONS, InputSettings
from pretrain.dist import CPU_THREADS_HELP, DEFAULT_TIMEOUT_MINUTES
from pretrain.spark import MASK_MODES, TARGETS
from pretrain.throughput import OPTIMIZER_KERNELS
from pretrain.utils import ranges
from pretrain.utils.errors import OneLineError
from pretrain.utils.misc import git_commit, note_renamed


# Without a GPU, these defaults change so that the quickstart (`python pretrain/main.py`) finishes in about 15 min on
# a 2-core CPU and still pretrains a ResNet-50 (notes/cpu_quickstart.md); a setting on the command line always wins.
CPU_DEFAULTS = {"model": "resnet50_3d_narrow", "samples_per_ep": 48}


class ArgumentError(OneLineError, ValueError):
    """A setting that cannot work; the message names it."""


# The fields filled at runtime, and what fills them (for the line that refuses one given on the command line).
RUNTIME_FIELDS = {
    "lr": "base_lr × bs / 256: set base_lr",
    "batch_size_per_process": "bs ÷ processes: set bs",
    "world_size": "the number of processes torchrun starts",
    "device": "the GPU of this process when there is one, else the CPU",
    "commit": "the repository's git commit",
    "command": "the command line",
    "voxel_dtype": "the segments' voxel dtype",
}


class RefuseRuntimeField(argparse.Action):
    """A field of the "filled at runtime" block given on the command line: refused, since fill_runtime would
    overwrite it without a word."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is filled at runtime ({RUNTIME_FIELDS[self.dest]}), not a setting")


class Args(Tap):
    # ---------------------------------------------------------------- experiment
    exp_name: str = "spark_demo"  # a label for this run (TensorBoard text, logs)
    exp_dir: str = "experiments/spark_demo"  # checkpoints, log.jsonl and tensorboard_logs/ go here
    resume_from: str = ""  # a *_withdecoder_spark_style.pth to continue; empty: continue exp_dir's own if it has one
    init_weight: str = ""  # encoder weights only: an encoder-only, SparK, VICReg or Kinetics (Hara r3d50_K*) checkpoint
    method: str = "spark"  # the pretraining method (--help lists every one registered in pretrain/methods.py)

    # ---------------------------------------------------------------- data
    data_path: list[str] = ["demo"]  # segment specs, mixed: IDs, "scroll4:ID", zarrs, layer folders, "demo[:seed]"
    scroll: str = "1"  # scroll of the bare segment IDs in data_path (sets the server folder)
    # The input settings, and `model` below: what each means is said once for every script, in
    # pretrain/data/patches.py's INPUT_OPTIONS, and --help shows it. Fine-tuning reads them from the checkpoint.
    depth: int = 16
    depth_offset: int = 0
    follow_surface: bool = False
    tile_size: int = 96
    normalization: str = "range"
    float_range: list[float] = []  # LOW HIGH: a float volume's voxel values that stand for 0 and 1 (else refused)
    min_mask_fraction: float = MOSTLY_PAPYRUS  # a crop needs at least this much papyrus (mask) under it: 0.5
    samples_per_ep: int = 180  # crops per epoch (all processes together)
    num_workers: int = 2  # DataLoader workers per process (0: load in the main process)
    lru_mb: int = 512  # in-process cache of decoded chunks, per worker
    # 0 (automatic) gives 1 thread on a 2-core machine with 2 workers: on the shared 2-core machine at load average
    # 6.5-9.4, 2 threads ran 53 s per step and 1 thread 18 s (docs/pretrain.md, "On a CPU"). Set 1 when other jobs
    # share the cores.
    cpu_threads: int = 0  # torch threads per process on the CPU (0: automatic; --help says how, as every script's)
    dist_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES  # torchrun: a rank waiting this long for another stops the run

    # ---------------------------------------------------------------- model
    model: str = "resnet50_3d"  # an input setting, as depth above
    mask: float = 0.6  # fraction of cells masked
    mask_mode: str = "cell"  # "cell": 3D cells (D/d × 32 × 32); "column": ScrollMAE's 2D cells through all depth
    target: str = "pixels"  # what masked cells reconstruct: "pixels" (SparK) or "texture" (local texture energy)
    decoder_width: int = 256  # channels of the decoder's coarsest stage (halved at each finer stage)
    sbn: bool = False  # SyncBatchNorm across processes (torchrun only)
    # VICReg only
    projector: str = "2048-2048-2048"  # expander MLP widths after the pooled encoder embedding
    vicreg_weights: list[float] = [25.0, 25.0, 1.0]  # invariance, variance, covariance coefficients (the paper's)

    # ---------------------------------------------------------------- optimisation
    ep: int = 5  # epochs
    stop_after_ep: int = 0  # stop cleanly once this many epochs are done (schedule still spans ep); run again to continue
    wp_ep: int = 1  # warm-up epochs (linear lr warm-up)
    bs: int = 2  # global batch size (all processes together)
    # lr = base_lr × bs / 256, as SparK. SparK's base_lr 2e-4 assumes batches of thousands: at bs 2 it gives
    # lr 1.6e-6, and LAMB (whose step is lr × the layer's weight norm) then barely moves. 0.1 gives 7.8e-4.
    base_lr: float = 0.1  # peak learning rate per 256 samples: lr = base_lr × bs / 256, after wp_ep of warm-up
    wd: float = 0.04  # weight decay at the start ...
    wde: float = 0.2  # ... and at the end (cosine in between), as SparK
    opt: str = "lamb"  # "lamb" (SparK's choice, timm's implementation) or "adamw"
    clip: float = 5.0  # gradient-norm clip (0: off)
    amp: bool = True  # bf16 autocast on GPU; ignored on CPU, where bf16 is many times slower
    seed: int = 0  # the model's initial weights, the crops and the masks (each rank and epoch draws its own)

    # ---------------------------------------------------------------- GPU throughput (pretrain/throughput.py)
    # How a step runs, not what it computes (each gives the default's loss and gradients: tests/test_throughput.py).
    # The defaults are the behaviour before these settings existed, on the CPU and the GPU alike: which ones pay on a
    # GPU is for benchmarks/pretrain_levers.py to measure (notes/performance.md). The batch is `bs` above; lr follows it
    # (lr = base_lr × bs / 256), so a larger batch keeps base_lr.
    channels_last: bool = False  # channels-last 3D memory format for the model's 5-D weights and inputs
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms on the first steps and keeps the fastest
    compile_model: bool = False  # torch.compile the model the step calls (the first steps then take minutes)
    optimizer_kernel: str = "default"  # "default", "foreach" or "fused": torch's AdamW kernels (opt adamw only)
    pin_memory: bool = True  # batches in page-locked memory, copied to the GPU without blocking (ignored on the CPU)
    prefetch_factor: int = 2  # batches each DataLoader worker prepares ahead (torch's default; with num_workers > 0)

    # ---------------------------------------------------------------- logging
    vis_every: int = 50  # iterations between TensorBoard reconstruction images (0: only at epoch ends)
    keep_epoch_encoders: bool = False  # also keep each epoch's encoder in exp_dir/epochs/ (for CKA across epochs)

    # ---------------------------------------------------------------- online ink probe (pretrain/probe.py)
    # A labelled segment whose ink a logistic regression on the encoder's features finds (TensorBoard probe/auc, ...,
    # beside the random initialisation's). Empty: the first data_path segment with ink labels (the demo has them), and
    # no probe when none has
    probe_segment: str = ""
    probe_every: int = 1  # epochs between probes (the last epoch is always probed); 0: off
    probe_tiles: int = 24  # labelled tiles kept in memory: half fit the probe's head, half score it
    probe_seed: int = 0  # which tiles, and which of their pixels fit the head

    # ---------------------------------------------------------------- filled at runtime (refused on the command line)
    lr: float = 0.0  # base_lr × bs / 256
    batch_size_per_process: int = 0
    world_size: int = 1
    device: str = "cpu"
    commit: str = ""
    command: str = ""
    voxel_dtype: str = ""  # the segments' voxel dtype(s), recorded with the input settings

    def configure(self) -> None:
        described = {field: option.help for field, option in INPUT_OPTIONS.items()}
        described["method"] = ("the pretraining method, one of those registered in pretrain/methods.py: "
                               + ", ".join(f"{name} ({module})" for name, module in methods.METHODS.items()))
        described["cpu_threads"] = CPU_THREADS_HELP
        described["dist_timeout_minutes"] = ("torchrun: a rank that waits this long at a collective operation for "
                                             "another rank (stalled or dead) stops the run with one line naming it; "
                                             "torch's own default is 30 min")
        for field, help in described.items():
            default = getattr(type(self), field)
            self.add_argument(f"--{field}", help=f"({type(default).__name__}, default={default}) {help}")
        for name in RUNTIME_FIELDS:
            self.add_argument(f"--{name}", type=str, action=RefuseRuntimeField, help=argparse.SUPPRESS)

    def process_args(self) -> None:
        problems = []
        if self.tile_size % 32:
            problems.append(f"tile_size {self.tile_size} is not a multiple of 32")
        if self.mask_mode not in MASK_MODES:
            problems.append(f"mask_mode {self.mask_mode!r} is not {' or '.join(map(repr, MASK_MODES))}")
        if self.target not in TARGETS:
            problems.append(f"target {self.target!r} is not {' or '.join(map(repr, TARGETS))}")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.float_range and (len(self.float_range) != 2 or not self.float_range[0] < self.float_range[1]):
            problems.append(f"float_range {self.float_range} is not two numbers LOW HIGH with LOW below HIGH")
        if self.method not in methods.METHODS:
            problems.append(f"method {self.method!r} is not {' or '.join(map(repr, methods.METHODS))}")
        else:
            problems += methods.get(self.method).problems(self)
        if len(self.vicreg_weights) != 3:
            problems.append(f"vicreg_weights needs 3 numbers (invariance, variance, covariance), got {self.vicreg_weights}")
        if self.opt not in ("lamb", "adamw"):
            problems.append(f"opt {self.opt!r} is not 'lamb' or 'adamw'")
        problems += [problem for name, allowed in SETTING_RANGES.items()
                     if (problem := ranges.problem(name, getattr(self, name), allowed))]
        if self.optimizer_kernel not in OPTIMIZER_KERNELS:
            problems.append(f"optimizer_kernel {self.optimizer_kernel!r} is not one of {', '.join(OPTIMIZER_KERNELS)}")
        elif self.optimizer_kernel != "default" and self.opt != "adamw":
            problems.append(f"optimizer_kernel {self.optimizer_kernel!r} needs opt 'adamw' (timm's LAMB has one kernel)")
        if self.samples_per_ep < self.bs:
            problems.append(f"need samples_per_ep ≥ bs (got {self.samples_per_ep}, {self.bs})")
        if problems:
            raise ArgumentError("; ".join(problems))

    @property
    def checkpoint_path(self) -> str:
        """The full checkpoint (resume): the encoder with the rest of the method's model (SparK's decoder,
        VICReg's projector)."""
        return os.path.join(self.exp_dir, f"{self.model}_{methods.get(self.method).checkpoint_part}_style.pth")

    @property
    def encoder_checkpoint_path(self) -> str:
        return str(checkpoint.encoder_file(self.exp_dir, self.model))

    def input_settings(self) -> InputSettings:
        """How the encoder sees tiles: recorded in every checkpoint, so the encoder is used as it was trained. A
        method may change its input inside its model: VICReg standardises every view (pretrain.vicreg.standardize,
        the "zscore" formula), so its encoder sees "zscore" tiles whatever the reader's scaling."""
        return methods.get(self.method).input_settings(self.reader_settings())

    def reader_settings(self) -> InputSettings:
        """How the pretraining datasets cut and scale tiles, before a method's own normalisation."""
        return InputSettings(model=self.model, depth=self.depth, depth_offset=self.depth_offset,
                             follow_surface=self.follow_surface, normalization=self.normalization,
                             tile_size=self.tile_size, float_range=tuple(self.float_range) or None,
                             voxel_dtype=self.voxel_dtype or None)

    def fill_runtime(self, device: str, world_size: int) -> None:
        if self.bs % world_size:
            raise ArgumentError(f"bs {self.bs} is not divisible by the number of processes {world_size}")
        self.world_size = world_size
        self.batch_size_per_process = self.bs // world_size
        self.lr = self.base_lr * self.bs / 256
        self.device = device
        self.commit = git_commit()
        self.command = " ".join([sys.executable, *sys.argv])

    def use_cpu_defaults(self) -> str:
        """No GPU: CPU_DEFAULTS for the settings the command line did not give. Returns the line that says so, or ''."""
        given = [option for option in self._options_given if len(option) > 2]  # argparse takes unique prefixes too
        chosen = {field: value for field, value in CPU_DEFAULTS.items()
                  if not any(f"--{field}".startswith(option) for option in given)}
        if not chosen:
            return ""
        if "samples_per_ep" in chosen:  # never fewer crops than a batch
            chosen["samples_per_ep"] = max(chosen["samples_per_ep"], self.bs)
        for field, value in chosen.items():
            setattr(self, field, value)
        return (f"no GPU: {', '.join(f'{field} {value}' for field, value in chosen.items())}, so that this finishes in "
                f"minutes on a CPU; for the full width, as on a GPU: "
                + " ".join(f"--{field} {getattr(Args, field)}" for field in chosen))

    def error(self, message: str):
        # argparse prints the whole usage before its complaint; one line naming the problem is enough.
        raise ArgumentError(f"{message} (see --help)")

    def settings(self) -> dict:
        """The settings as plain values (Tap's as_dict also returns this class's methods)."""
        return {key: value for key, value in self.as_dict().items() if not callable(value)}

    def to_json(self) -> str:
        return json.dumps(self.settings(), default=str, indent=1)


# The range of every numeric setting above, checked once the command line is read (a list: each of its values).
SETTING_RANGES = {
    "samples_per_ep": ranges.AT_LEAST_1, "num_workers": ranges.AT_LEAST_0, "lru_mb": ranges.AT_LEAST_0,
    "min_mask_fraction": ranges.FRACTION, "depth": ranges.AT_LEAST_1, "tile_size": ranges.AT_LEAST_1,
    "cpu_threads": ranges.AT_LEAST_0, "dist_timeout_minutes": ranges.ABOVE_0, "mask": ranges.FRACTION_INSIDE,
    "decoder_width": ranges.AT_LEAST_1, "vicreg_weights": ranges.AT_LEAST_0, "ep": ranges.AT_LEAST_1,
    "stop_after_ep": ranges.AT_LEAST_0, "wp_ep": ranges.AT_LEAST_0, "bs": ranges.AT_LEAST_1,
    "base_lr": ranges.ABOVE_0, "wd": ranges.AT_LEAST_0, "wde": ranges.AT_LEAST_0, "clip": ranges.AT_LEAST_0,
    "seed": ranges.AT_LEAST_0, "vis_every": ranges.AT_LEAST_0, "prefetch_factor": ranges.AT_LEAST_1,
    "probe_every": ranges.AT_LEAST_0, "probe_tiles": ranges.AT_LEAST_2, "probe_seed": ranges.AT_LEAST_0,
}


def check_in_file_values() -> None:
    """Raise one ArgumentError naming the file and line of every default above of another type than its annotation
    (`ep: int = "five"`): argparse would call it a command-line error, and a value out of its range the same."""
    tree = ast.parse(open(__file__, encoding="utf-8").read())
    lines = {statement.target.id: statement.lineno for node in tree.body
             if isinstance(node, ast.ClassDef) and node.name == "Args"
             for statement in node.body if isinstance(statement, ast.AnnAssign)}
    problems = []
    for name, annotation in typing.get_type_hints(Args).items():
        if name not in lines:
            continue
        value = getattr(Args, name)
        origin, members = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is list:
            fits = isinstance(value, list) and all(_has_type(item, members[0]) for item in value)
        else:
            fits = _has_type(value, annotation)
        where = f"{os.path.basename(__file__)} line {lines[name]}"
        if not fits:
            problems.append(f"{where}: {name} expects {getattr(annotation, '__name__', annotation)}, got {value!r}")
        elif name in SETTING_RANGES and (problem := ranges.problem(name, value, SETTING_RANGES[name])):
            problems.append(f"{where}: {problem}")
    if problems:
        raise ArgumentError("; ".join(problems))


def _has_type(value, expected: type) -> bool:
    """An int is a float too, but a bool is not an int."""
    return type(value) is expected or (expected is float and type(value) is int)


# Options renamed so that one concept has one name across the scripts; the old names still work, with a note.
# Tap gives a field one option name only, so the old names are rewritten before it parses (argparse scripts give
# the old name to `RenamedOption` instead).
RENAMED = {"--input_size": "--tile_size"}  # the tile side, as fine-tuning (TILE_SIZE) and evaluate/ name it


def parse_args(argv: list[str] | None = None) -> Args:
    check_in_file_values()
    argv = list(sys.argv[1:] if argv is None else argv)
    for index, item in enumerate(argv):
        name, equals, value = item.partition("=")
        if name in RENAMED:
            note_renamed(name, RENAMED[name])
            argv[index] = RENAMED[name] + equals + value
    args = Args(explicit_bool=True).parse_args(argv)
    args._options_given = [item.partition("=")[0] for item in argv if item.startswith("--")]
    return args
