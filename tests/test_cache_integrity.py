"""The cache never keeps a wrong file (issue 23, faults 1, 4, 5, 6 and 10), through the loopback server.

Each bad answer a server or a disk can give is played: a 200 with an HTML page, a body cut short with a matching
Content-Length, damage on disk, a password that breaks the URL, a slow drip, a full disk, an ID with a trailing
space. The cache ends byte-identical to a clean download, or there is one error line that download_segment.sh
then repairs.
"""
import contextlib
import errno
import io
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import tifffile
import zarr.core.sync

from pretrain.data import cache as cache_module
from pretrain.data import remote
from pretrain.data.remote import (CacheWriteError, DamagedCacheError, RemoteReadError, RemoteSettingError,
                                  blosc_problem, image_problem, split_credentials)
from pretrain.data.segment import SegmentError, open_segment
from tests.conftest import REPO_ROOT
from tests.loopback_server import LoopbackServer
from tests.synthetic import (SERVER_LAYER_SEGMENT_ID, SERVER_PATHS, SERVER_SEGMENTS, SERVER_SEGMENT_ID, random_volume,
                             rectangle_mask, write_png, write_zarr_segment)

FAST_RETRY = {"http_retries": 3, "http_backoff_seconds": 0.01}
ZARR_PATH = f"/{SERVER_SEGMENTS}/{SERVER_SEGMENT_ID}.zarr"
CHUNK = f"{ZARR_PATH}/0/4/0/1"  # a chunk the server has: layers 16-19, the top right block
MASK = f"/{SERVER_PATHS['1']}/{SERVER_SEGMENT_ID}/{SERVER_SEGMENT_ID}_mask.png"
LAYER = f"/{SERVER_PATHS['4']}/{SERVER_LAYER_SEGMENT_ID}/layers/07.tif"
pytestmark = pytest.mark.filterwarnings("ignore:.*cropped its bottom/right padding")


def cache_host(server: LoopbackServer) -> str:
    return server.url.split("//")[1].replace(":", "_")


def cached(cache: pathlib.Path, server: LoopbackServer, path: str) -> pathlib.Path:
    return cache / cache_host(server) / path.lstrip("/")


def assert_cache_mirrors_server(cache: pathlib.Path, server: LoopbackServer) -> int:
    """Every file cached from the server (metadata, chunks, images) is byte-identical to the server's; their count."""
    files = [path for path in (cache / cache_host(server)).rglob("*")
             if path.is_file() and not path.name.endswith(remote.ABSENT_SUFFIX)]
    for path in files:
        relative = path.relative_to(cache / cache_host(server))
        assert path.read_bytes() == (server.root / relative).read_bytes(), f"{relative} differs from the server's"
    return len(files)


def run_download(segment_id: str, env: dict, scroll: str = "1") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO_ROOT / "download_segment.sh"), segment_id, scroll],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def stderr_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the progress bars' frames and the warnings."""
    frames = re.split(r"[\r\n]", result.stderr)
    return [frame for frame in frames if frame.strip() and not frame.startswith(("downloading", "checking",
                                                                                 "converting", "warning: "))]


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)  # an error, not a crash (a signal is < 0)
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------- the checks themselves, on bytes


def test_blosc_header_check_refuses_html_and_cut_chunks(server_layout):
    chunk = (server_layout.root / CHUNK.lstrip("/")).read_bytes()
    decoded_bytes = 4 * 512 * 512
    assert blosc_problem(chunk, decoded_bytes) is None
    assert "not a Blosc chunk" in blosc_problem(b"<!DOCTYPE html><html>...</html>", decoded_bytes)
    assert f"says {len(chunk)} bytes, the body has {len(chunk) - 1000}" in blosc_problem(chunk[:-1000], decoded_bytes)
    assert "a chunk of this array has 512" in blosc_problem(chunk, 512)


def test_image_checks_find_cut_and_foreign_images(server_layout):
    png = (server_layout.root / MASK.lstrip("/")).read_bytes()
    tiff = (server_layout.root / LAYER.lstrip("/")).read_bytes()
    assert image_problem("m.png", png) is None and image_problem("07.tif", tiff) is None
    assert "cut short" in image_problem("m.png", png[:-20])
    assert "CRC" in image_problem("m.png", png[:60] + bytes([png[60] ^ 1]) + png[61:])
    assert "cut short" in image_problem("07.tif", tiff[: len(tiff) // 2])
    assert "not a readable TIFF" in image_problem("07.tif", b"<html></html>")
    jpeg = io.BytesIO()
    tifffile.imwrite(jpeg, np.zeros((8, 8), np.uint8))  # not a JPEG at all
    assert image_problem("00.jpg", jpeg.getvalue()) == "not a JPEG image"


# ---------------------------------------------------------------- fault 1: bad 200 answers, damage on disk


@pytest.mark.parametrize("bad_body", ["html", "short"])
def test_bad_answers_are_retried_and_never_cached(server_layout, tmp_path, bad_body):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        # Two bad answers each for level 0's metadata, the mask and a chunk; the third request gets the file.
        for path in (f"{ZARR_PATH}/0/.zarray", MASK, CHUNK):
            server.body_faults[path] = [bad_body, bad_body]
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url, **FAST_RETRY)
        assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        assert np.array_equal(segment.mask, server_layout.mask > 0)
        assert server.fault_counts[bad_body] == 6
        assert server.requests[CHUNK] == 3 and server.requests[MASK] == 3
    assert assert_cache_mirrors_server(cache, server) > 17 * 2 * 2 - 17  # every present chunk, and more


def test_an_answer_that_stays_bad_is_one_error_naming_the_url_and_nothing_is_cached(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url, **FAST_RETRY)
        server.body_faults[CHUNK] = ["html"] * 10
        with pytest.raises(RemoteReadError) as error:
            segment.volume[16:20, 0:64, 512:530]
        assert server.requests[CHUNK] == 4
    message = str(error.value)
    assert message.startswith(f"cannot read {server.url}{CHUNK}: after 4 attempts the server's answer is still not a "
                              "valid chunk file (not a Blosc chunk"), message
    assert "\n" not in message
    assert not cached(cache, server, CHUNK).exists()


def test_a_cut_layer_image_is_fetched_again(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        server.body_faults[LAYER] = ["short"]
        segment = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url, **FAST_RETRY)
        assert server.fault_counts["short"] == 1 and server.requests[LAYER] == 2
    assert np.array_equal(segment.volume[:, :, :], server_layout.layer_volume)


def cut_on_disk(path: pathlib.Path, fraction: float = 0.001) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - max(1, int(len(data) * fraction))])


def test_damage_in_the_cache_is_found_on_read_and_fetched_again(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url).volume[:, :, :]
        cut_on_disk(cached(cache, server, CHUNK))  # 0.1 % of it: zarr alone read 1045 voxels wrong
        cached(cache, server, MASK).write_bytes(b"<html>not a mask</html>")
        server.reset_counts()
        with pytest.warns(UserWarning, match="in the cache is damaged") as damaged:
            segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
            assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        refetched = {str(warning.message).split(" in the cache")[0] for warning in damaged
                     if "damaged" in str(warning.message)}
        assert refetched == {str(cached(cache, server, CHUNK)), str(cached(cache, server, MASK))}
        assert np.array_equal(segment.mask, server_layout.mask > 0)
        assert server.requests == {CHUNK: 1, MASK: 1}  # those two again, nothing else
    assert_cache_mirrors_server(cache, server)


def flip_inside(path: pathlib.Path, server: LoopbackServer, cache: pathlib.Path) -> None:
    """One bit flipped in a cached chunk where the chunk still decodes, to other voxels: its size, its Blosc
    header and a full decode all pass (Blosc-zstd has no checksum), as in the attack that read 19,230 wrong voxels."""
    store = remote.CachedHTTPStore(server.url, cache_dir=cache)
    url = server.url + "/" + path.relative_to(cache / cache_host(server)).as_posix()
    data = path.read_bytes()
    for offset in range(len(data) - 1, remote.BLOSC_HEADER_BYTES, -1):  # from the end: zstd's literals
        changed = bytearray(data)
        changed[offset] ^= 0x10
        if store.body_problem(url, bytes(changed), decode=True) is None:
            path.write_bytes(bytes(changed))
            return
    raise AssertionError(f"no bit of {path} flips without breaking its decode")


def test_a_bit_flipped_inside_a_cached_chunk_is_found_by_its_digest_and_never_returned(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url).volume[:, :, :]
        chunk = cached(cache, server, CHUNK)
        flip_inside(chunk, server, cache)
        server.reset_counts()
        with pytest.warns(UserWarning, match=re.escape(f"{chunk} in the cache is damaged (its CRC-32C ")):
            segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
            assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        assert server.requests == {CHUNK: 1}  # that one again, nothing else
    assert_cache_mirrors_server(cache, server)
    # The server gone: one error naming the file, never the changed voxels.
    flip_inside(chunk, server, cache)
    with pytest.raises(DamagedCacheError, match=re.escape(f"{chunk} in the cache is damaged (its CRC-32C ")), \
            pytest.warns(UserWarning, match="fetching it again"):
        open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url, http_retries=0).volume[16:20, :64, 512:]


def test_a_chunk_cached_without_a_digest_is_decoded_then_recorded_and_a_file_system_without_them_says_so(
        server_layout, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url).volume[16:20, :64, 512:]
        chunk = cached(cache, server, CHUNK)
        os.removexattr(chunk, cache_module.DIGEST_ATTRIBUTE)  # cached before digests, or copied without them
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
        assert np.array_equal(segment.volume[16:20], server_layout.volume[16:20])
        assert os.getxattr(chunk, cache_module.DIGEST_ATTRIBUTE) == cache_module.body_digest(chunk.read_bytes())

        def no_attributes(*arguments):
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

        monkeypatch.setattr(os, "setxattr", no_attributes)
        other = tmp_path / "other_cache"
        with pytest.warns(UserWarning, match=f"the file system of the cache folder {other} keeps no extended") as said:
            segment = open_segment(SERVER_SEGMENT_ID, cache_dir=other, data_url=server.url)
            assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        assert sum("extended attributes" in str(warning.message) for warning in said) == 1


def test_damage_in_the_cache_without_the_server_is_one_error_naming_the_file(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url).volume[:, :, :]
    cut_on_disk(cached(cache, server, CHUNK))
    # The server is gone. A DataLoader worker reads the damaged chunk: an error naming the file, never a crash.
    code = f"""
import torch, numpy as np
from pretrain.data.segment import open_segment
segment = open_segment({SERVER_SEGMENT_ID!r}, http_retries=0)
class Blocks(torch.utils.data.Dataset):
    def __len__(self): return 1
    def __getitem__(self, index): return torch.from_numpy(np.ascontiguousarray(segment.volume[16:20, 0:64, 512:530]))
try:
    next(iter(torch.utils.data.DataLoader(Blocks(), num_workers=1)))
except Exception as error:
    print(type(error).__name__, str(error).splitlines()[-1] if 'DataLoader worker' in str(error) else error)
"""
    env = {**os.environ, "VESUVIUS_DATA_URL": server.url, "SEGMENT_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr  # a segfault would be -11
    assert "DamagedCacheError" in result.stdout and str(cached(cache, server, CHUNK)) in result.stdout, result.stdout
    assert "could not be fetched again: cannot read" in result.stdout
    with pytest.raises(DamagedCacheError, match=re.escape(f"{cached(cache, server, CHUNK)} in the cache is damaged")), \
            pytest.warns(UserWarning, match="fetching it again"):
        open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url, http_retries=0).volume[16:20, :64, 512:]


def test_download_segment_checks_every_cached_file_and_repairs_the_damaged(server_layout, tmp_path):
    cache = tmp_path / "cache"
    env = {"SEGMENT_CACHE_DIR": str(cache)}
    with LoopbackServer(server_layout.root) as server:
        env["VESUVIUS_DATA_URL"] = server.url
        first = run_download(SERVER_SEGMENT_ID, env)
        assert first.returncode == 0, first.stderr
        cut_on_disk(cached(cache, server, CHUNK))
        other_chunk = cached(cache, server, f"{ZARR_PATH}/0/9/1/0")
        other_chunk.write_bytes(b"<!DOCTYPE html>" + other_chunk.read_bytes()[15:])  # same size, foreign header
        cached(cache, server, f"{ZARR_PATH}/0/.zarray").write_text("<html>")
        cached(cache, server, MASK).write_bytes(cached(cache, server, MASK).read_bytes()[:-30])
        flipped = cached(cache, server, f"{ZARR_PATH}/0/2/0/0")
        flip_inside(flipped, server, cache)  # found by its digest alone
        repaired = run_download(SERVER_SEGMENT_ID, env)
        assert repaired.returncode == 0, repaired.stderr
        # The zarr's four in the count; the mask, read while the segment opens, in a warning line.
        assert "4 damaged files of the zarr fetched again" in repaired.stdout, repaired.stdout
        assert f"warning: {flipped} in the cache is damaged (its CRC-32C " in repaired.stderr
        assert f"warning: {cached(cache, server, MASK)} in the cache is damaged (the PNG image is cut short" in (
            repaired.stderr)
    assert_cache_mirrors_server(cache, server)


def test_download_segment_checks_a_converted_layer_segment(server_layout, tmp_path):
    cache = tmp_path / "cache"
    env = {"SEGMENT_CACHE_DIR": str(cache)}
    with LoopbackServer(server_layout.root) as server:
        env["VESUVIUS_DATA_URL"] = server.url
        first = run_download(SERVER_LAYER_SEGMENT_ID, env, scroll="4")
        assert first.returncode == 0 and "complete in the cache" in first.stdout, first.stderr
        chunk = sorted((cache / cache_host(server)).rglob("layers.zarr/0/c/*/*/*"))[3]
        cut_on_disk(chunk)
        result = run_download(SERVER_LAYER_SEGMENT_ID, env, scroll="4")
    line = assert_one_error_line(result)
    assert line.startswith(f"error: segment {SERVER_LAYER_SEGMENT_ID}: {chunk} is damaged (it does not decode"), line
    assert f"pretrain.data.cache remove {SERVER_LAYER_SEGMENT_ID}" in line and "complete" not in result.stdout


# ---------------------------------------------------------------- fault 4: a password that breaks the URL


@pytest.mark.parametrize("separator", ["#", "/", "?"])
def test_a_password_with_an_unencoded_separator_is_refused_without_echoing_it(tmp_path, separator):
    login, password = "alice7q", f"Xq7vz{separator}Kw93ph"
    url = f"http://{login}:{password}@127.0.0.1:9"
    with pytest.raises(RemoteSettingError, match="percent-encode"):
        split_credentials(url)
    result = run_download(SERVER_SEGMENT_ID, {"VESUVIUS_DATA_URL": url, "SEGMENT_CACHE_DIR": str(tmp_path)})
    line = assert_one_error_line(result)
    assert "percent-encode" in line and "~/.netrc" in line
    for secret in (login, "Xq7vz", "Kw93ph", "127.0.0.1"):
        assert secret not in result.stderr + result.stdout
    # Percent-encoded, the same password is accepted and split off.
    encoded = password.replace(separator, f"%{ord(separator):02X}")
    assert split_credentials(f"http://{login}:{encoded}@127.0.0.1:9")[0] == "http://127.0.0.1:9"


# ---------------------------------------------------------------- fault 5: a slow drip


def test_a_slow_drip_fails_within_the_deadline_with_one_line_naming_the_url(server_layout, tmp_path):
    with LoopbackServer(server_layout.root) as server:
        server.drip_seconds = 0.5  # one byte every half second: never idle long enough for the stall detector
        server.body_faults[f"{ZARR_PATH}/0/.zarray"] = ["drip"] * 10
        result = run_download(SERVER_SEGMENT_ID, {"VESUVIUS_DATA_URL": server.url, "SEGMENT_CACHE_DIR": str(tmp_path),
                                                  "SEGMENT_HTTP_DEADLINE": "2"})
    line = assert_one_error_line(result)
    assert line.startswith(f"error: cannot read {server.url}{ZARR_PATH}/0/.zarray: not complete within its deadline "
                           "of 2 s"), line
    assert server.requests[f"{ZARR_PATH}/0/.zarray"] == 1  # the deadline covers the retries too


def test_retries_stop_at_the_deadline(server_layout, tmp_path):
    with LoopbackServer(server_layout.root) as server:
        server.permanent_status[MASK] = 503
        store = remote.CachedHTTPStore(server.url, tmp_path / "cache", retries=50, backoff_seconds=0.1,
                                       deadline_seconds=1.5)
        with pytest.raises(RemoteReadError, match=re.escape(f"cannot read {server.url}{MASK}: not complete within its "
                                                            "deadline of 1.5 s (")) as error:
            zarr.core.sync.sync(store.fetch_url(server.url + MASK))
    assert "HTTP 503" in str(error.value) and server.requests[MASK] < 50  # stopped by the deadline, not the retries


def test_a_timeout_setting_that_is_not_a_number_is_one_line(tmp_path):
    result = run_download(SERVER_SEGMENT_ID, {"VESUVIUS_DATA_URL": "http://127.0.0.1:9",
                                              "SEGMENT_CACHE_DIR": str(tmp_path), "SEGMENT_HTTP_TIMEOUT": "soon"})
    assert assert_one_error_line(result) == "error: SEGMENT_HTTP_TIMEOUT='soon' is not a positive number of seconds"


# ---------------------------------------------------------------- fault 6: a full disk


class FullDisk:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_error_naming_the_cache_folder_not_the_server(server_layout, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        def full_disk(destination, data, cache_dir, digest=False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(remote, "write_to_cache", full_disk)
        with pytest.raises(SegmentError) as error:
            open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
        monkeypatch.undo()
        # Layer images are streamed to disk block by block: the same line when a block cannot be written.
        monkeypatch.setattr(remote, "open", FullDisk, raising=False)
        with pytest.raises(SegmentError) as layer_error:
            open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache, data_url=server.url)
    for message in (str(error.value), str(layer_error.value)):
        assert message.startswith(f"the cache folder {cache} is out of disk space ("), message
        assert "needs " in message and "SEGMENT_CACHE_DIR" in message and "cannot read" not in message
    assert isinstance(error.value.__cause__, CacheWriteError)


@contextlib.contextmanager
def small_tmpfs(folder: pathlib.Path, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"tmpfs-{uuid.uuid4().hex[:8]}",
                              str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# 2 MB: full while downloading; 14 MB: the 10 MB of layer images fit, their conversion into a zarr does not.
@pytest.mark.parametrize("segment_id, scroll, size", [
    (SERVER_SEGMENT_ID, "1", "2m"), (SERVER_LAYER_SEGMENT_ID, "4", "2m"), (SERVER_LAYER_SEGMENT_ID, "4", "14m")])
def test_download_onto_a_full_disk_is_one_line_without_noise(server_layout, tmp_path, segment_id, scroll, size):
    with small_tmpfs(tmp_path / "small", size) as cache, LoopbackServer(server_layout.root) as server:
        result = run_download(segment_id, {"VESUVIUS_DATA_URL": server.url, "SEGMENT_CACHE_DIR": str(cache)}, scroll)
    line = assert_one_error_line(result)
    assert line.startswith(f"error: the cache folder {cache} is out of disk space ("), line
    assert ("the zarr converted from" in line) == (size == "14m"), line
    assert "Traceback" not in result.stderr and "Session is closed" not in result.stderr
    assert "never retrieved" not in result.stderr


# ---------------------------------------------------------------- fault 10: an ID that is not one


def test_a_malformed_segment_id_is_refused_and_never_reported_complete(server_layout, tmp_path):
    with LoopbackServer(server_layout.root) as server:
        result = run_download(f"{SERVER_SEGMENT_ID} ", {"VESUVIUS_DATA_URL": server.url,
                                                        "SEGMENT_CACHE_DIR": str(tmp_path)})
        assert sum(server.requests.values()) == 0
    line = assert_one_error_line(result)
    assert line.startswith(f"error: segment ID '{SERVER_SEGMENT_ID} ' is not one") and "no spaces" in line
    assert "complete" not in result.stdout and "done" not in result.stdout


# ---------------------------------------------------------------- fault 5 under torchrun: a stalled rank


def process_state(pid: int) -> str:
    """The state letter of a process ("R", "S", "T" stopped, "Z" exited), or "" once it is gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def worker_pids(parent_pid: int) -> dict[int, int]:
    """{rank: pid} of the workers torchrun started."""
    workers = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent_pid:
                continue
            environment = (stat.parent / "environ").read_bytes().split(b"\0")
            rank = next(int(item[5:]) for item in environment if item.startswith(b"RANK="))
            workers[rank] = int(stat.parent.name)
    return workers


def wait_for(condition, what: str, limit_seconds: float = 120) -> None:
    deadline = time.monotonic() + limit_seconds
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)


def test_a_stalled_torchrun_rank_stops_the_run_with_one_line_naming_it(tmp_path):
    segment = write_zarr_segment(tmp_path / "tiny.zarr", random_volume((65, 128, 128), seed=3), chunks=(32, 64, 64))
    write_png(segment / "mask.png", rectangle_mask((128, 128), margin=4))
    settings = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--num_workers", "0",
                "--decoder_width", "32", "--vis_every", "0", "--samples_per_ep", "100000", "--ep", "1",
                "--dist_timeout_minutes", "0.2", "--data_path", str(segment), "--exp_dir", str(tmp_path / "run")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "pretrain" / "main.py"), *settings]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        torchrun = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=stdout, stderr=stderr)
    try:
        # Both ranks are past their first collective (DDP's broadcast) once rank 0 prints its summary line.
        wait_for(lambda: "iterations per epoch" in (tmp_path / "stdout").read_text(), "the run start")
        workers = worker_pids(torchrun.pid)
        assert sorted(workers) == [0, 1], (tmp_path / "stderr").read_text()
        os.kill(workers[1], signal.SIGSTOP)  # rank 1 stalls as a hung read would: alive, silent
        # Rank 0 gives up; torchrun then ends the stalled rank, which receives its SIGTERM once continued.
        wait_for(lambda: "closing signal SIGTERM" in (tmp_path / "stderr").read_text(), "torchrun end rank 1")
        os.kill(workers[1], signal.SIGCONT)
        torchrun.wait(timeout=120)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    output, errors = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert torchrun.returncode != 0
    assert output.count("iterations per epoch") == 1  # rank 0's line only
    error_lines = [line for line in errors.splitlines() if line.startswith("error: ")]
    assert error_lines == ["error: rank 0 of 2: rank 1 did not answer at a collective operation within 0.2 min "
                           "(it stalled or died; the timeout is the setting dist_timeout_minutes); stopping"], errors
    # No traceback from either rank (torchrun prefixes their lines with "[rankN]:"); torchrun's own summary of the
    # failed run (its ChildFailedError) follows regardless.
    assert "[rank0]" not in errors and "[rank1]" not in errors, errors
