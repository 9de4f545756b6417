"""Encoder weights from any checkpoint this project meets, loaded strictly.

Four kinds are recognised automatically:
- an encoder-only state_dict (`<model>_timm_style.pth`, written by pretraining);
- a full pretraining checkpoint (`<model>_withdecoder_spark_style.pth`, `<model>_withprojector_vicreg_style.pth`):
  the encoder's part is taken out of it;
- a fine-tuning checkpoint (`best.pth`, `last.pth` of `finetune/train.py`): the ink UNet's encoder, to start
  another segment from it or to probe what supervised training put into it;
- a Kinetics checkpoint from Kensho Hara's 3D-ResNets-PyTorch (`r3d50_K_200ep.pth`, `r3d50_KM_200ep.pth`): a dict
  with `arch` and `state_dict`, keys perhaps prefixed `module.`, a 3-channel `conv1` and an `fc` head for 700
  or 1039 classes. `conv1` is reduced to the encoder's channels by summing over RGB (as the Kaggle 4th-place
  solution did: a grey volume then gives the response the RGB filter gave to grey video), and `fc` is dropped.
Everything else must match exactly: a missing, unexpected or reshaped key is an error that names it.
"""
import torch

from pretrain.utils.misc import CheckpointError, describe_state_dict_mismatch, load_checkpoint

ENCODER_PREFIXES = {"spark": "sparse_encoder.encoder.", "vicreg": "encoder."}


def encoder_state_dict(checkpoint: dict, in_channels: int, source: str) -> tuple[dict, str]:
    """(encoder state_dict with dense names, kind of checkpoint) from a loaded checkpoint."""
    if "state_dict" in checkpoint and "arch" in checkpoint:
        state = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
        state = {key: value for key, value in state.items() if not key.startswith("fc.")}
        conv1 = state.get("conv1.weight")
        if conv1 is not None and conv1.shape[1] != in_channels:
            if in_channels != 1:
                raise CheckpointError(f"{source}: conv1 has {conv1.shape[1]} input channels; only reduction to 1 is supported")
            state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
        return state, f"Kinetics ({checkpoint['arch']})"
    if "model" in checkpoint and "args" in checkpoint:
        method = checkpoint["args"].get("method", "spark")
        prefix = ENCODER_PREFIXES.get(method)
        if prefix is None:
            raise CheckpointError(f"{source}: a pretraining checkpoint of unknown method {method!r}")
        state = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
        return state, f"{method} pretraining ({checkpoint['args'].get('model')}, epoch {checkpoint.get('epoch', -1) + 1})"
    if "model" in checkpoint and "config" in checkpoint:
        state = {key.removeprefix("encoder."): value for key, value in checkpoint["model"].items()
                 if key.startswith("encoder.")}
        return state, f"fine-tuning ({checkpoint['config'].get('MODEL')}, epoch {checkpoint.get('state', {}).get('epoch')})"
    if checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        return checkpoint, "encoder-only"
    raise CheckpointError(f"{source} is not an encoder, pretraining, fine-tuning or Kinetics checkpoint (keys: {sorted(checkpoint)[:5]})")


def load_encoder_weights(encoder: torch.nn.Module, path: str) -> str:
    """Load a checkpoint of any known kind into `encoder` strictly; returns a description of what was loaded."""
    conv1 = getattr(encoder, "conv1", None)
    in_channels = conv1.in_channels if conv1 is not None else 1
    state, kind = encoder_state_dict(load_checkpoint(path), in_channels, str(path))
    mismatch = describe_state_dict_mismatch(encoder.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{path} ({kind}) does not fit this encoder: {mismatch}")
    encoder.load_state_dict(state)
    return f"{kind} weights from {path}"
