"""Segments by ID from a loopback server laid out like the data server: cache, retries, faults, errors.

The server layout (tests/conftest.py `server_layout`): a scroll 1 OME-Zarr v2 segment with (4, 512, 512)
Blosc-zstd chunks and '/' keys, its labels beside it padded to whole tiles, its mask in the volume package.
"""
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pretrain.data.remote import INCOMPLETE_DIR, RemoteReadError
from pretrain.data.segment import SegmentError, open_segment
from tests.conftest import REPO_ROOT, assert_cache_holds_only_whole_chunks, cached_chunk_files
from tests.loopback_server import LoopbackServer
from tests.synthetic import (SERVER_PATHS, SERVER_SEGMENTS, SERVER_SEGMENT_ID, random_volume, rectangle_mask,
                             server_folder, write_png, write_zarr_segment)

FAST_RETRY = {"http_retries": 6, "http_backoff_seconds": 0.01}
CHUNKS_PRESENT = 17 * 2 * 2 - 17  # (65, 600, 530) in (4, 512, 512) chunks, less the all-zero column (1, 1)
pytestmark = pytest.mark.filterwarnings("ignore:.*cropped its bottom/right padding")


def cache_host(server: LoopbackServer) -> str:
    return server.url.split("//")[1].replace(":", "_")


class OverlapServer(LoopbackServer):
    """Holds chunk requests until `overlap` of them wait together, then serves them and all later ones: a client
    able to have that many requests in flight provably does, however fast or slow the machine. (If the client
    never sends that many together, the gate opens after 30 s, and max_active says so.)"""

    def __init__(self, root: pathlib.Path, overlap: int, **options):
        super().__init__(root, **options)
        self.overlap = overlap
        self.waiting = 0
        self.gate_open = threading.Event()
        # Chunk requests the client has in flight: counted from arrival until the response starts. The server's
        # own `active` counts until its handler returns, after the body is sent; a client that read the body may
        # already have sent its next request by then, so `active` can exceed what the client really had in flight.
        self.in_flight = 0
        self.max_in_flight = 0

    def _respond(self, handler, path: str, send_body: bool) -> None:
        if not self._is_chunk(path):
            super()._respond(handler, path, send_body)
            return
        with self.lock:
            self.waiting += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.waiting >= self.overlap:
                self.gate_open.set()
        if not self.gate_open.wait(timeout=30):
            self.gate_open.set()
        write, answered = handler.wfile.write, []

        def write_once_answered(data: bytes):  # the first write (the headers) ends the request's time in flight
            if not answered:
                answered.append(True)
                with self.lock:
                    self.in_flight -= 1
            return write(data)

        handler.wfile.write = write_once_answered
        super()._respond(handler, path, send_body)


class StallingServer(LoopbackServer):
    """Serves the first `served` chunk requests; each later one, until `release()`, gets half its body and then
    waits: a download stops with exactly `served` chunks fetched and the next ones half received, to be killed
    there."""

    def __init__(self, root: pathlib.Path, served: int, **options):
        super().__init__(root, **options)
        self.served = served
        self.chunk_requests_seen = 0
        self.stalled = 0  # requests waiting with half their body sent
        self.released = threading.Event()

    def release(self) -> None:
        self.released.set()

    def _respond(self, handler, path: str, send_body: bool) -> None:
        with self.lock:
            self.chunk_requests_seen += self._is_chunk(path)
            held = self._is_chunk(path) and self.chunk_requests_seen > self.served and not self.released.is_set()
        if not held:
            super()._respond(handler, path, send_body)
            return
        body = (self.root / path.lstrip("/")).read_bytes()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        with self.lock:
            self.stalled += 1
        self.released.wait(timeout=120)
        handler.close_connection = True  # the rest never comes


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_first_open_fetches_each_file_once_and_a_second_process_fetches_nothing(server_layout, tmp_path):
    cache = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        with pytest.warns(UserWarning, match=r"\(768, 768\).*\(600, 530\): cropped its bottom/right padding"):
            segment = open_segment(SERVER_SEGMENT_ID, cache_dir=cache, data_url=server.url)
        assert segment.source == "remote" and segment.shape == server_layout.volume.shape
        assert segment.voxel_size_um == 7.91
        # The official mask (from the volume package), not one derived from the voxels; no chunk read to open.
        assert np.array_equal(segment.mask, server_layout.mask > 0)
        assert np.array_equal(segment.inklabels, server_layout.labels // 255)
        mask_url = f"/{SERVER_PATHS['1']}/{SERVER_SEGMENT_ID}/{SERVER_SEGMENT_ID}_mask.png"
        labels_url = f"/{SERVER_SEGMENTS}/{SERVER_SEGMENT_ID}_inklabels.png"
        # No negatives image beside this segment: its 404 is believed when it repeats, then remembered.
        negatives_url = f"/{SERVER_SEGMENTS}/{SERVER_SEGMENT_ID}_negatives.png"
        assert server.requests_by_kind() == {"metadata": 2, "image": 4, "chunk": 0, "not_found": 2}
        assert server.requests[mask_url] == 1 and server.requests[labels_url] == 1 and server.requests[negatives_url] == 2
        assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        # Each present chunk once; each absent one twice (a 404 is believed when it repeats), then never again.
        assert server.chunk_requests() == CHUNKS_PRESENT + 2 * 17 and server.requests_by_kind()["not_found"] == 2 * 17 + 2
        requests_before = sum(server.requests.values())
        code = (
            "import numpy as np; from pretrain.data.segment import open_segment; "
            f"s = open_segment('{SERVER_SEGMENT_ID}'); print(int(s.volume[:, :, :].astype(np.int64).sum()))"
        )
        result = run_python(code, {"VESUVIUS_DATA_URL": server.url, "SEGMENT_CACHE_DIR": str(cache)})
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.strip()) == int(server_layout.volume.astype(np.int64).sum())
        assert sum(server.requests.values()) == requests_before  # the second process asked the server nothing


def test_injected_faults_are_recovered_and_data_is_identical(server_layout, tmp_path):
    faults = {"429": 0.1, "500": 0.1, "truncate": 0.1, "drop": 0.1}
    with LoopbackServer(server_layout.root, faults=faults, seed=3) as server:
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url, **FAST_RETRY)
        assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        assert set(server.fault_counts) == set(faults), server.fault_counts  # every fault kind happened
    assert_cache_holds_only_whole_chunks(tmp_path / "cache", server_layout.root, cache_host(server))


def test_concurrency_is_bounded(server_layout, tmp_path):
    # Held until three wait together, and slow after that: a fourth request would find three in flight.
    with OverlapServer(server_layout.root, overlap=3, chunk_delay_seconds=0.05) as server:
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url,
                               http_concurrency=3)
        assert np.array_equal(segment.volume[:, :, :], server_layout.volume)
        assert server.max_in_flight == 3  # three at once (zarr asks for many chunks together), never more


def test_unknown_segment_id_lists_every_url_tried_and_leaves_no_file(server_layout, tmp_path):
    with LoopbackServer(server_layout.root) as server:
        with pytest.raises(SegmentError) as error:
            open_segment("20990101000000", cache_dir=tmp_path / "cache", data_url=server.url)
    message = str(error.value)
    zarr_url = f"{server.url}/{SERVER_SEGMENTS}/20990101000000.zarr"
    folder_url = f"{server.url}/{SERVER_PATHS['1']}/20990101000000"
    tried = [f"{zarr_url}/0/.zarray", f"{zarr_url}/0/zarr.json"] + [
        f"{folder}/layers/00{suffix}" for folder in (folder_url, folder_url + "_superseded")
        for suffix in (".tif", ".jpg")]
    assert message.startswith("segment 20990101000000 not found at ") and "scroll=1" in message
    assert all(url in message for url in tried), message
    assert "\n" not in message
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()]


def test_unreachable_server_fails_after_retries(tmp_path):
    with pytest.raises(SegmentError, match=r"cannot read http://127\.0\.0\.1:9/.* after 3 attempts"):
        open_segment("20230827161847", cache_dir=tmp_path / "cache", data_url="http://127.0.0.1:9",
                     http_retries=2, http_backoff_seconds=0.01)


def test_chunk_that_keeps_failing_names_its_url(server_layout, tmp_path):
    with LoopbackServer(server_layout.root) as server:
        segment = open_segment(SERVER_SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url,
                               http_retries=2, http_backoff_seconds=0.01)
        bad_chunk = f"/{SERVER_SEGMENTS}/{SERVER_SEGMENT_ID}.zarr/0/1/0/1"
        server.permanent_status[bad_chunk] = 503
        with pytest.raises(RemoteReadError, match=f"cannot read {server.url}{bad_chunk} after 3 attempts"):
            segment.volume[4:8, 0:64, 512:530]
        assert server.requests[bad_chunk] == 3
    assert not (tmp_path / "cache" / cache_host(server) / bad_chunk.lstrip("/")).exists()


def test_download_killed_midway_leaves_no_partial_chunk_and_resumes(tmp_path):
    segment_id = "20230827161847"
    volume = random_volume((65, 256, 256), seed=5)
    mirror = tmp_path / "mirror"
    # Small chunks here: enough of them to kill the download in the middle.
    write_zarr_segment(mirror / SERVER_SEGMENTS / f"{segment_id}.zarr", volume, zarr_format=2, slash_keys=True,
                       chunks=(16, 32, 32))
    write_png(server_folder(mirror, segment_id) / f"{segment_id}_mask.png", rectangle_mask((256, 256)))
    total_chunks = 5 * 8 * 8
    cache = tmp_path / "cache"
    env = {**os.environ, "SEGMENT_CACHE_DIR": str(cache)}
    fetched_before_kill = 40
    with StallingServer(mirror, served=fetched_before_kill) as server:
        env["VESUVIUS_DATA_URL"] = server.url
        command = ["bash", str(REPO_ROOT / "download_segment.sh"), segment_id]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The download stalls with the served chunks cached and the next ones half received: wait for that state
        # (it lasts), then kill.
        deadline = time.time() + 60
        while process.poll() is None and time.time() < deadline and not (
                server.stalled and len(cached_chunk_files(cache)) == fetched_before_kill):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        server.release()
        assert server.stalled and len(cached_chunk_files(cache)) == fetched_before_kill
        assert_cache_holds_only_whole_chunks(cache, mirror, cache_host(server))  # nothing half received

        requests_before = server.chunk_requests()
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        missing = total_chunks - fetched_before_kill
        assert f"{total_chunks} chunks, {fetched_before_kill} already cached" in resumed.stdout
        assert f"asking about {missing} " in resumed.stdout
        # The progress bar counts the missing chunks only, and ends with all of them.
        bar = [frame for frame in re.split(r"[\r\n]", resumed.stderr) if frame.startswith("downloading")][-1]
        assert re.match(rf"downloading {segment_id}: 100%\|.*\| {missing}/{missing} \[", bar), bar
        assert server.chunk_requests() - requests_before == missing
        assert len(cached_chunk_files(cache)) == total_chunks
        assert not any((cache / INCOMPLETE_DIR).iterdir())  # the killed run's temp files were swept

        requests_before = server.requests.copy()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0
        # Complete: nothing is fetched; only the labels and negatives, remembered as absent, are asked about again.
        assert server.requests - requests_before == {f"/{SERVER_SEGMENTS}/{segment_id}_inklabels.png": 1,
                                                     f"/{SERVER_SEGMENTS}/{segment_id}_negatives.png": 1}
    assert_cache_holds_only_whole_chunks(cache, mirror, cache_host(server))
    # The server is stopped now: a fully cached segment opens and reads offline, without a warning.
    offline = open_segment(segment_id, cache_dir=cache, data_url=env["VESUVIUS_DATA_URL"], http_retries=0)
    assert np.array_equal(offline.volume[:, :, :], volume) and offline.inklabels is None


def test_download_of_unknown_segment_is_one_clear_line(tmp_path, server_layout):
    with LoopbackServer(server_layout.root) as server:
        env = {**os.environ, "SEGMENT_CACHE_DIR": str(tmp_path / "cache"), "VESUVIUS_DATA_URL": server.url}
        result = subprocess.run(["bash", str(REPO_ROOT / "download_segment.sh"), "20990101000000"], env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "20990101000000.zarr" in result.stderr
