"""Name → 3D encoder registry, shared by pretraining and fine-tuning."""
from pretrain.models.resnet3d import BasicBlock3d, Bottleneck3d, ResNet3d

# name: (block, blocks per stage, width multiplier)
_ENCODER_SPECS = {
    "resnet18_3d": (BasicBlock3d, (2, 2, 2, 2), 1.0),
    "resnet34_3d": (BasicBlock3d, (3, 4, 6, 3), 1.0),
    "resnet50_3d": (Bottleneck3d, (3, 4, 6, 3), 1.0),
    # ResNet-50 at a quarter of the width: the real architecture, small enough for CPU demos.
    "resnet50_3d_narrow": (Bottleneck3d, (3, 4, 6, 3), 0.25),
    # ResNet-18 at an eighth of the width: for tests.
    "resnet18_3d_tiny": (BasicBlock3d, (2, 2, 2, 2), 0.125),
}
ENCODER_NAMES = tuple(_ENCODER_SPECS)


def build_encoder(name: str, in_channels: int = 1) -> ResNet3d:
    """A freshly initialised headless encoder (no fc) by registry name."""
    if name not in _ENCODER_SPECS:
        raise ValueError(f"unknown encoder {name!r}; known encoders: {', '.join(ENCODER_NAMES)}")
    block, blocks_per_stage, width = _ENCODER_SPECS[name]
    return ResNet3d(block, blocks_per_stage, in_channels=in_channels, width=width)
