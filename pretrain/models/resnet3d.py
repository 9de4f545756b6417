"""Dense 3D ResNet encoder for (B, C, D, H, W) scroll volumes, shared by pretraining and fine-tuning.

Written by hand rather than taken from MONAI or a video-model zoo because it is small, because it
keeps the exact module names of Kensho Hara's 3D-ResNets-PyTorch (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, ... with shortcut type 'B'), so those checkpoints load by name, because
the strides need to differ from Hara's (below), and because it adds no dependency.

Strides. Hara's max-pool has stride 2 in depth as well, which makes the depth downsample 16: a
16-layer segment crop would have a single cell in depth and SparK's 3D 'cell' masking would
degenerate to columns. Here the stem conv has stride (1, 2, 2) and the max-pool kernel 3, stride
(1, 2, 2), padding 1 (as ScrollMAE's pool, which does not stride depth); layer2 to layer4 stride 2
in D, H and W. The downsample ratio is therefore (8, 32, 32) for (D, H, W).

Encoder contract (what decoders may know): `get_downsample_ratio()`, `get_feature_map_channels()`,
`forward(x, hierarchical=True)`.
"""
import math
from typing import Sequence, Union

import torch
from torch import nn

BASE_WIDTHS = (64, 128, 256, 512)


def conv3x3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock3d(nn.Module):
    """Two 3×3×3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = conv3x3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3x3(planes, planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample
        self.stride = stride
        self.out_channels = planes * self.expansion

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        identity = x_bcdhw if self.downsample is None else self.downsample(x_bcdhw)
        out = self.relu(self.bn1(self.conv1(x_bcdhw)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    """1×1×1 reduce, 3×3×3 (carries the stride, as in Hara's code), 1×1×1 expand ×4 (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = conv1x1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = conv3x3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = conv1x1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.out_channels = planes * self.expansion

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        identity = x_bcdhw if self.downsample is None else self.downsample(x_bcdhw)
        out = self.relu(self.bn1(self.conv1(x_bcdhw)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[type[BasicBlock3d], type[Bottleneck3d]]


def make_stage(block: Block, in_channels: int, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
    """One of layer1..layer4: the first block carries the stride and, where the shape changes, the
    projection shortcut (Hara's type 'B')."""
    downsample = None
    if stride != 1 or in_channels != planes * block.expansion:
        downsample = nn.Sequential(
            conv1x1x1(in_channels, planes * block.expansion, stride),
            nn.BatchNorm3d(planes * block.expansion),
        )
    blocks = [block(in_channels, planes, stride, downsample)]
    blocks += [block(planes * block.expansion, planes) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class ResNet3d(nn.Module):
    """3D ResNet; an encoder (no pooling head, no fc) unless `num_classes > 0`.

    `width` scales the base widths (64, 128, 256, 512) for small variants, like Hara's
    `widen_factor`; stage outputs have `width × base × block.expansion` channels.
    """

    def __init__(
        self,
        block: Block,
        blocks_per_stage: Sequence[int],
        in_channels: int = 1,
        width: float = 1.0,
        num_classes: int = 0,
    ):
        super().__init__()
        widths = [max(1, int(base * width)) for base in BASE_WIDTHS]
        self.in_channels = in_channels
        self.conv1 = nn.Conv3d(
            in_channels, widths[0], kernel_size=(7, 7, 7), stride=(1, 2, 2), padding=(3, 3, 3), bias=False
        )
        self.bn1 = nn.BatchNorm3d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        # Depth stride 1: see the module docstring.
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=(1, 2, 2), padding=1)
        self.layer1 = make_stage(block, widths[0], widths[0], blocks_per_stage[0], stride=1)
        self.layer2 = make_stage(block, self.layer1[-1].out_channels, widths[1], blocks_per_stage[1], stride=2)
        self.layer3 = make_stage(block, self.layer2[-1].out_channels, widths[2], blocks_per_stage[2], stride=2)
        self.layer4 = make_stage(block, self.layer3[-1].out_channels, widths[3], blocks_per_stage[3], stride=2)
        if num_classes > 0:
            self.avgpool = nn.AdaptiveAvgPool3d(1)
            self.fc = nn.Linear(self.layer4[-1].out_channels, num_classes)
        else:
            self.avgpool = None
            self.fc = None

        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def get_downsample_ratio(self) -> tuple[int, int, int]:
        """(D, H, W) ratio of input size to layer4 size, read from the built layers' strides."""
        strides = [self.conv1.stride, self.maxpool.stride]
        strides += [(stage[0].stride,) * 3 for stage in self.stages()]
        return tuple(math.prod(stride[axis] for stride in strides) for axis in range(3))

    def get_feature_map_channels(self) -> list[int]:
        """Channels of the layer1..layer4 outputs, e.g. [256, 512, 1024, 2048] for ResNet-50."""
        return [stage[-1].out_channels for stage in self.stages()]

    def forward(self, x_bcdhw: torch.Tensor, hierarchical: bool = True):
        """(B, C_in, D, H, W) → the 4 stage maps (hierarchical), else the layer4 map, or fc logits
        when the model has a head. Stage i has size (D, H/4, W/4) / 2^i per axis (D not divided
        by the stem)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x_bcdhw))))  # (B, C0, D, H/4, W/4)
        feature_maps = []
        for stage in self.stages():
            x = stage(x)
            feature_maps.append(x)
        if hierarchical:
            return feature_maps
        if self.fc is None:
            return x  # (B, C4, D/8, H/32, W/32)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)
