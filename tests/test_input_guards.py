"""Inputs that once got through or blew up: image bombs (a small PNG declaring a huge image), layer images above
PIL's bomb limit, and voxel dtypes the normalisation does not know."""
import dataclasses
import io
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import torch

from pretrain import checkpoint
from pretrain.data import images
from pretrain.data.patches import GridTileDataset, InputSettings, RandomPatchDataset, normalize_patch
from pretrain.data.segment import SegmentError, open_segment, read_label_image
from pretrain.data.volume import LayerStack
from tests.conftest import REPO_ROOT
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

SHAPE = (16, 64, 64)


def blank_png(path, height: int, width: int, bit_depth: int = 1, rows: int | None = None) -> None:
    """A valid all-zero grey PNG of any size, written without ever holding its pixels: deflate packs a blank
    image some 8000:1, which is what makes a small file declare a huge one. With `rows`, only that many rows
    of pixels follow the header (a truncated file, quick to write, for what only reads headers)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width * bit_depth + 7) // 8)  # filter byte 0, then the row's zero pixels
    compressor = zlib.compressobj(9)
    rows_per_piece = max(1, 2**22 // len(row))
    compressed = [compressor.compress(row * min(rows_per_piece, height - start))
                  for start in range(0, height if rows is None else rows, rows_per_piece)]
    compressed.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(compressed))
                     + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding an image above 10 Mpx (cv2's or PIL's decoder) fails the test: a bomb must be refused from its
    header. Smaller images (a legitimate mask beside it) decode as usual."""
    imdecode, imread, load = cv2.imdecode, cv2.imread, PIL.ImageFile.ImageFile.load

    def unless_huge(shape_yx, decode):
        if shape_yx[0] * shape_yx[1] > 10**7:
            raise AssertionError(f"an image of {shape_yx} pixels was decoded")
        return decode()

    monkeypatch.setattr(cv2, "imdecode", lambda buffer, flags: unless_huge(
        images.image_header(bytes(buffer)).shape_yx, lambda: imdecode(buffer, flags)))
    monkeypatch.setattr(cv2, "imread", lambda path, flags: unless_huge(
        images.image_header(path).shape_yx, lambda: imread(path, flags)))
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: unless_huge(self.size[::-1], lambda: load(self)))


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A 60000 × 60000 one-bit PNG of some 440 KB: a raw cv2.error once, and 3.6 GB if decoded."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    blank_png(path, 60000, 60000)
    assert path.stat().st_size < 2**20
    return path


@pytest.mark.parametrize("kind", ["mask", "inklabels", "negatives"])
def test_a_small_label_png_declaring_a_huge_image_is_refused_from_its_header(tmp_path, bomb_png, no_decoding, kind):
    segment = write_zarr_segment(tmp_path / "segment.zarr", random_volume(SHAPE), chunks=(16, 32, 32))
    if kind != "mask":
        (segment / "mask.png").write_bytes(cv2.imencode(".png", rectangle_mask(SHAPE[1:]))[1].tobytes())
    (segment / f"{kind}.png").write_bytes(bomb_png.read_bytes())
    with pytest.raises(SegmentError) as raised:
        open_segment(segment)
    description = "mask" if kind == "mask" else "ink labels" if kind == "inklabels" else "negatives"
    assert str(raised.value) == (f"{description} {segment / f'{kind}.png'} has shape (Y, X) = (60000, 60000), but the "
                                 "volume's (Y, X) is (64, 64)")


def test_pretraining_on_a_label_bomb_is_one_error_line(tmp_path, bomb_png):
    segment = write_zarr_segment(tmp_path / "segment.zarr", random_volume((65, 128, 128)), chunks=(65, 64, 64))
    (segment / "mask.png").write_bytes(bomb_png.read_bytes())
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), "--data_path", str(segment),
                             "--exp_dir", str(tmp_path / "run"), "--model", "resnet18_3d_tiny", "--tile_size", "64"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"error: mask {segment / 'mask.png'} has shape (Y, X) = (60000, 60000), but the volume's (Y, X) is (128, 128)"]
    assert not (tmp_path / "run").exists()


def test_a_layer_image_above_pils_bomb_limit_is_read(tmp_path, monkeypatch):
    # 13500² = 182 Mpx, above the 179 Mpx at which PIL.Image.open raises DecompressionBombError.
    blank_png(tmp_path / "00.png", 13500, 13500, bit_depth=8)
    limit = PIL.Image.MAX_IMAGE_PIXELS
    assert 13500 * 13500 > 2 * limit
    stack = LayerStack([tmp_path / "00.png"])
    assert stack.shape == (1, 13500, 13500) and stack.dtype == np.uint8
    assert not stack[slice(0, 1), slice(13000, 13004), slice(0, 4)].any()
    assert PIL.Image.MAX_IMAGE_PIXELS == limit  # the guard is back for every other reader
    with pytest.raises(PIL.Image.DecompressionBombError):
        PIL.Image.open(tmp_path / "00.png")


def test_a_layer_declaring_another_size_is_refused_before_any_layer_is_decoded(tmp_path, no_decoding):
    write_png(tmp_path / "00.png", np.zeros((64, 64), np.uint8))
    blank_png(tmp_path / "01.png", 60000, 60000, bit_depth=8, rows=1)
    with pytest.raises(ValueError, match=r"01.png is \(60000, 60000\) .* is \(64, 64\) .*all layers must match"):
        LayerStack([tmp_path / "00.png", tmp_path / "01.png"])


def label_images() -> dict[str, bytes]:
    """Every kind of label PNG a label tool writes: one bit, grey, 16-bit, RGB, RGBA, grey + alpha, palette."""
    ink = np.zeros((40, 50), bool)
    ink[10:30, 5:20] = True
    encoded = {"grey": cv2.imencode(".png", ink.astype(np.uint8) * 255)[1].tobytes(),
               "16-bit": cv2.imencode(".png", ink.astype(np.uint16) * 65535)[1].tobytes(),
               "RGB": cv2.imencode(".png", np.stack([ink * 0, ink * 200, ink * 0], -1).astype(np.uint8))[1].tobytes(),
               "RGBA": cv2.imencode(".png", np.stack([ink * 255] * 3 + [np.full(ink.shape, 255)], -1)
                                    .astype(np.uint8))[1].tobytes()}
    for mode in ("1", "LA", "P"):
        image = PIL.Image.fromarray(ink.astype(np.uint8) * 255).convert(mode)
        file = io.BytesIO()
        image.save(file, "PNG")
        encoded[mode] = file.getvalue()
    return encoded


def test_label_images_beyond_cv2s_limit_decode_through_pil_alike(monkeypatch):
    expected = np.zeros((40, 50), np.uint8)
    expected[10:30, 5:20] = 1
    for name, data in label_images().items():
        by_cv2 = read_label_image(data, name, (40, 50))
        monkeypatch.setattr(images, "CV2_MAX_PIXELS", 0)  # every image "above" cv2's limit: decoded by PIL
        by_pil = read_label_image(data, name, (40, 50))
        monkeypatch.undo()
        assert np.array_equal(by_cv2, expected), name
        assert np.array_equal(by_pil, expected), name


def test_a_16_bit_layer_beyond_cv2s_limit_decodes_through_pil_alike(tmp_path, monkeypatch):
    layer = random_volume((1, 30, 20), dtype=np.uint16)[0]
    write_png(tmp_path / "00.png", layer)
    assert np.array_equal(LayerStack([tmp_path / "00.png"])[slice(0, 1), slice(0, 30), slice(0, 20)][0], layer)
    monkeypatch.setattr(images, "CV2_MAX_PIXELS", 0)
    assert np.array_equal(LayerStack([tmp_path / "00.png"])[slice(0, 1), slice(0, 30), slice(0, 20)][0], layer)


def test_a_truncated_or_foreign_label_file_is_one_line(tmp_path):
    data = cv2.imencode(".png", random_volume((1, 40, 50))[0])[1].tobytes()
    with pytest.raises(SegmentError, match=r"^labels.png cannot be decoded \(a damaged or truncated file\)$"):
        read_label_image(data[: len(data) // 2], "labels.png", (40, 50))
    with pytest.raises(SegmentError, match=r"^labels.png is not a readable image$"):
        read_label_image(b"<html>not found</html>", "labels.png", (40, 50))


# ---------------------------------------------------------------- voxel dtypes


def dtype_segment(folder, dtype, volume_zyx=None):
    """A small zarr segment of `dtype` voxels (the same random values, 0 … 255 × 257, in every dtype that holds them)."""
    if volume_zyx is None:
        volume_zyx = random_volume(SHAPE, seed=3).astype(np.uint16) * 257
    path = write_zarr_segment(folder / f"{np.dtype(dtype).name}.zarr", volume_zyx.astype(dtype), chunks=(16, 32, 32))
    write_png(path / "mask.png", rectangle_mask(SHAPE[1:], margin=4))
    return path


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint32", "int64"])
def test_a_segment_of_an_unsupported_dtype_is_refused_when_opened(tmp_path, dtype):
    path = dtype_segment(tmp_path, dtype, random_volume(SHAPE, seed=3) // 2)
    with pytest.raises(SegmentError) as raised:
        open_segment(path)
    assert str(raised.value) == (f"segment {dtype} ({path}) holds {dtype} voxels: only uint8 and uint16 are read, and "
                                 "float with its range stated (float_range); convert it to uint8 or uint16")
    with pytest.raises(ValueError, match=f"{dtype} voxels cannot be normalised"):
        normalize_patch(np.zeros((2, 2), dtype))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64"])
def test_supported_dtypes_give_the_same_tiles_in_0_to_1(tmp_path, dtype):
    """uint8 and uint16 scale by their maximum; float by the stated range, here the uint16 one: the same tiles."""
    volume_zyx = random_volume(SHAPE, seed=3).astype(np.uint16) * 257  # 0 … 65535, whole multiples of 257
    if dtype == "uint8":
        volume_zyx = volume_zyx // 257
    segment = open_segment(dtype_segment(tmp_path, dtype, volume_zyx))
    float_range = (0.0, 65535.0) if dtype.startswith("float") else None
    settings = InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32, float_range=float_range)
    tiles = GridTileDataset(segment, settings, stride=32, min_mask_fraction=0.1)
    expected = random_volume(SHAPE, seed=3)[4:12] / 255.0  # (D, Y, X): the middle 8 layers, as the window takes them
    for index in range(len(tiles)):
        item = tiles[index]
        y, x = item["origin"].tolist()
        assert np.allclose(item["volume"][0].numpy(), expected[:, y:y + 32, x:x + 32], atol=1e-6), (dtype, y, x)
    for mode in ("clip", "zscore"):  # the other scalings agree across dtypes as well
        patch = volume_zyx[:2, :8, :8].astype(dtype)
        reference = normalize_patch(random_volume(SHAPE, seed=3)[:2, :8, :8], mode)
        assert np.allclose(normalize_patch(patch, mode, float_range=float_range), reference, atol=1e-5), (dtype, mode)


def test_a_float_segment_without_a_stated_range_is_refused_by_every_dataset(tmp_path):
    segment = open_segment(dtype_segment(tmp_path, np.float32))  # opening is fine: the range is a reading setting
    settings = InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32)
    message = ("segment float32 holds float32 voxels: a float volume is read only with the voxel values that stand for "
               "0 and 1 stated (input setting float_range; pretraining: --float_range LOW HIGH), which these settings "
               "lack")
    with pytest.raises(SegmentError) as raised:
        RandomPatchDataset([segment], settings, samples_per_epoch=4)
    assert str(raised.value) == message
    with pytest.raises(SegmentError) as raised:
        GridTileDataset(segment, settings, stride=32)
    assert str(raised.value) == message


def test_input_settings_record_the_dtype_and_older_records_still_read(tmp_path):
    settings = InputSettings(model="resnet18_3d_tiny", float_range=(-1000.0, 3000.0), voxel_dtype="float32")
    assert InputSettings.from_dict(settings.as_dict()) == settings
    assert InputSettings.from_dict(settings.as_dict()).voxel_dtype == "float32"
    assert dataclasses.replace(settings, voxel_dtype="uint16") == settings  # a record, never a reason to refuse
    older = {key: value for key, value in settings.as_dict().items() if key not in ("float_range", "voxel_dtype")}
    assert InputSettings.from_dict(older) == dataclasses.replace(settings, float_range=None)
    assert InputSettings.from_dict(older).voxel_dtype is None
    checkpoint.save(tmp_path / "encoder.pth", "encoder", {"weight": torch.ones(2)}, settings)
    assert checkpoint.input_settings(checkpoint.read(tmp_path / "encoder.pth")).voxel_dtype == "float32"


def test_pretraining_records_the_voxel_dtype_and_the_float_range(tmp_path):
    segment = dtype_segment(tmp_path, np.float32, random_volume((65, 64, 64), seed=4).astype(np.float32) * 257)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), "--data_path", str(segment),
                             "--exp_dir", str(tmp_path / "run"), "--model", "resnet18_3d_tiny", "--tile_size", "64",
                             "--decoder_width", "32", "--samples_per_ep", "2", "--num_workers", "0", "--cpu_threads", "1",
                             "--ep", "1", "--float_range", "0", "65535"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = checkpoint.input_settings(checkpoint.read(tmp_path / "run" / "resnet18_3d_tiny_timm_style.pth"))
    assert saved.voxel_dtype == "float32" and saved.float_range == (0.0, 65535.0)
