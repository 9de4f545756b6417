"""The repository is a package (pyproject.toml, installed by the lock's `-e .` line): no script patches sys.path."""
import subprocess

from tests.conftest import REPO_ROOT


def test_no_file_outside_tests_patches_the_import_path():
    found = subprocess.run(["git", "grep", "-n", "sys.path.insert", "--", ".", ":!tests"], cwd=REPO_ROOT,
                           capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", found.stdout + found.stderr  # 1: git grep found nothing


def test_every_entry_script_ends_through_the_one_error_exit():
    """A script run as `python X.py` (it has a __main__ block) installs pretrain/utils/errors.py's exit, so a user's
    mistake is one line and a bug names the file its traceback went to."""
    scripts = [path for folder in ("pretrain", "finetune", "evaluate", "benchmarks")
               for path in sorted((REPO_ROOT / folder).rglob("*.py")) if 'if __name__ == "__main__":' in path.read_text()]
    assert len(scripts) > 20
    without = [str(path.relative_to(REPO_ROOT)) for path in scripts if "errors.install(__file__" not in path.read_text()]
    assert without == []
