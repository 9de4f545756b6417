"""Segments by ID from a loopback server laid out like the data server: cache, retries, faults, errors."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pretrain.data.remote import INCOMPLETE_DIR, RemoteReadError
from pretrain.data.segment import SegmentError, open_segment
from tests.conftest import REPO_ROOT, SERVER_SEGMENTS, random_volume, write_zarr_segment
from tests.loopback_server import LoopbackServer

FAST_RETRY = {"http_retries": 6, "http_backoff_seconds": 0.01}


def cached_chunk_files(cache_dir: pathlib.Path) -> list[pathlib.Path]:
    return [
        path for path in cache_dir.rglob("*")
        if path.is_file() and INCOMPLETE_DIR not in path.parts and "/0/" in path.as_posix()
        and not path.name.startswith(".") and not path.name.endswith(".absent")
    ]


def assert_cache_holds_only_whole_chunks(cache_dir: pathlib.Path, mirror: pathlib.Path, server_url_host: str):
    """Every cached chunk is byte-identical to the served file: nothing partial where the cache looks."""
    for path in cached_chunk_files(cache_dir):
        relative = path.relative_to(cache_dir / server_url_host)
        assert path.read_bytes() == (mirror / relative).read_bytes(), f"partial or wrong chunk {relative}"


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_first_read_fetches_and_a_second_process_fetches_no_chunk(server_mirror, tmp_path):
    mirror, segment_id, volume = server_mirror
    cache = tmp_path / "cache"
    with LoopbackServer(mirror) as server:
        segment = open_segment(segment_id, cache_dir=cache, data_url=server.url)
        assert segment.source == "remote" and segment.shape == volume.shape
        assert segment.mask.sum() == (200 - 20) * (170 - 20) and segment.inklabels.sum() == 30 * 80
        assert np.array_equal(segment.volume[:, :, :], volume)
        first_run_chunks = server.chunk_requests()
        assert first_run_chunks == 3 * 4 * 3  # every chunk of (65, 200, 170) in (32, 64, 64) chunks, once
        code = (
            "import numpy as np; from pretrain.data.segment import open_segment; "
            f"s = open_segment('{segment_id}'); print(int(s.volume[:, :, :].astype(np.int64).sum()))"
        )
        result = run_python(code, {"VESUVIUS_DATA_URL": server.url, "SEGMENT_CACHE_DIR": str(cache)})
        assert result.returncode == 0, result.stderr
        assert int(result.stdout.strip()) == int(volume.astype(np.int64).sum())
        assert server.chunk_requests() == first_run_chunks  # the second process fetched zero chunks


def test_injected_faults_are_recovered_and_data_is_identical(server_mirror, tmp_path):
    mirror, segment_id, volume = server_mirror
    faults = {"429": 0.1, "500": 0.1, "truncate": 0.1, "drop": 0.1}
    with LoopbackServer(mirror, faults=faults, seed=3) as server:
        segment = open_segment(segment_id, cache_dir=tmp_path / "cache", data_url=server.url, **FAST_RETRY)
        assert np.array_equal(segment.volume[:, :, :], volume)
        assert set(server.fault_counts) == set(faults), server.fault_counts  # every fault kind happened
        host = server.url.split("//")[1].replace(":", "_")
    assert_cache_holds_only_whole_chunks(tmp_path / "cache", mirror, host)


def test_concurrency_is_bounded(server_mirror, tmp_path):
    mirror, segment_id, volume = server_mirror
    with LoopbackServer(mirror, chunk_delay_seconds=0.05) as server:
        segment = open_segment(segment_id, cache_dir=tmp_path / "cache", data_url=server.url, http_concurrency=3)
        segment.volume[:, :, :]
        assert 1 < server.max_active <= 3


def test_unknown_segment_id_names_url_and_scroll(server_mirror, tmp_path):
    mirror, _, _ = server_mirror
    with LoopbackServer(mirror) as server:
        with pytest.raises(SegmentError) as error:
            open_segment("20990101000000", cache_dir=tmp_path / "cache", data_url=server.url)
    message = str(error.value)
    assert f"{server.url}/{SERVER_SEGMENTS}/20990101000000.zarr" in message and "scroll=1" in message
    assert "\n" not in message
    assert not cached_chunk_files(tmp_path / "cache")


def test_unreachable_server_fails_after_retries(tmp_path):
    with pytest.raises(SegmentError, match=r"cannot read http://127\.0\.0\.1:9/.* after 3 attempts"):
        open_segment("20230827161847", cache_dir=tmp_path / "cache", data_url="http://127.0.0.1:9",
                     http_retries=2, http_backoff_seconds=0.01)


def test_chunk_that_keeps_failing_names_its_url(server_mirror, tmp_path):
    mirror, segment_id, _ = server_mirror
    with LoopbackServer(mirror) as server:
        segment = open_segment(segment_id, cache_dir=tmp_path / "cache", data_url=server.url, http_retries=2,
                               http_backoff_seconds=0.01)
        bad_chunk = f"/{SERVER_SEGMENTS}/{segment_id}.zarr/0/1/1/1"
        server.permanent_status[bad_chunk] = 503
        with pytest.raises(RemoteReadError, match=f"cannot read {server.url}{bad_chunk} after 3 attempts"):
            segment.volume[32:64, 64:128, 64:128]
        assert server.requests[bad_chunk] == 3
    assert not (tmp_path / "cache" / server.url.split("//")[1].replace(":", "_") / bad_chunk.lstrip("/")).exists()


@pytest.mark.filterwarnings("ignore:.*no mask found")
def test_download_killed_midway_leaves_no_partial_chunk_and_resumes(tmp_path):
    segment_id = "20230827161847"
    volume = random_volume((65, 256, 256), seed=5)
    mirror = tmp_path / "mirror"
    write_zarr_segment(mirror / SERVER_SEGMENTS / f"{segment_id}.zarr", volume, zarr_format=2, slash_keys=True,
                       chunks=(16, 32, 32))
    total_chunks = 5 * 8 * 8
    cache = tmp_path / "cache"
    env = {**os.environ, "SEGMENT_CACHE_DIR": str(cache)}
    with LoopbackServer(mirror, chunk_delay_seconds=0.02) as server:
        env["VESUVIUS_DATA_URL"] = server.url
        command = ["bash", str(REPO_ROOT / "download_segment.sh"), segment_id]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while server.chunk_requests() < 40 and time.time() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        host = server.url.split("//")[1].replace(":", "_")
        cached_after_kill = len(cached_chunk_files(cache))
        assert 0 < cached_after_kill < total_chunks
        assert_cache_holds_only_whole_chunks(cache, mirror, host)

        requests_before = server.chunk_requests()
        resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        assert "downloading" in resumed.stderr  # tqdm's bar
        assert server.chunk_requests() - requests_before == total_chunks - cached_after_kill
        assert len(cached_chunk_files(cache)) == total_chunks
        assert not any((cache / INCOMPLETE_DIR).iterdir())  # the killed run's temp files were swept

        requests_before = server.chunk_requests()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0 and server.chunk_requests() == requests_before  # complete: fetches nothing
    assert_cache_holds_only_whole_chunks(cache, mirror, host)
    # The server is stopped now: a fully cached segment opens and reads offline.
    with pytest.warns(UserWarning, match="server did not answer"):  # it has no label PNGs to fetch
        offline = open_segment(segment_id, cache_dir=cache, data_url=env["VESUVIUS_DATA_URL"], http_retries=0)
    assert np.array_equal(offline.volume[:, :, :], volume)


def test_download_of_unknown_segment_is_one_clear_line(tmp_path, server_mirror):
    mirror, _, _ = server_mirror
    with LoopbackServer(mirror) as server:
        env = {**os.environ, "SEGMENT_CACHE_DIR": str(tmp_path / "cache"), "VESUVIUS_DATA_URL": server.url}
        result = subprocess.run(["bash", str(REPO_ROOT / "download_segment.sh"), "20990101000000"], env=env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "20990101000000.zarr" in result.stderr
