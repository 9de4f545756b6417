"""`tensorboard --logdir experiments`, as the README says, starts and serves a run's scalars.

The break this catches came from the environment, not our code (tensorboard 2.20.0 imported pkg_resources,
which the setuptools that torch pulls in no longer ships), so the test runs the installed command line
and asks it over HTTP, on 127.0.0.1 only.
"""
import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pretrain.utils.misc import TensorboardLogger

STARTUP_DEADLINE_S = 120  # a generous bound for a loaded machine; the test returns as soon as tags are served
POLL_INTERVAL_S = 0.5


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scalar_tags(port: int) -> dict:
    """{run: {tag: ...}} from the scalars plugin; an empty opener so no proxy setting reroutes 127.0.0.1."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_command_line_serves_a_runs_scalar_tags(tmp_path):
    experiments = tmp_path / "experiments"
    logger = TensorboardLogger(experiments / "demo_run" / "tensorboard_logs")
    for step in range(3):
        logger.scalars(step, train__loss=1.0 / (step + 1), hp__lr=1e-3)
    logger.close()

    command = pathlib.Path(sys.executable).parent / "tensorboard"  # the entry point pip installed beside python
    assert command.is_file(), f"{command} is missing: tensorboard is not installed in this environment"
    port = free_local_port()
    stderr_path = tmp_path / "tensorboard.stderr"
    with open(stderr_path, "wb") as stderr_file:
        process = subprocess.Popen([str(command), "--logdir", str(experiments), "--host", "127.0.0.1",
                                    "--port", str(port)], stdout=subprocess.DEVNULL, stderr=stderr_file)
    try:
        tags, deadline = {}, time.monotonic() + STARTUP_DEADLINE_S
        # Until the server listens the request is refused; until the first load it answers {}.
        while "train/loss" not in tags.get("demo_run/tensorboard_logs", {}) and time.monotonic() < deadline:
            assert process.poll() is None, f"tensorboard exited with {process.returncode}:\n{stderr_path.read_text()[-3000:]}"
            time.sleep(POLL_INTERVAL_S)
            try:
                tags = scalar_tags(port)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                continue
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert set(tags) == {"demo_run/tensorboard_logs"}, f"{tags}\n{stderr_path.read_text()[-3000:]}"
    assert set(tags["demo_run/tensorboard_logs"]) == {"train/loss", "hp/lr"}
