"""Every pretraining method's encoder reads tiles downstream exactly as it trained: for one crop, the stage-4
embedding on the method's training path equals the one computed through fine-tuning's tile reader, with the input
settings the encoder checkpoint records."""
import numpy as np
import pytest
import torch

import pretrain.main
from finetune.data import tile_dataset
from pretrain import checkpoint
from pretrain.data.patches import RandomPatchDataset, normalize_patch
from pretrain.data.segment import open_segment
from pretrain.data.views import TwoViewDataset
from pretrain.models import build_encoder
from pretrain.utils import arg_util
from pretrain.vicreg import standardize
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment


@pytest.fixture(scope="module")
def segment_path(tmp_path_factory):
    volume = random_volume((40, 150, 150), seed=5)
    path = write_zarr_segment(tmp_path_factory.mktemp("inputs") / "s.zarr", volume)
    write_png(path / "mask.png", rectangle_mask((150, 150), margin=6))
    return path


def training_path_embedding(method: str, model, args, segment) -> tuple[torch.Tensor, tuple[int, int]]:
    """The pooled stage-4 embedding (1, C) of the first crop of epoch 0, as the method's training step computes
    it (eval-mode BatchNorm, no mask, no augmentation), and the crop's (y, x)."""
    if method == "vicreg":
        dataset = TwoViewDataset([segment], args.reader_settings(), samples_per_epoch=1, augment=False)
        dataset.view_offsets = lambda epoch, index: ((0, 0, 0), (0, 0, 0))  # the view is the base tile itself
        _, y, x = dataset.base_position(0, 0)
        view_b1dhw = dataset[0, 0][0].unsqueeze(0)
        return model.embed(view_b1dhw), (y, x)
    dataset = RandomPatchDataset([segment], args.reader_settings(), samples_per_epoch=1)
    _, y, x = dataset.sample_position(0, 0)
    crop_b1dhw = dataset[0, 0].unsqueeze(0)
    all_visible_b1dhw = torch.ones((1, 1, *model.grid), dtype=torch.bool)
    stage4_bcdhw = model.sparse_encoder(crop_b1dhw, all_visible_b1dhw)[-1]
    return stage4_bcdhw.mean(dim=(2, 3, 4)), (y, x)


@pytest.mark.parametrize("method", ["spark", "vicreg"])
def test_finetuning_reader_gives_the_training_embedding(method, segment_path, tmp_path):
    args = arg_util.parse_args(["--method", method, "--data_path", str(segment_path), "--model", "resnet18_3d_tiny",
                                "--depth", "16", "--tile_size", "64", "--bs", "2", "--exp_dir", str(tmp_path)])
    torch.manual_seed(0)
    model = pretrain.main.build_model(args).eval()
    pretrain.main.save_encoders(args, model, epoch=0)
    segment = open_segment(str(segment_path))
    with torch.no_grad():
        trained_bc, (y, x) = training_path_embedding(method, model, args, segment)

        weights = checkpoint.encoder_weights(args.encoder_checkpoint_path)
        encoder = build_encoder(weights.settings.model).eval()
        checkpoint.load_encoder(encoder, weights, weights.settings.model, "--model")
        tile = tile_dataset(segment, np.array([[y, x]]), weights.settings)[0]["volume"].unsqueeze(0)
        read_bc = encoder(tile, hierarchical=True)[-1].mean(dim=(2, 3, 4))

    assert weights.settings.normalization == ("zscore" if method == "vicreg" else "range")
    assert trained_bc.abs().max() > 0
    torch.testing.assert_close(read_bc, trained_bc, rtol=1e-4, atol=1e-5)


def test_vicreg_standardize_is_the_readers_zscore():
    volume_dhw = random_volume((8, 20, 20), seed=3)
    expected = normalize_patch(volume_dhw, "zscore")
    ranged = torch.from_numpy(normalize_patch(volume_dhw, "range"))[None, None]
    torch.testing.assert_close(standardize(ranged)[0, 0], torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


def test_older_vicreg_files_read_as_zscore(tmp_path):
    """Files written before VICReg recorded its standardisation say "range"; their encoders saw zscore."""
    args = arg_util.parse_args(["--method", "vicreg", "--model", "resnet18_3d_tiny", "--bs", "2"])
    older = args.reader_settings()  # what such a file recorded
    path = tmp_path / "old_vicreg_encoder.pth"
    checkpoint.save(path, "encoder", build_encoder("resnet18_3d_tiny").state_dict(), older, method="vicreg")
    assert checkpoint.encoder_weights(path).settings.normalization == "zscore"
    spark_path = tmp_path / "spark_encoder.pth"
    checkpoint.save(spark_path, "encoder", build_encoder("resnet18_3d_tiny").state_dict(), older, method="spark")
    assert checkpoint.encoder_weights(spark_path).settings.normalization == "range"


def test_vicreg_refuses_clip_normalisation():
    with pytest.raises(arg_util.ArgumentError, match="clip"):
        arg_util.parse_args(["--method", "vicreg", "--normalization", "clip", "--bs", "4"])
