"""`python benchmarks/gpu_entry_points.py` on a machine without a GPU: it says so in one line and exits 0."""
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark measures (minutes)")
def test_without_a_gpu_it_says_so_and_measures_nothing():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_entry_points.py")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no GPU found (torch.cuda.is_available() is False): nothing measured; --smoke runs the tiny sequence here"]
