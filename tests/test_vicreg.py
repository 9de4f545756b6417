"""VICReg: loss terms against the paper's formulas, the two-view pipeline, the model, and Kinetics import."""
import numpy as np
import pytest
import torch

from pretrain.data.patches import depth_window, normalize_patch
from pretrain.data.segment import open_segment
from pretrain.data.views import DEPTH_OFFSETS, PIXEL_OFFSETS, TwoViewDataset
from pretrain.models import build_encoder
from pretrain.models.resnet3d import BasicBlock3d, ResNet3d
from pretrain.models.weights import load_encoder_weights
from pretrain.utils.misc import CheckpointError
from pretrain.vicreg import VICReg, off_diagonal, vicreg_terms
from tests.conftest import random_volume, rectangle_mask, write_png, write_zarr_segment


def test_off_diagonal():
    matrix = torch.arange(16.0).view(4, 4)
    expected = [matrix[i, j].item() for i in range(4) for j in range(4) if i != j]
    assert off_diagonal(matrix).tolist() == expected


def test_vicreg_terms_match_the_formulas():
    generator = np.random.default_rng(0)
    z1 = generator.normal(size=(16, 6)) * np.array([0.2, 0.5, 1.0, 2.0, 0.1, 3.0])
    z2 = z1 + generator.normal(scale=0.3, size=z1.shape)
    terms = vicreg_terms(torch.tensor(z1), torch.tensor(z2))

    assert terms["invariance"].item() == pytest.approx(np.mean((z1 - z2) ** 2))
    variance = sum(np.mean(np.maximum(0, 1 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4))) for z in (z1, z2)) / 2
    assert terms["variance"].item() == pytest.approx(variance)
    covariance = 0.0
    for z in (z1, z2):
        matrix = np.cov(z, rowvar=False)  # unbiased, (E, E)
        covariance += (np.sum(matrix**2) - np.sum(np.diag(matrix) ** 2)) / z.shape[1]
    assert terms["covariance"].item() == pytest.approx(covariance / 2)


def test_variance_hinge_is_zero_above_unit_std_and_covariance_zero_for_uncorrelated_dims():
    z = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0]])  # std > 1 per dim, zero covariance
    terms = vicreg_terms(z, z)
    assert terms["variance"].item() == 0 and terms["invariance"].item() == 0
    assert terms["covariance"].item() == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def segment(tmp_path):
    volume = random_volume((65, 160, 160), seed=21)
    path = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(path / "mask.png", rectangle_mask((160, 160), margin=8))
    return open_segment(path), volume


def test_two_views_differ_by_z_and_pixel_offsets_within_range(segment):
    segment, volume = segment
    dataset = TwoViewDataset([segment], depth=16, tile_size=48, samples_per_epoch=20, seed=1, augment=False)
    base_layers = depth_window(65, 16)
    seen_depth_offsets = set()
    for index in range(20):
        _, y, x = dataset.base_position(index)
        view1, view2 = dataset[index]
        for view, (dz, dy, dx) in zip((view1, view2), dataset.view_offsets(index)):
            assert dz in DEPTH_OFFSETS and dy in PIXEL_OFFSETS and dx in PIXEL_OFFSETS
            z0 = base_layers.start + dz
            expected = normalize_patch(volume[z0 : z0 + 16, y + dy : y + dy + 48, x + dx : x + dx + 48])
            assert view.shape == (1, 16, 48, 48) and torch.equal(view[0], torch.from_numpy(expected))
            seen_depth_offsets.add(dz)
    assert seen_depth_offsets == {0, 1, 2}


def test_augmented_views_are_deterministic_and_differ_from_each_other(segment):
    segment, _ = segment
    dataset = TwoViewDataset([segment], depth=16, tile_size=48, samples_per_epoch=4, seed=2)
    first, again = dataset[3], TwoViewDataset([segment], depth=16, tile_size=48, samples_per_epoch=4, seed=2)[3]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])


def test_vicreg_forward_backward_and_logged_terms():
    torch.manual_seed(0)
    model = VICReg(build_encoder("resnet18_3d_tiny"), [64, 64])
    views = torch.rand(4, 1, 16, 32, 32), torch.rand(4, 1, 16, 32, 32)
    loss, details = model(*views)
    loss.backward()
    assert torch.isfinite(loss) and {"invariance", "variance", "covariance", "embedding_std"} <= set(details)
    expected = 25 * details["invariance"] + 25 * details["variance"] + details["covariance"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.encoder.conv1.weight.grad is not None and model.projector[0].weight.grad is not None


def hara_checkpoint(classes: int, module_prefix: bool, layers=(2, 2, 2, 2)) -> tuple[dict, ResNet3d]:
    """A checkpoint with the exact key layout of Hara's 3D-ResNets-PyTorch releases (3-channel conv1, fc)."""
    torch.manual_seed(classes)
    kinetics_model = ResNet3d(BasicBlock3d, layers, in_channels=3, width=0.125, num_classes=classes)
    prefix = "module." if module_prefix else ""
    state = {prefix + key: value for key, value in kinetics_model.state_dict().items()}
    return {"epoch": 200, "arch": "resnet-18", "state_dict": state, "optimizer": {}}, kinetics_model


@pytest.mark.parametrize("classes", [700, 1039])
@pytest.mark.parametrize("module_prefix", [False, True])
def test_kinetics_checkpoint_loads_strictly_except_fc(tmp_path, classes, module_prefix):
    checkpoint, kinetics_model = hara_checkpoint(classes, module_prefix)
    assert any(key.startswith(f"{'module.' if module_prefix else ''}fc.") for key in checkpoint["state_dict"])
    torch.save(checkpoint, tmp_path / "r3d18_K_200ep.pth")
    encoder = build_encoder("resnet18_3d_tiny")
    description = load_encoder_weights(encoder, tmp_path / "r3d18_K_200ep.pth")
    assert description.startswith("Kinetics (resnet-18)")
    torch.testing.assert_close(encoder.conv1.weight, kinetics_model.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(encoder.layer4[1].conv2.weight, kinetics_model.layer4[1].conv2.weight)
    torch.testing.assert_close(encoder.layer2[0].downsample[1].running_var, kinetics_model.layer2[0].downsample[1].running_var)


def test_kinetics_checkpoint_of_another_depth_is_refused(tmp_path):
    checkpoint, _ = hara_checkpoint(700, False, layers=(3, 4, 6, 3))  # a ResNet-34 layout
    torch.save(checkpoint, tmp_path / "r3d34.pth")
    with pytest.raises(CheckpointError, match=r"r3d34.pth \(Kinetics \(resnet-18\)\) does not fit this encoder: unexpected"):
        load_encoder_weights(build_encoder("resnet18_3d_tiny"), tmp_path / "r3d34.pth")


def test_pretraining_checkpoints_of_both_methods_give_their_encoder(tmp_path):
    encoder = build_encoder("resnet18_3d_tiny")
    vicreg = VICReg(build_encoder("resnet18_3d_tiny"), [32, 32])
    torch.save({"args": {"method": "vicreg", "model": "resnet18_3d_tiny"}, "epoch": 3, "model": vicreg.state_dict()},
               tmp_path / "full.pth")
    assert load_encoder_weights(encoder, tmp_path / "full.pth").startswith("vicreg pretraining (resnet18_3d_tiny, epoch 4)")
    torch.testing.assert_close(encoder.conv1.weight, vicreg.encoder.conv1.weight)
    torch.save({"optimizer": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="is not an encoder, pretraining, fine-tuning or Kinetics checkpoint"):
        load_encoder_weights(encoder, tmp_path / "other.pth")


def test_fine_tuning_checkpoint_gives_its_unet_encoder(tmp_path):
    from finetune.model import build_ink_unet

    torch.manual_seed(3)
    unet = build_ink_unet("resnet18_3d_tiny")
    # The layout finetune/train.py's save_checkpoint writes.
    torch.save({"config": {"MODEL": "resnet18_3d_tiny"}, "state": {"epoch": 7}, "model": unet.state_dict(), "commit": ""},
               tmp_path / "best.pth")
    encoder = build_encoder("resnet18_3d_tiny")
    assert load_encoder_weights(encoder, tmp_path / "best.pth").startswith("fine-tuning (resnet18_3d_tiny, epoch 7)")
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, unet.encoder.state_dict()[name])
