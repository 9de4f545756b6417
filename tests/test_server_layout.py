"""Segments by ID from the data server as it is laid out (shared/REFERENCES.md, "The data server as it is"):
the official mask from the volume package, label images padded to whole tiles, segments that exist only as
layer images (scrolls 2–4), 404s that do not stick, and credentials that never show."""
import os
import pathlib
import re
import subprocess
import warnings

import cv2
import numpy as np
import pytest
import tifffile

from finetune import data as finetune_data
from pretrain.data import download
from pretrain.data.segment import SegmentError, open_segment, read_label_image
from pretrain.data.volume import convert_layers_to_zarr
from tests.conftest import REPO_ROOT
from tests.loopback_server import LoopbackServer
from tests.synthetic import (SERVER_LAYER_SEGMENT_ID, SERVER_PATHS, SERVER_SEGMENTS, SERVER_SEGMENT_ID, pad_to_tiles,
                             random_volume, rectangle_mask, server_folder, write_png, write_server_layers,
                             write_server_segment, write_zarr_segment)

pytestmark = pytest.mark.filterwarnings("ignore:.*cropped its bottom/right padding")
LOGIN, PASSWORD = "reader", "s3cr3t-Pw"


def cache_files(cache: pathlib.Path) -> list[pathlib.Path]:
    """Every file in the cache but the lock files (empty, and kept so that waiting processes stay safe)."""
    return [path for path in cache.rglob("*") if path.is_file() and ".locks" not in path.parts]


def png_bytes(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


# ---------------------------------------------------------------- the official mask


@pytest.mark.parametrize("where", ["superseded", "beside the zarr", "nowhere"])
def test_mask_comes_from_the_volume_package_then_beside_the_zarr_then_the_voxels(tmp_path, where):
    volume = random_volume((65, 40, 30), seed=7)
    volume[:, :, :6] = 0
    mirror = tmp_path / "mirror"
    zarr_path = write_server_segment(mirror, SERVER_SEGMENT_ID, volume, mask=None)
    mask = rectangle_mask((40, 30), margin=8)
    if where == "superseded":
        folder = server_folder(mirror, f"{SERVER_SEGMENT_ID}_superseded")
        write_png(folder / f"{SERVER_SEGMENT_ID}_mask.png", mask)
    elif where == "beside the zarr":
        write_png(zarr_path.parent / f"{SERVER_SEGMENT_ID}_mask.png", mask)
    with LoopbackServer(mirror) as server:
        if where == "nowhere":
            with pytest.warns(UserWarning, match="no mask found; deriving it"):
                segment = open_segment(SERVER_SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url)
            assert not segment.mask[:, :6].any() and segment.mask[:, 6:].mean() > 0.9
        else:
            segment = open_segment(SERVER_SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url)
            assert np.array_equal(segment.mask, mask > 0)


# ---------------------------------------------------------------- padded label images


@pytest.mark.parametrize("shape, ink_at, outcome", [
    ((256, 256), None, "cropped"),  # padded to a whole tile, nothing in the margin
    ((200, 256), (199, 10), "cropped"),  # ink in the last real row: still padding
    ((256, 256), (210, 10), "error: ink in the margin"),
    ((190, 100), None, "padded"),  # slightly smaller: zeros at the bottom/right
    ((100, 200), None, "error"),  # transposed
    ((200 + 256, 100), None, "error"),  # more than a tile larger: another segment's
    ((199, 1000), None, "error"),  # shorter and far wider
], ids=["padded", "ink-at-edge", "ink-in-margin", "smaller", "transposed", "too-large", "mixed"])
def test_label_images_padded_at_the_bottom_right_fit_the_volume(shape, ink_at, outcome):
    image = np.zeros(shape, np.uint8)
    image[5:50, 5:50] = 255
    if ink_at is not None:
        image[ink_at] = 255
    expected_yx = (200, 100)
    if outcome in ("cropped", "padded"):
        with pytest.warns(UserWarning, match=rf"labels has shape \(Y, X\) = {re.escape(str(shape))}, but the volume's "
                                             rf"\(Y, X\) is \(200, 100\): {outcome}"):
            labels = read_label_image(png_bytes(image), "labels", expected_yx)
        assert labels.shape == expected_yx
        assert labels.sum() == (image[:200, :100] > 0).sum() and labels[5:50, 5:50].all()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            message = rf"labels has shape \(Y, X\) = {re.escape(str(shape))}.*\(200, 100\)"
            if "margin" in outcome:
                message += "; its extra rows or columns are not empty"
            with pytest.raises(SegmentError, match=message):
                read_label_image(png_bytes(image), "labels", expected_yx)


def test_padded_labels_fit_in_every_source_and_in_fine_tuning(tmp_path):
    volume = random_volume((65, 120, 90), seed=8)
    path = write_zarr_segment(tmp_path / "20230101000000.zarr", volume)
    write_png(path / "mask.png", pad_to_tiles(rectangle_mask((120, 90), margin=4)))
    labels = np.zeros((120, 90), np.uint8)
    labels[30:40, 20:70] = 255
    write_png(path / "inklabels.png", pad_to_tiles(labels))
    with pytest.warns(UserWarning, match=r"inklabels.png has shape \(Y, X\) = \(256, 256\).*\(120, 90\)"):
        segment = open_segment(path)
    assert segment.inklabels.shape == (120, 90) and segment.inklabels.sum() == 10 * 50
    write_png(path / "letters.png", pad_to_tiles(labels))
    resolved = finetune_data.resolve_label_path("letters.png", segment, "inklabel_path")
    with pytest.warns(UserWarning, match=r"inklabel_path .*letters.png has shape \(Y, X\) = \(256, 256\)"):
        assert np.array_equal(finetune_data.read_label_file(resolved, segment, "inklabel_path"), segment.inklabels)


# ---------------------------------------------------------------- segments of layer images (scrolls 2, 3, 4)


def test_scroll_4_segment_is_downloaded_once_converted_and_opens_offline(server_layout, tmp_path, capfd):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        segment = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url)
        assert "downloading 20231107190228" in capfd.readouterr().err  # tqdm's bar
        layers_url = f"{server.url}/{SERVER_PATHS['4']}/{SERVER_LAYER_SEGMENT_ID}/layers"
        assert segment.source == "remote" and segment.location == layers_url
        assert segment.dtype == np.uint16 and segment.shape == server_layout.layer_volume.shape
        assert np.array_equal(segment.volume[:, :, :], server_layout.layer_volume)
        assert np.array_equal(segment.mask, server_layout.layer_mask > 0) and segment.inklabels is None
        layer_requests = [path for path in server.requests if path.endswith(".tif")]
        assert len(layer_requests) == 65 and set(server.requests[path] for path in layer_requests) == {1}
        # Read through a chunked zarr in the cache; the downloaded TIFFs are gone once converted.
        host_folder = cache / server.url.split("//")[1].replace(":", "_")
        segment_folder = host_folder / SERVER_PATHS["4"] / SERVER_LAYER_SEGMENT_ID
        assert (segment_folder / "layers.zarr").is_dir() and not (segment_folder / "layers").exists()
        assert segment.volume.chunks == (4, 512, 512)
        requests_before = sum(server.requests.values())
        again = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url)
        assert sum(server.requests.values()) == requests_before
    offline = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url, http_retries=0)
    assert np.array_equal(offline.volume[60:65, 10:290, 3:250], server_layout.layer_volume[60:65, 10:290, 3:250])
    assert np.array_equal(again.mask, segment.mask)


def test_download_script_fetches_a_scroll_4_segment(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        env = {**os.environ, "SEGMENT_CACHE_DIR": str(cache), "VESUVIUS_DATA_URL": server.url}
        command = ["bash", str(REPO_ROOT / "download_segment.sh"), SERVER_LAYER_SEGMENT_ID, "4"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "downloading" in result.stderr and "converted from the layer images" in result.stdout
    segment = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url, http_retries=0)
    assert np.array_equal(segment.volume[:, :, :], server_layout.layer_volume)


def test_jpg_layers_of_scroll_2(tmp_path):
    volume = random_volume((65, 40, 30), seed=9)
    mirror = tmp_path / "mirror"
    layers = write_server_layers(mirror, "20230509182749", volume, rectangle_mask((40, 30), margin=3), scroll="2",
                                 suffix=".jpg")
    expected = np.stack([cv2.imread(str(layers / f"{index:02d}.jpg"), cv2.IMREAD_UNCHANGED) for index in range(65)])
    with LoopbackServer(mirror) as server:
        segment = open_segment("20230509182749", scroll="2", cache_dir=tmp_path / "cache", data_url=server.url)
        tif_requests = [path for path in server.requests if path.endswith(".tif")]
        assert tif_requests == [f"/{SERVER_PATHS['2']}/20230509182749/layers/00.tif"]  # the probe, then .jpg
    assert np.array_equal(segment.volume[:, :, :], expected)


def small_layer_mirror(tmp_path: pathlib.Path, shape=(65, 40, 30)) -> tuple[pathlib.Path, pathlib.Path, np.ndarray]:
    volume = random_volume(shape, seed=10)
    mirror = tmp_path / "mirror"
    layers = write_server_layers(mirror, SERVER_LAYER_SEGMENT_ID, volume, rectangle_mask(shape[1:], margin=3))
    return mirror, layers, volume


def test_layer_download_resumes_after_a_failure(tmp_path):
    mirror, _, volume = small_layer_mirror(tmp_path)
    cache = tmp_path / "cache"
    failing = f"/{SERVER_PATHS['4']}/{SERVER_LAYER_SEGMENT_ID}/layers/40.tif"
    with LoopbackServer(mirror) as server:
        server.permanent_status[failing] = 503
        with pytest.raises(SegmentError, match=f"cannot read {server.url}{failing} after 2 attempts"):
            open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url, http_retries=1,
                         http_backoff_seconds=0.01)
        kept = [path.name for path in cache_files(cache) if path.suffix == ".tif"]
        assert len(kept) == 64 and "40.tif" not in kept  # what was downloaded stays for the next run
        del server.permanent_status[failing]
        server.reset_counts()
        segment = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url)
        assert [path for path in server.requests if path.endswith(".tif")] == [failing]
    assert np.array_equal(segment.volume[:, :, :], volume)


def test_killed_conversion_never_looks_complete_and_resumes(tmp_path):
    volume = random_volume((13, 50, 40), seed=11)
    paths = []
    for index, layer in enumerate(volume):
        paths.append(tmp_path / f"{index:02d}.tif")
        tifffile.imwrite(paths[-1], layer)
    target = tmp_path / "layers.zarr"
    progress = []

    def killed_after_two_bands(count: int) -> None:
        progress.append(count)
        if len(progress) == 3:  # the start, then two bands of 4 layers
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_layers_to_zarr(paths, target, (4, 32, 32), on_layers=killed_after_two_bands)
    assert not target.exists() and (tmp_path / "layers.zarr.partial").is_dir()
    progress.clear()
    convert_layers_to_zarr(paths, target, (4, 32, 32), on_layers=progress.append)
    assert progress == [8, 4, 1]  # resumed after the two finished bands
    with pytest.warns(UserWarning, match="no mask found"):
        segment = open_segment(target)
    assert np.array_equal(segment.volume[:, :, :], volume) and segment.volume.chunks == (4, 32, 32)


@pytest.mark.parametrize("fault", ["missing layer", "layer of another size", "layer of another dtype"])
def test_bad_layer_folder_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, fault):
    mirror, layers, _ = small_layer_mirror(tmp_path)
    if fault == "missing layer":
        (layers / "30.tif").unlink()
        message = "layer folder .*/layers/ lacks 30.tif \\(a segment has 65 layers, 00.tif … 64.tif\\)"
    elif fault == "layer of another size":
        tifffile.imwrite(layers / "12.tif", np.zeros((40, 31), np.uint8))
        message = "layer .*12.tif is \\(40, 31\\) uint8, but 00.tif is \\(40, 30\\) uint8"
    else:
        tifffile.imwrite(layers / "12.tif", np.zeros((40, 30), np.uint16))
        message = "layer .*12.tif is \\(40, 30\\) uint16, but 00.tif is \\(40, 30\\) uint8"
    cache = tmp_path / "cache"
    with LoopbackServer(mirror) as server:
        monkeypatch.setenv("VESUVIUS_DATA_URL", server.url)
        assert download.main([SERVER_LAYER_SEGMENT_ID, "--scroll", "4", "--cache-dir", str(cache)]) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and SERVER_LAYER_SEGMENT_ID in error_lines[0], error_lines
    assert re.search(message, error_lines[0]), error_lines[0]
    assert not cache_files(cache)


def test_unknown_scroll_is_one_error_line(capsys):
    assert download.main([SERVER_SEGMENT_ID, "--scroll", "9"]) == 2
    assert capsys.readouterr().err == "error: scroll '9' is unknown; known scrolls: 1, 2, 3, 4, 5\n"


# ---------------------------------------------------------------- 404s


def chunk_path(z: int, y: int, x: int) -> str:
    return f"/{SERVER_SEGMENTS}/{SERVER_SEGMENT_ID}.zarr/0/{z}/{y}/{x}"


def test_a_chunk_that_answers_404_once_is_read_right(server_layout, tmp_path):
    flaky, absent = chunk_path(3, 0, 1), chunk_path(3, 1, 1)
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        server.scripted_status[flaky] = [404]
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
        assert np.array_equal(segment.volume[12:16], server_layout.volume[12:16])
        assert server.requests[flaky] == 2 and server.requests[absent] == 2
        for _ in range(2):  # really absent: not asked again, through fresh handles and from the disk cache
            fresh = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
            assert not fresh.volume[12:16, 512:, 512:].any()
        assert server.requests[flaky] == 2 and server.requests[absent] == 2


def test_a_404_that_stuck_is_repaired_by_the_download_script(server_layout, tmp_path, monkeypatch, capsys):
    stuck = chunk_path(5, 0, 0)
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        server.scripted_status[stuck] = [404, 404]  # a proxy that failed for a while
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
        assert not segment.volume[20:24, :512, :512].any()  # read as fill value in this run
        monkeypatch.setenv("VESUVIUS_DATA_URL", server.url)
        assert download.main([SERVER_SEGMENT_ID, "--cache-dir", str(cache)]) == 0
        assert "1 chunks an earlier run had been told were absent are now cached" in capsys.readouterr().out
        repaired = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
        assert np.array_equal(repaired.volume[20:24], server_layout.volume[20:24])


# ---------------------------------------------------------------- credentials


def assert_no_credentials(cache: pathlib.Path, *texts: str) -> None:
    for path in cache.rglob("*"):
        assert LOGIN not in str(path) and PASSWORD not in str(path), path
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    for text in texts:
        assert LOGIN not in text and PASSWORD not in text, text


def test_credentials_in_the_url_are_sent_and_never_shown(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root, basic_auth=(LOGIN, PASSWORD)) as server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache,
                                   data_url=server.url.replace("//", f"//{LOGIN}:{PASSWORD}@"))
            layer_segment = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache,
                                         data_url=server.url.replace("//", f"//{LOGIN}:{PASSWORD}@"))
        assert np.array_equal(segment.volume[:8], server_layout.volume[:8]) and server.unauthorized == 0
        assert np.array_equal(layer_segment.volume[:, :, :], server_layout.layer_volume)
    assert segment.location.startswith(server.url)  # the cache key and location: the URL without credentials
    assert (cache / server.url.split("//")[1].replace(":", "_") / SERVER_SEGMENTS).is_dir()
    assert_no_credentials(cache, segment.location, repr(segment), repr(segment.volume.opener), layer_segment.location,
                          repr(layer_segment.volume.opener), *(str(warning.message) for warning in caught))


@pytest.mark.parametrize("given", [None, "wrong-Pw"], ids=["none", "refused"])
def test_401_is_one_error_line_that_echoes_no_credentials(server_layout, tmp_path, monkeypatch, capsys, given):
    with LoopbackServer(server_layout.root, basic_auth=(LOGIN, PASSWORD)) as server:
        url = server.url if given is None else server.url.replace("//", f"//{LOGIN}:{given}@")
        monkeypatch.setenv("VESUVIUS_DATA_URL", url)
        assert download.main([SERVER_SEGMENT_ID, "--cache-dir", str(tmp_path / "cache")]) == 2
        assert server.unauthorized >= 1
    output = capsys.readouterr()
    lines = output.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "401 Unauthorized" in lines[0], output.err
    assert ("needs credentials" if given is None else "refused the credentials") in lines[0]
    assert_no_credentials(tmp_path / "cache", output.err, output.out)
    assert given is None or given not in output.err + output.out
    assert not cache_files(tmp_path / "cache")


def test_credentials_from_netrc(server_layout, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {LOGIN} password {PASSWORD}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    with LoopbackServer(server_layout.root, basic_auth=(LOGIN, PASSWORD)) as server:
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url)
        assert np.array_equal(segment.volume[:4], server_layout.volume[:4]) and server.unauthorized == 0
    assert_no_credentials(tmp_path / "cache")
