"""The repository is a package (pyproject.toml, installed by the lock's `-e .` line): no script patches sys.path."""
import subprocess

from tests.conftest import REPO_ROOT


def test_no_file_outside_tests_patches_the_import_path():
    found = subprocess.run(["git", "grep", "-n", "sys.path.insert", "--", ".", ":!tests"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", found.stdout + found.stderr  # 1: git grep found nothing
