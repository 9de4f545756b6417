"""CKA: the properties that make it a similarity index, a direct reference, and the script end to end."""
import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluate.cka import cka
from pretrain.models import build_encoder
from tests.conftest import REPO_ROOT
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment


@pytest.fixture
def features():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=generator)
    y = x @ torch.randn(12, 7, generator=generator) + 0.5 * torch.randn(40, 7, generator=generator)
    return x, y


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_of_a_representation_with_itself_is_one(features, kernel):
    assert cka(features[0], features[0], kernel) == pytest.approx(1.0)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling(features, kernel):
    x, y = (array.double() for array in features)  # so the transform itself adds no float32 rounding
    orthogonal, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert cka(x @ orthogonal * 3.7, y, kernel) == pytest.approx(cka(x, y, kernel), rel=1e-9)


def test_linear_cka_equals_a_direct_reference(features):
    x, y = (array.double().numpy() for array in features)
    n = len(x)
    centring = np.eye(n) - np.ones((n, n)) / n

    def hsic(k, l):
        return np.trace(k @ centring @ l @ centring)

    k, l = x @ x.T, y @ y.T
    expected = hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))
    assert cka(*features) == pytest.approx(expected, rel=1e-10)
    # The linear form also equals the feature-space formula of Kornblith et al. (eq. 5).
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_space = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert cka(*features) == pytest.approx(feature_space, rel=1e-10)


def test_rbf_cka_equals_a_direct_reference(features):
    x, y = (array.double().numpy() for array in features)
    n = len(x)
    centring = np.eye(n) - np.ones((n, n)) / n

    def gram(z):
        distances = ((z[:, None] - z[None]) ** 2).sum(-1)
        sigma = 0.5 * np.sqrt(np.median(distances[distances > 0]))
        return np.exp(-distances / (2 * sigma**2))

    def hsic(k, l):
        return np.trace(k @ centring @ l @ centring)

    k, l = gram(x), gram(y)
    assert cka(*features, kernel="rbf") == pytest.approx(hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l)), rel=1e-8)


def test_unrelated_representations_score_low():
    generator = torch.Generator().manual_seed(3)
    assert cka(torch.randn(200, 5, generator=generator), torch.randn(200, 5, generator=generator)) < 0.2


def test_cka_script_writes_heatmaps_and_csv(tmp_path):
    volume = random_volume((65, 128, 128), seed=31)
    segment = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(segment / "mask.png", rectangle_mask((128, 128), margin=2))
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"encoder{seed}.pth")
        torch.save(build_encoder("resnet18_3d_tiny").state_dict(), paths[-1])
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "evaluate" / "cka.py"), "--pretrained_path", *map(str, paths), str(paths[0]),
         "random", "--labels", "a", "b", "a_again", "random", "--model", "resnet18_3d_tiny", "--segment_id", str(segment), "--depth", "16",
         "--tile_size", "32", "--tiles", "12", "--stages", "all", "--output", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("cka_*_stage*.png"))) == 8  # 2 kernels × 4 stages
    rows = list(csv.DictReader(open(tmp_path / "out" / "cka.csv")))
    assert len(rows) == 8 * 6  # 6 pairs per heatmap
    same = [float(row["cka"]) for row in rows if {row["a"], row["b"]} == {"a", "a_again"}]
    assert same == pytest.approx([1.0] * 8)
    # "random" is the seed-0 initialisation, which is what encoder0.pth holds.
    random_is_a = [float(row["cka"]) for row in rows if {row["a"], row["b"]} == {"a", "random"}]
    assert random_is_a == pytest.approx([1.0] * 8)


def test_checkpoints_scaled_differently_share_tiles_each_read_as_trained(tmp_path):
    """A VICReg encoder (standardised tiles) and a SparK one (range) are compared on the same tiles, each scaled as
    it was trained; encoders that cut tiles differently are one error."""
    import argparse

    from evaluate import encoder_input
    from pretrain import checkpoint
    from pretrain.data.patches import InputSettings

    state = build_encoder("resnet18_3d_tiny").state_dict()
    spark, vicreg, wide = tmp_path / "spark.pth", tmp_path / "vicreg.pth", tmp_path / "wide.pth"
    checkpoint.save(spark, "encoder", state, InputSettings(model="resnet18_3d_tiny", tile_size=64), method="spark")
    checkpoint.save(vicreg, "encoder", state, InputSettings(model="resnet18_3d_tiny", tile_size=64,
                                                            normalization="zscore"), method="vicreg")
    checkpoint.save(wide, "encoder", state, InputSettings(model="resnet18_3d_tiny", tile_size=96), method="spark")
    options = argparse.Namespace(**{field: None for field in encoder_input.OPTION_NAMES})
    settings = encoder_input.same_tiles_settings(["random", str(spark), str(vicreg)], options)
    assert [value.normalization for value in settings] == ["range", "range", "zscore"]
    assert {value.tile_size for value in settings} == {64}
    with pytest.raises(encoder_input.EvaluationError, match="cut tiles differently"):
        encoder_input.same_tiles_settings([str(spark), str(wide)], options)
