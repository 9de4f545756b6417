"""What the cache and the experiment folders keep and delete (issue 23, faults 2, 3, 7, 8): temp files of live
writers survive every sweep, whoever and wherever they are; a kill in a layer conversion leaves nothing for good;
the cache stays within SEGMENT_CACHE_MAX_GB without evicting what a process holds."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile
import zarr
import zarr.core.sync

from pretrain.data import cache, download, remote, segment, volume
from pretrain.data.segment import open_segment
from pretrain.utils import misc, temporaries
from tests.conftest import REPO_ROOT
from tests.loopback_server import LoopbackServer
from tests.synthetic import (SERVER_LAYER_SEGMENT_ID, SERVER_PATHS, SERVER_SEGMENTS, random_volume, rectangle_mask,
                             write_server_segment)


class Holder:
    """Another process that runs `code`, then waits until stopped (it exits) or killed (it dies by SIGKILL, as in
    a kill -9; when this returns it is gone, its locks with it, even behind `unshare`)."""

    def __init__(self, code: str, prefix: list[str] | None = None) -> None:
        program = (textwrap.dedent(code) + "\nprint('ready', flush=True)\n"
                   "if sys.stdin.readline() == 'die\\n':\n    os.kill(os.getpid(), signal.SIGKILL)\n")
        self.process = subprocess.Popen([*(prefix or []), sys.executable, "-c", "import os, signal, sys\n" + program],
                                        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self.process.stdout.readline().strip()
        assert ready == "ready", ready

    def kill(self) -> None:
        self.process.stdin.write("die\n")
        self.process.stdin.close()
        self.process.wait()

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def other_pid_namespace() -> list[str]:
    """A prefix that runs a command in a PID namespace of its own (as in another container), where possible."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--pid", "--fork", "--map-root-user", "true"],
                                  capture_output=True).returncode == 0:
        return [unshare, "--pid", "--fork", "--map-root-user"]
    return []


# ---------------------------------------------------------------- fault 2: the cache's temp files


def test_a_live_download_of_another_pid_namespace_survives_the_sweep(tmp_path):
    """The old sweep read a PID from the temp file's name and asked the local kernel about it: a writer in another
    container or on another host looked dead, and its live download was deleted."""
    cache_dir = tmp_path / "cache"
    writer = Holder(f"""
        import pathlib
        from pretrain.data import remote
        temporary = remote._incomplete_path(pathlib.Path({str(cache_dir)!r}), "0.0.0")
        temporary.write_bytes(b"half a chunk")
        """, prefix=other_pid_namespace())
    try:
        incomplete = list((cache_dir / remote.INCOMPLETE_DIR).iterdir())
        assert len(incomplete) == 1 and str(os.getpid()) not in incomplete[0].name  # no PID in the name
        assert remote.sweep_incomplete(cache_dir) == 0
        remote.CachedHTTPStore("http://127.0.0.1:9", cache_dir)  # opening a store sweeps too
        assert incomplete[0].read_bytes() == b"half a chunk"
    finally:
        writer.kill()
    # Killed: the kernel dropped its lock, so the next sweep knows the file for a dead writer's.
    assert remote.sweep_incomplete(cache_dir) == 1
    assert not any((cache_dir / remote.INCOMPLETE_DIR).iterdir())


def test_the_sweep_leaves_files_it_did_not_write(tmp_path):
    incomplete = tmp_path / remote.INCOMPLETE_DIR
    incomplete.mkdir()
    (incomplete / "notes.txt").write_text("not ours")
    assert remote.sweep_incomplete(tmp_path) == 0 and (incomplete / "notes.txt").is_file()


# ---------------------------------------------------------------- fault 3: an experiment folder's temp files


def test_remove_stale_temporaries_deletes_only_our_dead_ones(tmp_path):
    experiment = tmp_path / "experiment"
    (experiment / "epochs").mkdir(parents=True)
    foreign = [experiment / ".x.tmp", experiment / ".notes.md.tmp", experiment / "epochs" / ".model.pth.123-abcd.tmp"]
    for path in foreign:
        path.write_text("someone else's")
    # A second run writing its checkpoint into the same folder, at this moment.
    second_run = Holder(f"""
        from pretrain.utils import temporaries
        path = temporaries.create_locked({str(experiment)!r}, "resnet50_withdecoder.pth")
        path.write_bytes(b"a checkpoint being written")
        """)
    # A run killed mid-write.
    killed_run = Holder(f"""
        from pretrain.utils import temporaries
        temporaries.create_locked({str(experiment / "epochs")!r}, "encoder_epoch3.pth")
        """)
    killed_run.kill()
    try:
        ours = sorted(path for path in experiment.rglob("*") if temporaries.is_temporary(path))
        assert len(ours) == 2
        assert misc.remove_stale_temporaries(experiment) == 1
        left = sorted(path for path in experiment.rglob("*") if temporaries.is_temporary(path))
        assert len(left) == 1 and left[0].parent == experiment
        assert left[0].read_bytes() == b"a checkpoint being written"
        assert all(path.read_text() == "someone else's" for path in foreign)
    finally:
        second_run.stop()
    assert misc.remove_stale_temporaries(experiment) == 1  # its writer is gone now


def test_every_atomic_writer_names_its_temp_files_by_the_one_rule(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def replace(source, destination):
        if pathlib.Path(destination).name in {"metrics.json", "model.pth", "0.0.0", volume.PROGRESS_FILE}:  # not zarr's
            seen.append(pathlib.Path(source))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    misc.write_bytes_atomic(tmp_path / "metrics.json", b"{}")
    misc.save_atomic({"weights": 1}, tmp_path / "model.pth")
    remote.write_to_cache(tmp_path / "cache" / "host" / "0.0.0", b"chunk", tmp_path / "cache")
    layers = [tmp_path / f"{index:02d}.tif" for index in range(2)]
    for index, path in enumerate(layers):
        tifffile.imwrite(path, np.full((8, 8), index, np.uint8))
    volume.convert_layers_to_zarr(layers, tmp_path / "layers.zarr", chunks=(1, 8, 8))  # a progress record a layer
    assert len(seen) == 5 and all(temporaries.is_temporary(path) for path in seen), seen
    assert not any(temporaries.is_temporary(path) for path in tmp_path.rglob("*"))


def test_a_conversion_resumed_after_a_kill_inside_its_progress_record_sweeps_the_dead_temp_file(tmp_path):
    layers = [tmp_path / f"{index:02d}.tif" for index in range(3)]
    for index, path in enumerate(layers):
        tifffile.imwrite(path, np.full((8, 8), index, np.uint8))
    volume.convert_layers_to_zarr(layers, tmp_path / "done.zarr", chunks=(1, 8, 8))
    partial = tmp_path / "resumed.zarr.partial"  # what a kill during the second layer's record leaves
    (tmp_path / "done.zarr").rename(partial)
    (partial / volume.PROGRESS_FILE).write_text("1")
    temporaries.temporary_path(partial, volume.PROGRESS_FILE).write_text("2")  # its writer is dead: no lock
    volume.convert_layers_to_zarr(layers, tmp_path / "resumed.zarr", chunks=(1, 8, 8))
    assert not any(temporaries.is_temporary(path) for path in tmp_path.rglob("*"))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "resumed.zarr", path="0")[:, 0, 0], [0, 1, 2])


# ---------------------------------------------------------------- fault 7: layer images left beside a conversion


def layer_cache_paths(cache_dir: pathlib.Path, server: LoopbackServer) -> tuple[pathlib.Path, pathlib.Path]:
    """(raw layer folder, converted zarr) of the layer segment in the cache."""
    layers_url = f"{segment.segment_folder_urls(SERVER_LAYER_SEGMENT_ID, '4', server.url)[0]}/layers"
    return remote.cache_path_for_url(cache_dir, layers_url), segment._converted_zarr_path(cache_dir, layers_url)


def test_layers_left_by_a_kill_after_the_conversion_are_deleted_on_reopening(server_layout, tmp_path):
    cache_dir = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache_dir, data_url=server.url)
        raw_folder, converted = layer_cache_paths(cache_dir, server)
        assert converted.is_dir() and not raw_folder.exists()
        # What a kill between the rename of layers.zarr and the clean-up leaves: all 65 layers and the progress record.
        shutil.copytree(server_layout.root / SERVER_PATHS["4"] / SERVER_LAYER_SEGMENT_ID / "layers", raw_folder)
        (converted / segment.PROGRESS_FILE).write_text("65")
        assert len(list(raw_folder.iterdir())) == 65
    reopened = open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache_dir, data_url=server.url,
                            http_retries=0)  # offline: the server is stopped
    assert not raw_folder.exists() and not (converted / segment.PROGRESS_FILE).exists()
    assert np.array_equal(reopened.volume[:, :, :], server_layout.layer_volume)


def test_a_layer_fetched_by_a_probe_while_another_process_converted_is_deleted(server_layout, tmp_path):
    """The race: this process probed (fetched 00.tif) outside the lock while another converted the segment; it
    then found the conversion done inside the lock and returned, leaving 00.tif for good."""
    cache_dir = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache_dir, data_url=server.url)
        raw_folder, converted = layer_cache_paths(cache_dir, server)
        fetcher = remote.CachedHTTPStore(server.url, cache_dir)
        layers_url = f"{segment.segment_folder_urls(SERVER_LAYER_SEGMENT_ID, '4', server.url)[0]}/layers"
        assert zarr.core.sync.sync(fetcher.download_url(f"{layers_url}/00.tif")) == raw_folder / "00.tif"
        assert segment._fetch_layer_segment(fetcher, SERVER_LAYER_SEGMENT_ID, layers_url, ".tif") == converted
    assert not raw_folder.exists()
    assert not temporaries._held_descriptors  # the streamed downloads' temp files were let go of


def test_download_segment_sh_deletes_a_stray_layer(server_layout, tmp_path):
    cache_dir = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache_dir, data_url=server.url)
        raw_folder, _ = layer_cache_paths(cache_dir, server)
        raw_folder.mkdir(parents=True)
        (raw_folder / "00.tif").write_bytes(b"a stray layer")
        result = subprocess.run(["bash", str(REPO_ROOT / "download_segment.sh"), SERVER_LAYER_SEGMENT_ID, "4"],
                                env={**os.environ, "SEGMENT_CACHE_DIR": str(cache_dir), "VESUVIUS_DATA_URL": server.url},
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not raw_folder.exists()


# ---------------------------------------------------------------- fault 8: a bounded cache

SEGMENT_ID = "20230601000000"
VOLUME_SHAPE = (32, 256, 256)  # (Z, Y, X)
CHUNKS = (4, 64, 64)  # 128 chunks of 16 KiB (random voxels: Blosc cannot shrink them)
BOUND_GB = 0.0008  # 800 kB: a third of the segment's 2.1 MB


@pytest.fixture
def served_segment(tmp_path):
    volume = random_volume(VOLUME_SHAPE, seed=5)
    write_server_segment(tmp_path / "mirror", SEGMENT_ID, volume, rectangle_mask(VOLUME_SHAPE[1:]), chunks=CHUNKS)
    np.save(tmp_path / "volume.npy", volume)
    return tmp_path / "mirror", tmp_path / "volume.npy"


def cache_bytes(cache_dir: pathlib.Path) -> int:
    return sum(unit.size for unit in cache.entries(cache_dir))


READER = """
    import numpy as np
    from pretrain.data.segment import open_segment
    volume = np.load({volume!r})
    segment = open_segment({segment_id!r}, cache_dir={cache!r}, data_url={url!r}, lru_bytes=0)
    for order in ({order}, list(reversed({order}))):  # every chunk twice: the second pass reads evicted ones again
        for z in order:
            assert np.array_equal(segment.volume[z:z + 4], volume[z:z + 4]), z
"""


def test_the_bound_holds_under_two_concurrent_readers(served_segment, tmp_path, monkeypatch):
    mirror, volume_path = served_segment
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv(cache.MAX_GB_VARIABLE, str(BOUND_GB))
    bound = int(BOUND_GB * 10**9)
    with LoopbackServer(mirror) as server:
        slabs = list(range(0, VOLUME_SHAPE[0], CHUNKS[0]))
        readers = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(READER).format(
            volume=str(volume_path), segment_id=SEGMENT_ID, cache=str(cache_dir), url=server.url, order=order)],
            cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True) for order in (slabs, slabs[::-1])]
        largest = 0
        while any(reader.poll() is None for reader in readers):
            largest = max(largest, cache_bytes(cache_dir))
            time.sleep(0.02)
        errors = [reader.stderr.read() for reader in readers]
        assert [reader.returncode for reader in readers] == [0, 0], errors
        chunk_requests = server.chunk_requests()
    chunk_bytes = max(unit.size for unit in cache.entries(cache_dir) if "/0/" in unit.path.as_posix())
    assert chunk_requests > 128  # evicted chunks were fetched again: the bound was reached
    assert cache_bytes(cache_dir) <= bound
    # Between a write and its eviction the cache is over by the writes under way: 8 requests per process at most.
    assert largest <= bound + 2 * 8 * chunk_bytes


def test_a_file_held_by_another_process_is_not_evicted(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    chunk_folder = cache_dir / "host" / SERVER_SEGMENTS / f"{SEGMENT_ID}.zarr" / "0"
    chunk_folder.mkdir(parents=True)
    for index in range(10):  # 10 files of 100 kB, used in the order of their names
        path = chunk_folder / f"{index}.0.0"
        path.write_bytes(bytes(100_000))
        os.utime(path, ns=(10**18 + index * 10**9, 10**18))
    reader = Holder(f"""
        import fcntl
        file = open({str(chunk_folder / "0.0.0")!r}, "rb")
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)  # as cache.read_held does while it reads
        """)
    try:
        assert cache.enforce_bound(cache_dir, 500_000) <= 500_000 * cache.EVICT_TO
        # The least recently used file is held: kept; the next ones in LRU order went instead.
        assert sorted(path.name for path in chunk_folder.iterdir()) == ["0.0.0", "7.0.0", "8.0.0", "9.0.0"]
    finally:
        reader.stop()
    assert cache.enforce_bound(cache_dir, 300_000) <= 300_000 * cache.EVICT_TO
    assert sorted(path.name for path in chunk_folder.iterdir()) == ["8.0.0", "9.0.0"]


def test_an_open_converted_segment_is_evicted_whole_or_not_at_all(server_layout, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache_dir, data_url=server.url)
        _, converted = layer_cache_paths(cache_dir, server)
        cache._held_for_life.pop(converted).close()  # this process lets it go; another opens it
        user = Holder(f"""
            from pretrain.data.segment import open_segment
            open_segment({SERVER_LAYER_SEGMENT_ID!r}, scroll="4", cache_dir={str(cache_dir)!r}, data_url={server.url!r})
            """)
    try:
        assert cache.enforce_bound(cache_dir, 1000) > 1000 and (converted / "zarr.json").is_file()
    finally:
        user.stop()
    files = sum(unit.files for unit in cache.entries(cache_dir) if unit.path == converted)
    assert files > 1
    cache.enforce_bound(cache_dir, 1000)
    assert not converted.exists() and not list(converted.parent.glob(".layers.zarr.removing-*"))


def test_reads_without_a_bound_keep_no_count(served_segment, tmp_path, monkeypatch):
    mirror, volume_path = served_segment
    monkeypatch.delenv(cache.MAX_GB_VARIABLE, raising=False)
    with LoopbackServer(mirror) as server:
        opened = open_segment(SEGMENT_ID, cache_dir=tmp_path / "cache", data_url=server.url)
        assert np.array_equal(opened.volume[:4], np.load(volume_path)[:4])
    assert not (tmp_path / "cache" / cache.SIZE_FILE).exists()


def test_a_bad_bound_is_one_line(tmp_path):
    result = subprocess.run(["bash", str(REPO_ROOT / "download_segment.sh"), SEGMENT_ID], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "SEGMENT_CACHE_DIR": str(tmp_path),
                                                        cache.MAX_GB_VARIABLE: "ten", "VESUVIUS_DATA_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert result.stderr.strip() == "error: SEGMENT_CACHE_MAX_GB='ten' is not a positive number of gigabytes (unset it for no bound)"


def test_a_bound_smaller_than_the_segment_names_the_size_it_needs_and_that_size_is_enough(served_segment, tmp_path):
    """It said "only 9 of its 17 chunks are in the cache … run it again", every time."""
    mirror, _ = served_segment
    with LoopbackServer(mirror) as server:
        environment = {**os.environ, "SEGMENT_CACHE_DIR": str(tmp_path / "cache"), "VESUVIUS_DATA_URL": server.url,
                       cache.MAX_GB_VARIABLE: str(BOUND_GB)}
        command = ["bash", str(REPO_ROOT / "download_segment.sh"), SEGMENT_ID]
        small = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
        assert small.returncode == 2
        errors = [line for line in re.split(r"[\r\n]", small.stderr) if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in small.stderr, small.stderr[-1000:]
        line = errors[0]
        assert line.startswith(f"error: segment {SEGMENT_ID} needs 0.003 GB in the cache"), line
        needed = line.split(f"set {cache.MAX_GB_VARIABLE} to ")[1].split(" or more")[0]
        assert float(needed) * 10**9 * cache.EVICT_TO >= 2.1e6
        enough = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                env={**environment, cache.MAX_GB_VARIABLE: needed})
        assert enough.returncode == 0 and "done: " in enough.stdout, enough.stderr[-1000:]


@pytest.mark.parametrize("value, bound", [("inf", None), (" 50 ", 50 * 10**9), ("1e-12", "less than one byte"),
                                          ("-1", "is not a positive number"), ("nan", "is not a positive number")])
def test_the_bound_accepts_inf_as_none_and_refuses_less_than_a_byte_in_one_line(monkeypatch, value, bound):
    monkeypatch.setenv(cache.MAX_GB_VARIABLE, value)
    if not isinstance(bound, str):
        assert cache.max_bytes() == bound
        return
    with pytest.raises(ValueError) as raised:
        cache.max_bytes()
    assert str(raised.value).startswith(f"{cache.MAX_GB_VARIABLE}={value.strip()!r} ") and bound in str(raised.value)


def test_download_segment_sh_accepts_every_option_its_help_lists(tmp_path, capsys):
    """`--help` listed --concurrency, and `--concurrency=2` failed ("argument --scroll: expected one argument"): the
    script passed its second word to --scroll."""
    script = ["bash", str(REPO_ROOT / "download_segment.sh")]
    shown = subprocess.run([*script, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "SCROLL" in shown.stdout
    options = set(re.findall(r"(--[a-z][a-z-]+)", shown.stdout)) - {"--help"}
    assert options == {"--scroll", "--concurrency", "--cache-dir"}
    # A malformed ID is refused after the parsing: that one line says every argument before it was understood.
    not_an_id = "error: segment ID 'x' is not one"
    result = subprocess.run([*script, "x", "4", "--concurrency=2", "--cache-dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(not_an_id), result.stderr
    for arguments in (["x", "--scroll", "4"], ["--concurrency", "2", "x", "4"], ["x", "--cache-dir", str(tmp_path)]):
        assert download.main(arguments) == 2  # the same parser, in this process
        assert capsys.readouterr().err.startswith(not_an_id)
    with pytest.raises(SystemExit) as exited:
        download.main(["x", "4", "--scroll", "2"])
    assert exited.value.code == 2 and "SCROLL 4 and --scroll 2 name two scrolls" in capsys.readouterr().err


def run_cache_tool(*arguments: str, cache_dir: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrain.data.cache", *arguments], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SEGMENT_CACHE_DIR": str(cache_dir)})


def test_the_cache_tool_lists_segments_and_removes_one(served_segment, server_layout, tmp_path):
    mirror, _ = served_segment
    cache_dir = tmp_path / "cache"
    with LoopbackServer(mirror) as server:
        opened = open_segment(SEGMENT_ID, cache_dir=cache_dir, data_url=server.url)
        opened.volume[:, :, :]
    with LoopbackServer(server_layout.root) as server:
        open_segment(SERVER_LAYER_SEGMENT_ID, scroll="4", cache_dir=cache_dir, data_url=server.url)
    cache._held_for_life.clear()  # as after this process ends
    sizes = cache.segment_sizes(cache_dir)
    assert set(sizes) == {SEGMENT_ID, SERVER_LAYER_SEGMENT_ID}
    listed = run_cache_tool("list", cache_dir=cache_dir)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split()[0] == SERVER_LAYER_SEGMENT_ID  # the larger first (65 × 300 × 260 uint16)
    assert lines[1].split()[:2] == [SEGMENT_ID, f"{sizes[SEGMENT_ID][0] / 10**9:.3f}"]
    assert lines[-1].startswith("total") and "no bound (SEGMENT_CACHE_MAX_GB unset)" in lines[-1]

    removed = run_cache_tool("remove", SERVER_LAYER_SEGMENT_ID, cache_dir=cache_dir)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith(f"removed segment {SERVER_LAYER_SEGMENT_ID}: ")
    assert set(cache.segment_sizes(cache_dir)) == {SEGMENT_ID}
    assert not (cache_dir / server.url.split("//")[1].replace(":", "_") / "full-scrolls" / "Scroll4").exists()
    again = run_cache_tool("remove", SERVER_LAYER_SEGMENT_ID, cache_dir=cache_dir)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "has no files in the cache" in again.stderr
