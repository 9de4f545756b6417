"""Pretraining methods: the one interface that pretrain/main.py, its arguments and the checkpoint reader know a
method by, and the registry that maps `--method` to the module implementing it.

Adding a method: write a module that defines `METHOD`, an instance of a `Method` subclass (SparK's is in
pretrain/spark.py, VICReg's in pretrain/vicreg.py; tests/test_methods.py writes the smallest one), then add its line
to METHODS. Settings of its own go in pretrain/utils/arg_util.py's Args, where users look for every setting.
"""
import importlib

import torch

from pretrain.data.patches import InputSettings, RandomPatchDataset

# --method → the module that defines its METHOD; imported when first asked for, so reading a checkpoint
# imports only the method that wrote it.
METHODS = {
    "spark": "pretrain.spark",
    "vicreg": "pretrain.vicreg",
}


class Method:
    """A pretraining objective, as the loop, the arguments and the checkpoints see it. Class attributes name it;
    the functions build and run it. pretrain/main.py does the rest (optimiser, schedule, resume, logs)."""

    name = ""  # --method, and the `kind` of its full checkpoints
    title = ""  # in messages: "<title> weights, epoch 3 from ..."
    checkpoint_part = ""  # its full checkpoint (resume) is <model>_<checkpoint_part>_style.pth
    encoder_prefix = ""  # where the dense encoder sits in the model: its weights' prefix in the model's state dict
    image_tag = ""  # TensorBoard tag of the panels training_step shows
    # What each sample holds: a dataset with RandomPatchDataset's constructor, keyed by (epoch, index).
    dataset_class = RandomPatchDataset

    def problems(self, args) -> list[str]:
        """What in `args` (pretrain.utils.arg_util.Args) cannot work with this method, one phrase each."""
        return []

    def input_settings(self, reader_settings: InputSettings) -> InputSettings:
        """How the encoder sees tiles when the dataset cuts and scales them as `reader_settings` say: a method that
        changes its input inside the model says so here, and checkpoints record the result. Applied again to its
        own result it gives the same: checkpoints written before a method recorded its own are read through it."""
        return reader_settings

    def build_model(self, args, encoder: torch.nn.Module, sync_batchnorm: bool) -> torch.nn.Module:
        """The model trained around `encoder` (a pretrain.models encoder, dense), from `args`."""
        raise NotImplementedError

    def training_step(self, model, batch, device: torch.device,
                      show: bool) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor] | None]:
        """One forward of `model` (perhaps DDP-wrapped) on a DataLoader batch: (loss, scalars to log under their
        TensorBoard tags, written `group__name`, and averaged per epoch in log.jsonl, panels or None). With `show`,
        panels are volumes (B, C, D, H, W) to show side by side (the middle layer of sample 0 of each)."""
        raise NotImplementedError

    def summary(self, model: torch.nn.Module) -> str:
        """A phrase for the line a run starts with ("; grid (2, 3, 3) cells"), or ''."""
        return ""

    def probe_features(self, encoder: torch.nn.Module, volume_bcdhw: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features that the online ink probe (pretrain/probe.py) reads linearly, of a dense encoder (this
        method's, copied) on tiles (B, 1, D, T, T) read with this method's input settings. By default what the
        fine-tuning UNet reads: every stage, max-pooled over depth, upsampled to the finest stage's grid, stacked."""
        pooled_bchw = [stage_bcdhw.amax(dim=2) for stage_bcdhw in encoder(volume_bcdhw, hierarchical=True)]
        grid = pooled_bchw[0].shape[-2:]
        return torch.cat([torch.nn.functional.interpolate(stage_bchw, size=grid, mode="bilinear", align_corners=False)
                          if stage_bchw.shape[-2:] != grid else stage_bchw for stage_bchw in pooled_bchw], dim=1)

    def dense_encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The encoder inside the model, with the dense module names that fine-tuning loads."""
        return model.get_submodule(self.encoder_prefix.removesuffix("."))


def get(name: str) -> Method:
    """The registered method `name` (a KeyError if there is none)."""
    return importlib.import_module(METHODS[name]).METHOD
