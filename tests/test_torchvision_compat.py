"""The compatibility shim lets timm / smp import with this platform's torch and torchvision."""
import torch

import pretrain.torchvision_compat as torchvision_compat


def test_timm_and_smp_import_and_build_without_weights():
    import segmentation_models_pytorch
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    unet = segmentation_models_pytorch.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1)
    assert unet.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


def test_acting_is_idempotent():
    # A second call never redefines schemas (that would raise in torch.library).
    assert torchvision_compat.ensure_torchvision_importable() is False
