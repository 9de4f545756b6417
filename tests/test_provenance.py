"""Results name the code they come from: the commit, and a hash of uncommitted code changes."""
import subprocess

from pretrain.utils.misc import git_commit


def git(repository, *arguments):
    subprocess.run(["git", *arguments], cwd=repository, check=True, capture_output=True)


def test_commit_names_uncommitted_code_and_ignores_notes(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "model.py").write_text("WIDTH = 1\n")
    (tmp_path / "README.md").write_text("notes\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    clean = git_commit(tmp_path / "package")  # asked from a subfolder, as the scripts do
    assert clean and "dirty" not in clean and clean != "unknown"

    (tmp_path / "README.md").write_text("other notes\n")
    assert git_commit(tmp_path) == clean  # notes do not change a result

    (tmp_path / "package" / "model.py").write_text("WIDTH = 2\n")
    first = git_commit(tmp_path / "package")
    (tmp_path / "package" / "model.py").write_text("WIDTH = 3\n")
    second = git_commit(tmp_path)
    assert first.startswith(clean + "-dirty-") and second.startswith(clean + "-dirty-") and first != second

    (tmp_path / "package" / "model.py").write_text("WIDTH = 1\n")
    (tmp_path / "new_module.py").write_text("import package\n")  # untracked code counts too
    assert git_commit(tmp_path / "package").startswith(clean + "-dirty-")


def test_outside_a_checkout_is_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown"
