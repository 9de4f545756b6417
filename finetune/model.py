"""InkUNet: the pretrained 3D encoder under a 2D UNet decoder that predicts ink per pixel.

Ink lies on the papyrus surface, whose depth wanders from pixel to pixel, so each encoder stage's
3D map (B, C, D', H', W') is collapsed over depth (max or mean) into a 2D skip (B, C, H', W'), and
segmentation_models_pytorch's `UnetDecoder` + `SegmentationHead` turn the skips into ink logits.
This is ScrollMAE's and the Grand Prize ResNet3D's layout. The decoder knows the encoder only
through its contract: channels from `get_feature_map_channels()`, strides from
`get_downsample_ratio()`.
"""
import math

import pretrain.torchvision_compat  # noqa: F401 - must precede segmentation_models_pytorch
import segmentation_models_pytorch.base
import segmentation_models_pytorch.decoders.unet.decoder
import torch
from torch import nn

from pretrain.models import build_encoder

DEPTH_POOLS = ("max", "mean")
OUTPUT_STRIDES = (1, 4)
MIN_DECODER_WIDTH = 16


class InkUNet(nn.Module):
    """(B, 1, D, H, W) volume → (B, 1, H, W) ink logits, at full resolution.

    `output_stride` 1 decodes up to full resolution; 4 stops at the finest stage (H/4, cheaper, as
    ScrollMAE and the Grand Prize models) and upsamples the logits bilinearly. `freeze_encoder`
    freezes the encoder's weights and keeps it in eval mode, so its BatchNorm statistics stay too.
    """

    def __init__(self, encoder: nn.Module, depth_pool: str = "max", output_stride: int = 4,
                 freeze_encoder: bool = False) -> None:
        super().__init__()
        if depth_pool not in DEPTH_POOLS:
            raise ValueError(f"depth pool {depth_pool!r} is not one of {DEPTH_POOLS}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output stride {output_stride} is not one of {OUTPUT_STRIDES}")
        self.encoder = encoder
        self.depth_pool = depth_pool
        self.output_stride = output_stride
        self.freeze_encoder = freeze_encoder
        stage_channels = list(encoder.get_feature_map_channels())  # e.g. [256, 512, 1024, 2048]
        coarsest_stride = encoder.get_downsample_ratio()[1]  # 32 in (H, W)
        # Each stage halves the spatial size, so stage i sits at coarsest / 2^(stages-1-i): 4, 8, 16, 32.
        self.finest_stage_stride = coarsest_stride // 2 ** (len(stage_channels) - 1)
        num_blocks = int(math.log2(coarsest_stride // output_stride))
        # smp's decoder takes one feature map per stride from the output's up to the coarsest; the
        # finer ones the encoder does not have are empty (zero-channel) skips.
        self.placeholder_strides = [output_stride * 2**level
                                    for level in range(int(math.log2(self.finest_stage_stride // output_stride)))]
        encoder_channels = [0] * len(self.placeholder_strides) + stage_channels
        # smp's default widths for a ResNet-50 are (256, 128, 64, 32, 16): the deepest stage's / 8, halving.
        decoder_channels = [max(MIN_DECODER_WIDTH, stage_channels[-1] // 2 ** (3 + block)) for block in range(num_blocks)]
        self.decoder = segmentation_models_pytorch.decoders.unet.decoder.UnetDecoder(
            encoder_channels=encoder_channels, decoder_channels=decoder_channels, n_blocks=num_blocks)
        self.segmentation_head = segmentation_models_pytorch.base.SegmentationHead(
            decoder_channels[-1], 1, kernel_size=3, upsampling=output_stride)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Freeze or unfreeze the encoder's weights and BatchNorm statistics (LP-FT unfreezes after a few epochs)."""
        self.freeze_encoder = frozen
        self.encoder.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "InkUNet":
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # frozen BatchNorm statistics: no running-mean updates from fine-tuning batches
        return self

    def forward(self, volume_b1dhw: torch.Tensor) -> torch.Tensor:
        batch, _, _, height, width = volume_b1dhw.shape
        stage_maps = self.encoder(volume_b1dhw, hierarchical=True)  # 4 × (B, C_i, D_i, H_i, W_i)
        if self.depth_pool == "max":
            skips = [stage_map.amax(dim=2) for stage_map in stage_maps]  # 4 × (B, C_i, H_i, W_i)
        else:
            skips = [stage_map.mean(dim=2) for stage_map in stage_maps]
        placeholders = [volume_b1dhw.new_zeros(batch, 0, height // stride, width // stride)
                        for stride in self.placeholder_strides]
        decoded_bchw = self.decoder(placeholders + skips)  # (B, C, H / output_stride, W / output_stride)
        return self.segmentation_head(decoded_bchw)  # (B, 1, H, W)

    def decoder_state_keys(self) -> set[str]:
        """The state keys that a pretrained encoder checkpoint cannot provide."""
        return {key for key in self.state_dict() if not key.startswith("encoder.")}


def build_ink_unet(model_name: str, depth_pool: str = "max", output_stride: int = 4,
                   freeze_encoder: bool = False) -> InkUNet:
    return InkUNet(build_encoder(model_name), depth_pool, output_stride, freeze_encoder)
