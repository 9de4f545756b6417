"""open_segment on every local source, label conversion, and the bad inputs a user can give it."""
import warnings

import numpy as np
import pytest
import tifffile

from pretrain.data.segment import SegmentError, open_segment, read_label_image
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("group", [True, False])
def test_local_zarr_group_or_bare_array(tmp_path, zarr_format, group):
    volume = random_volume((65, 90, 70), seed=zarr_format)
    path = write_zarr_segment(tmp_path / "20230101000000.zarr", volume, zarr_format=zarr_format, group=group)
    write_png(path / "mask.png", rectangle_mask(volume.shape[1:]))
    segment = open_segment(str(path))
    assert segment.source == "zarr" and segment.shape == volume.shape and segment.dtype == np.uint8
    assert np.array_equal(segment.volume[20:45, 5:77, 3:60], volume[20:45, 5:77, 3:60])
    assert np.array_equal(segment.volume[32], volume[32])  # an int index drops the axis, as numpy does
    assert segment.mask.dtype == bool and segment.mask.sum() == (90 - 20) * (70 - 20)
    assert segment.inklabels is None


def test_local_zarr_labels_beside_with_segment_id_names(tmp_path):
    volume = random_volume((65, 60, 50))
    path = write_zarr_segment(tmp_path / "20230202000000.zarr", volume)
    write_png(tmp_path / "20230202000000_mask.png", rectangle_mask(volume.shape[1:], margin=5))
    labels = np.zeros(volume.shape[1:], np.uint8)
    labels[10:20, 10:30] = 255
    write_png(tmp_path / "20230202000000_inklabels.png", labels)
    segment = open_segment(path)
    assert segment.inklabels.dtype == np.uint8 and set(np.unique(segment.inklabels)) == {0, 1}
    assert segment.inklabels.sum() == 10 * 20


def test_uint16_volume(tmp_path):
    volume = random_volume((65, 40, 40), dtype=np.uint16)
    path = write_zarr_segment(tmp_path / "s.zarr", volume, chunks=(65, 16, 16))
    write_png(path / "mask.png", rectangle_mask(volume.shape[1:], margin=2))
    segment = open_segment(path)
    assert segment.dtype == np.uint16 and np.array_equal(segment.volume[:, 3:33, 1:39], volume[:, 3:33, 1:39])


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_layer_folder_tiff(tmp_path, compression):
    volume = random_volume((65, 300, 280), seed=3)
    layers = tmp_path / "fragment" / "layers"
    layers.mkdir(parents=True)
    for index, layer in enumerate(volume):
        tifffile.imwrite(layers / f"{index:02d}.tif", layer, compression=compression, rowsperstrip=16)
    write_png(tmp_path / "fragment" / "mask.png", rectangle_mask(volume.shape[1:]))
    segment = open_segment(tmp_path / "fragment")
    assert segment.source == "layers" and segment.shape == volume.shape
    assert np.array_equal(segment.volume[24:40, 100:290, 7:270], volume[24:40, 100:290, 7:270])


def test_layer_folder_png_kaggle_names(tmp_path):
    import cv2

    volume = random_volume((65, 50, 40), seed=4)
    layers = tmp_path / "frag" / "surface_volume"
    layers.mkdir(parents=True)
    for index, layer in enumerate(volume):
        cv2.imwrite(str(layers / f"{index:02d}.png"), layer)
    write_png(tmp_path / "frag" / "frag_mask.png", rectangle_mask(volume.shape[1:], margin=3))
    write_png(tmp_path / "frag" / "inklabels.png", np.full(volume.shape[1:], 255, np.uint8))
    segment = open_segment(tmp_path / "frag")
    assert np.array_equal(segment.volume[:, 10:30, 5:35], volume[:, 10:30, 5:35])
    assert segment.inklabels.all()


def test_list_of_specs(tmp_path):
    specs = []
    for index in range(2):
        volume = random_volume((65, 40, 40), seed=index)
        path = write_zarr_segment(tmp_path / f"s{index}.zarr", volume)
        write_png(path / "mask.png", rectangle_mask(volume.shape[1:], margin=2))
        specs.append(str(path))
    segments = open_segment(specs)
    assert [segment.name for segment in segments] == ["s0", "s1"]


def test_missing_mask_is_derived_with_a_warning(tmp_path):
    volume = random_volume((65, 40, 40))
    volume[:, :, :10] = 0
    path = write_zarr_segment(tmp_path / "s.zarr", volume)
    with pytest.warns(UserWarning, match="no mask found"):
        segment = open_segment(path)
    assert not segment.mask[:, :10].any() and segment.mask[:, 10:].mean() > 0.9


@pytest.mark.parametrize(
    "image, expected",
    [
        (np.array([[0, 255], [255, 0]], np.uint8), [[0, 1], [1, 0]]),
        (np.array([[0, 1], [1, 0]], np.uint8), [[0, 1], [1, 0]]),
        (np.dstack([np.array([[0, 255], [0, 0]], np.uint8)] * 3), [[0, 1], [0, 0]]),  # RGB
        (np.dstack([np.array([[0, 0], [0, 200]], np.uint8)] * 3 + [np.full((2, 2), 255, np.uint8)]), [[0, 0], [0, 1]]),
        (np.array([[0, 65535], [0, 0]], np.uint16), [[0, 1], [0, 0]]),
    ],
    ids=["0-255", "0-1", "rgb", "rgba", "uint16"],
)
def test_label_conversion(image, expected):
    import cv2

    ok, encoded = cv2.imencode(".png", image)
    labels = read_label_image(encoded.tobytes(), "labels", (2, 2))
    assert labels.dtype == np.uint8 and labels.tolist() == expected


# ---------------------------------------------------------------- bad inputs


def test_label_of_wrong_shape_names_both_shapes(tmp_path):
    volume = random_volume((65, 40, 30))
    path = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(path / "mask.png", rectangle_mask((30, 40), margin=2))  # transposed: no padding explains it
    with pytest.raises(SegmentError, match=r"\(30, 40\).*\(40, 30\)"):
        open_segment(path)


def test_empty_mask(tmp_path):
    volume = random_volume((65, 40, 30))
    path = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(path / "mask.png", np.zeros((40, 30), np.uint8))
    with pytest.raises(SegmentError, match="mask .* is empty"):
        open_segment(path)


def test_malformed_zarr(tmp_path):
    path = tmp_path / "broken.zarr"
    path.mkdir()
    (path / "zarr.json").write_text("{ not json")
    with pytest.raises(SegmentError, match="broken.zarr is not a readable zarr"):
        open_segment(path)


def test_group_without_level_zero(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "g.zarr", mode="w").create_array("1", shape=(65, 8, 8), dtype="uint8")
    with pytest.raises(SegmentError, match="no level '0'"):
        open_segment(tmp_path / "g.zarr")


def test_unreadable_tiff(tmp_path):
    layers = tmp_path / "frag" / "layers"
    layers.mkdir(parents=True)
    tifffile.imwrite(layers / "00.tif", np.zeros((20, 20), np.uint8))
    (layers / "01.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(SegmentError, match="cannot read layer image .*01.tif"):
        open_segment(tmp_path / "frag")


def test_layers_of_different_sizes(tmp_path):
    layers = tmp_path / "frag" / "layers"
    layers.mkdir(parents=True)
    tifffile.imwrite(layers / "00.tif", np.zeros((20, 20), np.uint8))
    tifffile.imwrite(layers / "01.tif", np.zeros((20, 21), np.uint8))
    with pytest.raises(SegmentError, match="01.tif is"):
        open_segment(tmp_path / "frag")


def test_unknown_spec_and_bad_demo_seed():
    with pytest.raises(SegmentError, match="neither an existing path"):
        open_segment("no/such/segment")
    with pytest.raises(SegmentError, match="seed"):
        open_segment("demo:abc")


def test_unknown_scroll():
    with pytest.raises(SegmentError, match="scroll '99' is unknown"):
        open_segment("20230827161847", scroll="99", data_url="http://127.0.0.1:9")


def test_index_errors(tmp_path):
    volume = random_volume((65, 20, 20))
    path = write_zarr_segment(tmp_path / "s.zarr", volume)
    write_png(path / "mask.png", rectangle_mask((20, 20), margin=2))
    segment = open_segment(path)
    with pytest.raises(IndexError):
        segment.volume[70]
    with pytest.raises(IndexError):
        segment.volume[::2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert segment.volume[60:100].shape == (5, 20, 20)  # slices clip, as numpy's do
