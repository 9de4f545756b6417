"""Light 3D reconstruction decoder for SparK-3D (pretraining only; fine-tuning has its own).

UNet-style: from the coarsest densified map, each block upsamples by that stage's stride and
refines with two 3×3×3 conv + BN + ReLU; the next (finer) densified skip is added before the next
block. Widths halve at every block; a 1×1×1 conv maps to the volume's channels.

Cost. With ResNet3d's strides the last block runs at full input resolution, and a 3×3×3 conv
there costs 27·C² per voxel, so the decoder's compute is dominated by its finest width
(width / 16). Two choices keep it light enough for CPU: the transposed conv already reduces to the
block's output width (SparK keeps the input width through the first conv), and the default width
is 256 for ResNet-50 (SparK uses 768 for 2D ResNet-50): the full-resolution block then has 16
channels and the decoder costs under a third of the ResNet-50 encoder's forward FLOPs (12 vs
42 GFLOP for a batch of 2 at 16 × 96 × 96; 1.5 M parameters).
"""
import math
from typing import Sequence

import torch
from torch import nn

# Coarsest first: layer4 → layer3 → layer2 → layer1 are (2, 2, 2) each, then layer1 → input is
# the stem's conv stride × max-pool stride, (1, 2, 2) · (1, 2, 2).
DEFAULT_STAGE_STRIDES = ((2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 4, 4))


class DecoderBlock3d(nn.Module):
    """Upsample by `stride_dhw` to `out_channels`, then two 3×3×3 conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride_dhw: Sequence[int], sync_batchnorm: bool = False):
        super().__init__()
        batchnorm_class = nn.SyncBatchNorm if sync_batchnorm else nn.BatchNorm3d
        # Kernel = stride: every output voxel gets exactly one kernel tap (no uneven overlap, so no
        # checkerboard), output size is exactly input × stride, and it is the cheapest choice; the
        # 3×3×3 convs that follow mix neighbours.
        self.upsample = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=stride_dhw, stride=stride_dhw)
        self.conv = nn.Sequential(
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            batchnorm_class(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            batchnorm_class(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        return self.conv(self.upsample(x_bcdhw))


class LightDecoder3d(nn.Module):
    """Reconstructs (B, in_channels, D, H, W) from densified stage maps, coarsest first.

    `skip_channels[i]` is the width the i-th (coarsest-first) input must have; SparK3d's densify
    projections map the encoder's channels onto these.
    """

    def __init__(
        self,
        width: int = 256,
        downsample_ratio: Sequence[int] = (8, 32, 32),
        in_channels: int = 1,
        stage_strides: Sequence[Sequence[int]] = DEFAULT_STAGE_STRIDES,
        sync_batchnorm: bool = False,
    ):
        super().__init__()
        total_stride = tuple(math.prod(stride[axis] for stride in stage_strides) for axis in range(3))
        if total_stride != tuple(downsample_ratio):
            raise ValueError(
                f"decoder stage strides {tuple(map(tuple, stage_strides))} upsample by {total_stride}, "
                f"but the encoder's downsample ratio is {tuple(downsample_ratio)}"
            )
        num_blocks = len(stage_strides)
        if width % 2 ** num_blocks != 0:
            raise ValueError(f"decoder width {width} must be divisible by 2^{num_blocks} (it halves per block)")
        self.downsample_ratio = tuple(downsample_ratio)
        self.in_channels = in_channels
        self.widths = [width // 2 ** i for i in range(num_blocks + 1)]
        self.skip_channels = self.widths[:-1]
        self.blocks = nn.ModuleList(
            DecoderBlock3d(block_in, block_out, stride, sync_batchnorm)
            for block_in, block_out, stride in zip(self.widths[:-1], self.widths[1:], stage_strides)
        )
        self.projection = nn.Conv3d(self.widths[-1], in_channels, kernel_size=1)

    def forward(self, skips_coarsest_first: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(skips_coarsest_first) != len(self.blocks):
            raise ValueError(f"decoder expects {len(self.blocks)} stage maps, got {len(skips_coarsest_first)}")
        x_bcdhw = skips_coarsest_first[0]
        for block_index, block in enumerate(self.blocks):
            if block_index > 0:
                x_bcdhw = x_bcdhw + skips_coarsest_first[block_index]
            x_bcdhw = block(x_bcdhw)
        return self.projection(x_bcdhw)  # (B, in_channels, D, H, W)
