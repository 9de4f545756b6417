"""Every checkpoint file, written and read in one place.

Each file written carries its `kind` and the `InputSettings` its encoder was trained with:
- a pretraining method's name ("spark", "vicreg": pretrain/methods.py): a full pretraining checkpoint, for resuming
  (the whole model: encoder with SparK's decoder or VICReg's projector, optimizer, epoch, settings, git commit);
- "encoder": an encoder's weights with the dense module names of `pretrain.models.build_encoder`
  (`<model>_timm_style.pth`, the per-epoch encoders), for fine-tuning and evaluation;
- "finetune": a fine-tuning checkpoint (`best.pth`, `last.pth`): the ink UNet, its config and run state.
Files read without a `kind`: this project's older files (a full pretraining checkpoint with `args`, a fine-tuning
one with `config`, a bare encoder state dict) and Kensho Hara's Kinetics checkpoints (`r3d50_K_200ep.pth`: `arch`
and `state_dict`, keys perhaps prefixed `module.`, a 3-channel `conv1` and an `fc` head). Their input settings come
from their recorded arguments where they have them; a bare state dict or a Kinetics file has none, and is used with
the user's.

Checkpoints are shared between researchers and downloaded, so every file is read with `weights_only=True`: a
pickle that could call arbitrary code is refused with one line. Besides tensors and plain containers, only numpy's
RNG state (an array, in older full checkpoints) is allowed.

Every file written records a SHA-256 of everything in it (`checksum`: tensors, and the settings beside them, such as
the depth window, the model's name and the run's config), checked on every read: a flipped byte in a copy or
download would otherwise load as other weights, or read other layers, without a word (torch's zip reader checks no
CRC). A file with a kind must carry one: a checksum key renamed by damage is refused, not read unchecked. Files
without a kind (older files, foreign state dicts, Kinetics) load unchecked; files of the first checksum version (a
bare hex digest, over their tensors only) are checked as far as it goes.
"""
import dataclasses
import hashlib
import os
import pathlib
import pickle
import warnings

import numpy as np
import torch

from pretrain import methods
from pretrain.data.patches import InputSettings
from pretrain.models import ENCODER_NAMES, build_encoder
from pretrain.utils.errors import OneLineError
from pretrain.utils.misc import git_commit, save_atomic

# The kinds besides the pretraining methods' (each method names its own, and where its encoder sits): where the
# encoder's weights sit inside the state dict of each kind's model, and the kind's name in messages.
ENCODER_PREFIXES = {"encoder": "", "finetune": "encoder."}
KIND_NAMES = {"encoder": "encoder-only", "finetune": "fine-tuning", "kinetics": "Kinetics"}
# What a weights-only load allows beyond torch's own types: numpy arrays, for numpy's RNG state.
ALLOWED_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
# What `checksum` values start with: their digest covers tensors and settings (`contents_checksum`).
CHECKSUM_SCHEME = "sha256-all"


class CheckpointError(OneLineError, ValueError):
    """A checkpoint is missing, unreadable, unsafe, or made for another model; the message names which."""


def encoder_file(exp_dir: str | os.PathLike, model: str, epoch: int | None = None) -> pathlib.Path:
    """Where a pretraining run in `exp_dir` writes its encoder for fine-tuning: `<model>_timm_style.pth` (SparK's
    name, which every method keeps), or with `epoch`, that epoch's copy (--keep_epoch_encoders) in epochs/."""
    if epoch is None:
        return pathlib.Path(exp_dir) / f"{model}_timm_style.pth"
    return pathlib.Path(exp_dir) / "epochs" / f"{model}_timm_style_ep{epoch:03d}.pth"


def kinds() -> tuple[str, ...]:
    """Every kind a file is written as: each registered method's (full pretraining checkpoints), then the others."""
    return (*methods.METHODS, *ENCODER_PREFIXES)


def save(path: str | os.PathLike, kind: str, model_state: dict, settings: InputSettings, **entries) -> None:
    """Write a checkpoint of `kind` atomically: its model state, input settings, git commit and `entries`."""
    if kind not in kinds():
        raise ValueError(f"checkpoint kind {kind!r} is not one of {kinds()}")
    contents = {"kind": kind, "input": settings.as_dict(), "model": model_state, "commit": git_commit(), **entries}
    save_atomic({**contents, "checksum": f"{CHECKSUM_SCHEME}:{contents_checksum(contents)}"}, path)


def contents_checksum(contents) -> str:
    """SHA-256 over everything in `contents`, walked in key order: every tensor and numpy array with its key path,
    dtype and shape, and every plain value (the settings: numbers, strings, None) with its key path and type.
    Another value, dtype, shape or setting, a key renamed, or two entries swapped, all give another digest."""
    return _checksum(contents, settings_too=True)


def tensors_checksum(contents) -> str:
    """SHA-256 over the tensors and numpy arrays in `contents` only: the first checksum version (a bare hex digest),
    still checked when such a file is read."""
    return _checksum(contents, settings_too=False)


def _checksum(contents, settings_too: bool) -> str:
    digest = hashlib.sha256()

    def walk(value, key_path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                # repr keeps an optimizer state's integer key 0 apart from a string key "0"
                walk(item, f"{key_path}/{key!r}" if settings_too else f"{key_path}/{key}")
        elif isinstance(value, (list, tuple)):
            if settings_too:  # a list that lost or gained an entry, or became a tuple
                digest.update(f"{key_path} {type(value).__name__} {len(value)}\n".encode())
            for index, item in enumerate(value):
                walk(item, f"{key_path}/{index}")
        elif isinstance(value, torch.Tensor):
            digest.update(f"{key_path} {value.dtype} {tuple(value.shape)}\n".encode())
            # Viewed as bytes, so that every dtype (bfloat16 included) hashes without a conversion.
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, np.ndarray):
            digest.update(f"{key_path} {value.dtype} {value.shape}\n".encode())
            digest.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        elif not settings_too:
            return
        elif value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
            # repr gives a float back exactly and keeps 1, 1.0, True and "1" apart
            digest.update(f"{key_path} {type(value).__name__} {value!r}\n".encode())
        else:
            raise TypeError(f"a checkpoint entry at {key_path} is a {type(value).__name__}, which the checksum does "
                            "not cover: save plain numbers, strings, containers and tensors")

    walk(contents, "")
    return digest.hexdigest()


def read(path: str | os.PathLike) -> dict:
    """The checkpoint at `path` as a dict with `kind` (one of kinds(), or "kinetics") and `input` (a dict of
    InputSettings, or None when the file does not say); older files are brought to that form."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # torch names the global it refused; anything else is not a checkpoint
            raise CheckpointError(f"checkpoint {path} cannot be read: it is not a PyTorch checkpoint of weights "
                                  "(torch.save of tensors, numbers, strings and containers)") from error
        raise CheckpointError(f"checkpoint {path} holds more than weights and settings (a pickled object such as "
                              f"a function or class), so it is not loaded: it could run code. Re-save its state "
                              f"dict with torch.save if you trust it") from error
    except Exception as error:  # noqa: BLE001 - any other read failure means the same thing to the user
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a dict of weights")
    if "kind" in checkpoint or "checksum" in checkpoint:  # written by save: checked
        _check(checkpoint, path)
    if "kind" in checkpoint:
        if checkpoint["kind"] not in kinds():
            raise CheckpointError(f"checkpoint {path} is of unknown kind {checkpoint['kind']!r}")
        return checkpoint
    return _older_format(checkpoint, path)


def _check(checkpoint: dict, path: pathlib.Path) -> None:
    """Check a checkpoint written by `save` against its recorded checksum (which it removes), or raise CheckpointError:
    one changed byte anywhere in what decides what the model computes must never load quietly."""
    damaged = f"checkpoint {path} is damaged"
    copy_again = "(a corrupted copy or download); copy it again"
    if "kind" not in checkpoint:  # a checksum only save writes, beside a kind: the kind's key was changed
        raise CheckpointError(f"{damaged}: it has a checksum but no kind {copy_again}")
    recorded = checkpoint.pop("checksum", None)
    if not isinstance(recorded, str):  # the key itself changed: checking nothing would load any damage
        raise CheckpointError(f"{damaged}: it has a kind but no checksum {copy_again}")
    scheme, separator, value = recorded.rpartition(":")
    if separator and scheme == CHECKSUM_SCHEME:
        if contents_checksum(checkpoint) != value:
            raise CheckpointError(f"{damaged}: its tensors or settings no longer match the SHA-256 recorded when it "
                                  f"was written {copy_again}")
    elif not separator and len(value) == 64:  # the first checksum version: the tensors alone were hashed
        if tensors_checksum(checkpoint) != value:
            raise CheckpointError(f"{damaged}: its tensors no longer match the SHA-256 recorded when it was written "
                                  f"{copy_again}")
    else:
        raise CheckpointError(f"{damaged}: its checksum {recorded[:24]!r} is of no form this toolkit writes "
                              f"{copy_again}")


def _older_format(checkpoint: dict, path: pathlib.Path) -> dict:
    """A file written before checkpoints had a kind, or by another project, in today's form."""
    if "state_dict" in checkpoint and "arch" in checkpoint:
        state = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
        return {"kind": "kinetics", "input": None, "arch": checkpoint["arch"],
                "model": {key: value for key, value in state.items() if not key.startswith("fc.")}}
    if "model" in checkpoint and "args" in checkpoint:  # full pretraining: its arguments name its input
        args = checkpoint["args"]
        settings = InputSettings(model=args["model"], depth=args["depth"], depth_offset=args.get("depth_offset", 0),
                                 follow_surface=args.get("follow_surface", False),
                                 normalization=args.get("normalization", "range"),
                                 tile_size=args["input_size"])  # files without a kind predate the name tile_size
        return {**checkpoint, "kind": args.get("method", "spark"), "input": settings.as_dict()}
    if "model" in checkpoint and "config" in checkpoint:  # fine-tuning: its config names its input
        config = checkpoint["config"]
        settings = InputSettings(model=config["MODEL"], depth=config["DEPTH"], depth_offset=config.get("DEPTH_OFFSET", 0),
                                 follow_surface=config.get("FOLLOW_SURFACE", False),
                                 normalization=config.get("NORMALIZATION", "range"), tile_size=config["TILE_SIZE"])
        return {**checkpoint, "kind": "finetune", "input": settings.as_dict()}
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return {"kind": "encoder", "input": None, "model": checkpoint}
    raise CheckpointError(f"{path} is not an encoder, pretraining, fine-tuning or Kinetics checkpoint "
                          f"(keys: {', '.join(sorted(map(str, checkpoint))[:5])})")


def input_settings(checkpoint: dict) -> InputSettings | None:
    """The input settings a checkpoint records (None for a bare state dict or a Kinetics file)."""
    if checkpoint["input"] is None:
        return None
    settings = InputSettings.from_dict(checkpoint["input"])
    method = checkpoint["kind"] if checkpoint["kind"] in methods.METHODS else checkpoint.get("method")
    if method in methods.METHODS:
        # Files written before a method recorded what its encoder sees name the reader's settings (VICReg's the
        # reader's "range", though its encoder saw every view standardised): the method's own account applies.
        return methods.get(method).input_settings(settings)
    return settings


def kind_name(kind: str) -> str:
    """A checkpoint kind's name in messages ("SparK pretraining", "encoder-only")."""
    return methods.get(kind).title if kind in methods.METHODS else KIND_NAMES[kind]


@dataclasses.dataclass
class EncoderWeights:
    """An encoder's state dict (dense names), the input settings it was trained with (None when unknown), and
    a description of where it came from, for messages."""

    state_dict: dict
    settings: InputSettings | None
    description: str


def encoder_weights(path: str | os.PathLike, in_channels: int = 1) -> EncoderWeights:
    """The encoder inside a checkpoint of any kind."""
    checkpoint = read(path)
    kind = checkpoint["kind"]
    if kind == "kinetics":
        state = dict(checkpoint["model"])
        conv1 = state.get("conv1.weight")
        if conv1 is not None and conv1.shape[1] != in_channels:
            if in_channels != 1:
                raise CheckpointError(f"{path}: conv1 has {conv1.shape[1]} input channels; only reduction to 1 is supported")
            # A grey volume then gives the response the RGB filter gave to grey video (as the Kaggle 4th place did).
            state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        return EncoderWeights(state, None, f"Kinetics ({checkpoint['arch']}) weights from {path}")
    prefix = methods.get(kind).encoder_prefix if kind in methods.METHODS else ENCODER_PREFIXES[kind]
    state = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    epoch = checkpoint.get("epoch")
    if kind in methods.METHODS and epoch is not None:
        epoch += 1  # full pretraining checkpoints count finished epochs from 0
    elif kind == "finetune":
        epoch = checkpoint.get("state", {}).get("epoch")
    when = f", epoch {epoch}" if epoch is not None else ""
    return EncoderWeights(state, input_settings(checkpoint), f"{kind_name(kind)} weights{when} from {path}")


def restore(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Load a resume checkpoint's model (strictly) and optimizer state; weights that do not fit are one error."""
    mismatch = describe_state_dict_mismatch(model.state_dict(), saved["model"])
    if mismatch:
        raise CheckpointError(f"{source} does not fit this run's model ({mismatch}); start another run folder")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])


def resolve_input_settings(weights: EncoderWeights | None, given: dict, defaults: InputSettings,
                           setting_names: dict[str, str]) -> InputSettings:
    """The input settings to use an encoder with: the user's where they gave a value (`given`, by InputSettings
    field), else the encoder's own, else `defaults` (no encoder, or one that does not record them).

    A given value that contradicts the encoder is an error naming both (with `setting_names`, the user's name of
    each field): the encoder would see data unlike anything it was trained on. The tile size only warns: the
    encoder is convolutional, and another tile size changes the context it sees, not what its input means.
    """
    trained = weights.settings if weights is not None else None
    values = {}
    for field in dataclasses.fields(InputSettings):
        name = field.name
        if name in given and trained is not None and given[name] != getattr(trained, name):
            setting, theirs, ours = setting_names.get(name, name), getattr(trained, name), given[name]
            message = (f"{setting} {ours!r} differs from the encoder's {theirs!r} ({weights.description} were trained "
                       f"with {setting} {theirs!r})")
            if name != "tile_size":
                raise CheckpointError(f"{message}: leave {setting} unset to use the encoder's, or use another encoder")
            warnings.warn(f"{message}; fine for a convolutional encoder, which then sees other context")
        values[name] = given[name] if name in given else getattr(trained if trained is not None else defaults, name)
    return InputSettings(**values)


def describe_state_dict_mismatch(model_state: dict, loaded_state: dict) -> str:
    """A short account of missing / unexpected / differently-shaped keys ('' when they match exactly)."""
    missing = sorted(set(model_state) - set(loaded_state))
    unexpected = sorted(set(loaded_state) - set(model_state))
    shapes = [f"{key} {tuple(loaded_state[key].shape)} vs {tuple(model_state[key].shape)}"
              for key in sorted(set(model_state) & set(loaded_state))
              if hasattr(loaded_state[key], "shape") and loaded_state[key].shape != model_state[key].shape]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})")
    return "; ".join(parts)


def architecture_of(encoder_state: dict) -> str | None:
    """The registered encoder whose state dict the given one fits exactly, if any: for files that do not name
    their architecture (a bare state dict, a Kinetics file)."""
    for name in ENCODER_NAMES:
        with torch.device("meta"):  # names and shapes only: no memory, no initialisation time
            candidate = build_encoder(name)
        if not describe_state_dict_mismatch(candidate.state_dict(), encoder_state):
            return name
    return None


def load_encoder(encoder: torch.nn.Module, weights: EncoderWeights, model_name: str, setting: str) -> None:
    """Load `weights` into `encoder` strictly: every key, nothing else. When they do not fit, the error names
    the architecture they hold, and `setting` (the option that chooses the model, e.g. "--model")."""
    mismatch = describe_state_dict_mismatch(encoder.state_dict(), weights.state_dict)
    if mismatch:
        holds = weights.settings.model if weights.settings is not None else architecture_of(weights.state_dict)
        hint = f"it holds a {holds} encoder: set {setting} {holds}" if holds else f"it fits no known encoder ({mismatch})"
        raise CheckpointError(f"{weights.description} do not fit {model_name}: {hint}")
    encoder.load_state_dict(weights.state_dict)
