"""VICReg: loss terms against the paper's formulas, the two-view pipeline, the model, and Kinetics import."""
import numpy as np
import pytest
import torch

from pretrain.data.patches import InputSettings, depth_window, normalize_patch
from pretrain.data.segment import open_segment
from pretrain.data.views import DEPTH_OFFSETS, PIXEL_OFFSETS, TwoViewDataset
from pretrain.models import build_encoder
from pretrain.vicreg import VICReg, off_diagonal, vicreg_terms
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment


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
    dataset = TwoViewDataset([segment], InputSettings(depth=16, tile_size=48), samples_per_epoch=20, seed=1, augment=False)
    base_layers = depth_window(65, 16)
    seen_depth_offsets = set()
    for index in range(20):
        _, y, x = dataset.base_position(0, index)
        view1, view2 = dataset[0, index]
        for view, (dz, dy, dx) in zip((view1, view2), dataset.view_offsets(0, index)):
            assert dz in DEPTH_OFFSETS and dy in PIXEL_OFFSETS and dx in PIXEL_OFFSETS
            z0 = base_layers.start + dz
            expected = normalize_patch(volume[z0 : z0 + 16, y + dy : y + dy + 48, x + dx : x + dx + 48])
            assert view.shape == (1, 16, 48, 48) and torch.equal(view[0], torch.from_numpy(expected))
            seen_depth_offsets.add(dz)
    assert seen_depth_offsets == {0, 1, 2}


def test_augmented_views_are_deterministic_and_differ_from_each_other(segment):
    segment, _ = segment
    settings = InputSettings(depth=16, tile_size=48)
    dataset = TwoViewDataset([segment], settings, samples_per_epoch=4, seed=2)
    first, again = dataset[0, 3], TwoViewDataset([segment], settings, samples_per_epoch=4, seed=2)[0, 3]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])
    later = dataset[1, 3]  # the same index in another epoch: another tile, other offsets, other augmentations
    assert not torch.equal(first[0], later[0]) and not torch.equal(first[1], later[1])


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
