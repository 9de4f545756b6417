"""Settings overrides, the train / validation split (no training tile touches the held-out band), label
files, and augmentation that moves the layer stack and the label together."""
import pathlib

import numpy as np
import pytest

from finetune import data
from finetune.config import ConfigError, apply_overrides, settings_in
from pretrain.data.patches import InputSettings
from pretrain.data.segment import SegmentError, open_segment
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

DEFAULTS = {"exp_name": "demo", "segment_id": "demo", "NUM_EPOCHS": 12, "LR": 1e-3, "freeze_encoder": False,
            "pretrained_path": None}


def test_overrides_are_typed_by_their_defaults():
    config = apply_overrides(DEFAULTS, ["--NUM_EPOCHS", "2", "--LR=1", "--freeze_encoder", "True",
                                        "--pretrained_path", "a.pth", "--segment_id", "20230827161847"])
    assert config.NUM_EPOCHS == 2 and config.LR == 1.0 and isinstance(config.LR, float)
    assert config.freeze_encoder is True and config.pretrained_path == "a.pth"
    assert config.segment_id == "20230827161847"  # digits stay text for a text setting
    assert apply_overrides(DEFAULTS, ["--pretrained_path", "None"]).pretrained_path is None
    assert apply_overrides(DEFAULTS, []).as_dict() == DEFAULTS


@pytest.mark.parametrize("argv, message", [
    (["--NUM_EPOCHS", "many"], "--NUM_EPOCHS expects int"),
    (["--NUM_EPOCHS", "2.5"], "--NUM_EPOCHS expects int"),
    (["--LR", "fast"], "--LR expects float"),
    (["--freeze_encoder", "maybe"], "--freeze_encoder expects True or False"),
    (["--EPOCHS", "2"], "unknown setting --EPOCHS"),
    (["--NUM_EPOCHS"], "--NUM_EPOCHS needs a value"),
    (["NUM_EPOCHS=2"], "unexpected argument"),
])
def test_bad_overrides_name_the_setting(argv, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(DEFAULTS, argv)


def test_settings_are_the_plain_public_names():
    namespace = {"__name__": "x", "pathlib": pathlib, "BATCH_SIZE": 8, "mask_path": None, "helper": print}
    assert settings_in(namespace) == {"BATCH_SIZE": 8, "mask_path": None}


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """A 16 × 200 × 296 segment with ink blobs all over a rectangular mask."""
    folder = tmp_path_factory.mktemp("split")
    path = write_zarr_segment(folder / "split.zarr", random_volume((16, 200, 296), seed=3), chunks=(16, 64, 64))
    write_png(path / "mask.png", rectangle_mask((200, 296), margin=8))
    labels = np.zeros((200, 296), np.uint8)
    for y in range(20, 180, 40):
        for x in range(15, 280, 35):
            labels[y:y + 14, x:x + 9] = 255
    write_png(path / "inklabels.png", labels)
    write_png(path / "wrong_size.png", np.zeros((100, 300), np.uint8))  # shorter and wider: not padding
    return open_segment(str(path))


@pytest.mark.parametrize("stride", [16, 24, 40])
def test_no_training_tile_touches_the_validation_band(segment, stride):
    box = data.choose_validation_box(segment.mask, segment.inklabels, 32, 0.2)
    band_labels = segment.inklabels[box.y0:box.y1, box.x0:box.x1][segment.mask[box.y0:box.y1, box.x0:box.x1]]
    assert 0 < band_labels.mean() < 1  # the band holds ink and no-ink
    assert box.x1 - box.x0 == 64 and box.x0 % 32 == 0  # across the longer side, whole tiles
    origins = data.training_origins(segment, 32, stride, box, 0.0)
    assert len(origins) > 0
    training_pixels = data.tiles_region(origins, 32, segment.shape[1:])
    assert not (training_pixels & box.region_yx(segment.shape[1:])).any()
    validation = data.validation_origins(segment, 32, box)
    validation_pixels = data.tiles_region(validation, 32, segment.shape[1:])
    assert (validation_pixels <= box.region_yx(segment.shape[1:])).all()  # inside the band
    assert len({(int(y), int(x)) for y, x in validation}) == len(validation)
    assert validation_pixels[segment.mask & box.region_yx(segment.shape[1:])].mean() > 0.9


def test_a_tall_segment_is_cut_across_its_height(segment):
    box = data.choose_validation_box(segment.mask.T, segment.inklabels.T, 32, 0.2)
    assert (box.x0, box.x1) == (0, 200) and box.y1 - box.y0 == 64


def test_labels_without_ink_cannot_be_validated(segment):
    with pytest.raises(SegmentError, match="both ink and no-ink"):
        data.choose_validation_box(segment.mask, np.zeros_like(segment.inklabels), 32, 0.2)


def test_label_files_are_found_beside_the_segment_and_checked(segment):
    path = data.resolve_label_path("inklabels.png", segment, "inklabel_path")
    assert np.array_equal(data.read_label_file(path, segment, "inklabel_path"), segment.inklabels)
    wrong = data.resolve_label_path("wrong_size.png", segment, "inklabel_path")
    with pytest.raises(SegmentError, match=r"inklabel_path .*wrong_size.png has shape \(Y, X\) = \(100, 300\).*\(200, 296\)"):
        data.read_label_file(wrong, segment, "inklabel_path")
    with pytest.raises(SegmentError, match="inklabel_path nothing.png does not exist"):
        data.resolve_label_path("nothing.png", segment, "inklabel_path")


def test_tile_dataset_reads_exactly_the_given_tiles_with_the_depth_margin(segment):
    origins = np.array([[8, 8], [40, 100]])
    dataset = data.tile_dataset(segment, origins, InputSettings(depth=8, tile_size=32), margin=2)
    item = dataset[1]
    assert len(dataset) == 2 and item["volume"].shape == (1, 12, 32, 32)
    expected = segment.volume[2:14, 40:72, 100:132] / 255.0
    assert np.allclose(item["volume"][0].numpy(), expected)
    assert np.array_equal(item["label"].numpy(), segment.inklabels[40:72, 100:132])


def test_augmentation_moves_stack_and_label_together():
    rng = np.random.default_rng(0)
    label_hw = np.zeros((64, 64), np.float32)
    label_hw[10:30, 20:50] = 1.0
    label_hw[40:60, 5:15] = 1.0
    volume_dhw = np.repeat(label_hw[None], 12, axis=0)  # every layer shows the label
    augmentation = data.TileAugmentation(depth=8, margin=2, enabled=True, seed=0)
    for worker in range(20):
        augmentation.reseed(worker)
        out_volume, out_label = augmentation(volume_dhw + 0.01 * rng.standard_normal(volume_dhw.shape).astype(np.float32),
                                             label_hw)
        assert out_volume.shape == (8, 64, 64) and out_label.shape == (64, 64)
        # Brightness, noise, blur and dropout blur the picture a little; the geometry must agree.
        image = np.median(out_volume, axis=0) > 0.5 * np.median(out_volume, axis=0).max()
        overlap = (image & (out_label > 0.5)).sum() / max(1, (image | (out_label > 0.5)).sum())
        assert overlap > 0.6, (worker, overlap)


def test_augmentation_is_seeded_per_worker_and_epoch():
    volume_dhw = np.random.default_rng(1).random((12, 32, 32), dtype=np.float32)
    label_hw = (volume_dhw[6] > 0.5).astype(np.float32)
    augmentation = data.TileAugmentation(depth=8, margin=2, enabled=True, seed=0)

    def draw(epoch, worker):
        augmentation.set_epoch(epoch, rank=0)
        augmentation.reseed(worker)
        return np.concatenate([augmentation(volume_dhw, label_hw)[0].ravel() for _ in range(4)])

    assert np.array_equal(draw(0, 1), draw(0, 1))
    assert not np.array_equal(draw(0, 1), draw(0, 2))
    assert not np.array_equal(draw(0, 1), draw(1, 1))


def test_without_augmentation_the_centre_layers_are_kept():
    volume_dhw = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((12, 16, 16), np.float32)
    label_hw = np.ones((16, 16), np.float32)
    out_volume, out_label = data.TileAugmentation(depth=8, margin=2, enabled=False, seed=0)(volume_dhw, label_hw)
    assert np.array_equal(out_volume[:, 0, 0], np.arange(2, 10)) and out_label is label_hw


def test_depth_margin_shrinks_at_the_volume_ends():
    settings = InputSettings(depth=16)
    assert data.depth_margin(65, settings) == data.MAX_Z_SHIFT
    assert data.depth_margin(18, settings) == 1
    assert data.depth_margin(16, settings) == 0



def test_one_segment_epochs_are_distributed_samplers_over_the_repeated_tiles():
    """With one segment the mix sampler deals exactly what DistributedSampler dealt before there were several."""
    import torch

    tiles, min_tiles = 7, 20  # repeated 3 times: 21 draws
    for world_size in (1, 2):
        for rank in range(world_size):
            mixed = data.SegmentMixSampler([tiles], [1.0], min_tiles, seed=3, rank=rank, world_size=world_size)
            reference = torch.utils.data.DistributedSampler(range(3 * tiles), num_replicas=world_size, rank=rank,
                                                            shuffle=True, seed=3, drop_last=True)
            for epoch in (0, 4):
                mixed.set_epoch(epoch)
                reference.set_epoch(epoch)
                assert list(mixed) == [index % tiles for index in reference]
                assert len(mixed) == len(reference)


def drawn_per_segment(sampler, tile_counts) -> list[int]:
    bounds = np.cumsum([0, *tile_counts])
    return np.histogram(list(sampler), bins=bounds)[0].tolist()


def test_tiles_are_drawn_in_proportion_to_labelled_area_or_equally():
    tile_counts = [30, 10]  # segment 0 has three times the tiles, but only as much labelled area
    area = data.SegmentMixSampler(tile_counts, data.segment_shares([500, 500], equal=False), 40, 0, 0, 1)
    assert drawn_per_segment(area, tile_counts) == [20, 20]
    area = data.SegmentMixSampler(tile_counts, data.segment_shares([900, 100], equal=False), 40, 0, 0, 1)
    assert drawn_per_segment(area, tile_counts) == [36, 4]
    equal = data.SegmentMixSampler(tile_counts, data.segment_shares([900, 100], equal=True), 100, 0, 0, 1)
    assert len(list(equal)) == 120 and drawn_per_segment(equal, tile_counts) == [60, 60]
    # Segment 1's 10 tiles each drawn 6 times; segment 0's 30 twice: every tile, as evenly as the share allows.
    counts = np.bincount(list(equal), minlength=40)
    assert set(counts[:30]) == {2} and set(counts[30:]) == {6}
    # A share smaller than a segment's tiles draws another subset each epoch, the same one on a rerun.
    first, again = (data.SegmentMixSampler(tile_counts, [0.9, 0.1], 40, 0, 0, 1) for _ in range(2))
    again.set_epoch(1)
    assert sorted(first) != sorted(again)
    first.set_epoch(1)
    assert list(first) == list(again)
    # Two processes get disjoint halves of the same epoch.
    halves = [list(data.SegmentMixSampler(tile_counts, [0.5, 0.5], 40, 0, rank, 2)) for rank in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 20
    assert sorted(halves[0] + halves[1]) == sorted(data.SegmentMixSampler(tile_counts, [0.5, 0.5], 40, 0, 0, 1))
