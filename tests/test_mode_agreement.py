"""benchmarks/mode_agreement.py pairs a cheap curve mode's runs with full fine-tuning's run by run, and refuses to
pair runs that labelled other glyphs; --plot draws a panel per glyph count."""
import csv
import subprocess
import sys

import cv2

from tests.conftest import REPO_ROOT

FIELDS = ["name", "encoder", "glyphs", "seed", "mode", "round", "labelled_pixels", "f05", "auc"]


def write_runs(folder, mode: str, scores: dict, pixels: int = 900):
    folder.mkdir(parents=True)
    with open(folder / "runs.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, FIELDS)
        writer.writeheader()
        for (encoder, seed), (f05, auc) in scores.items():
            writer.writerow({"name": f"{encoder}_{mode}_k1_seed{seed}", "encoder": encoder, "glyphs": 1, "seed": seed,
                             "mode": mode, "round": 0, "labelled_pixels": pixels, "f05": f05, "auc": auc})


def agreement(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/mode_agreement.py", "--cheap", str(tmp_path / "frozen"), "--full",
                           str(tmp_path / "full"), *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def test_runs_pair_by_encoder_glyphs_and_seed(tmp_path):
    # seed 2 is frozen-only: not paired; at seed 3 both frozen arms score alike (a tie, no sign).
    write_runs(tmp_path / "frozen", "frozen", {("random", 0): (0.13, 0.50), ("spark", 0): (0.15, 0.55),
                                               ("random", 1): (0.13, 0.50), ("spark", 1): (0.12, 0.49),
                                               ("random", 2): (0.13, 0.5),
                                               ("random", 3): (0.131, 0.5), ("spark", 3): (0.131, 0.5)})
    write_runs(tmp_path / "full", "full", {("random", 0): (0.20, 0.60), ("spark", 0): (0.30, 0.70),
                                           ("random", 1): (0.20, 0.60), ("spark", 1): (0.25, 0.62),
                                           ("random", 3): (0.20, 0.60), ("spark", 3): (0.22, 0.60)})
    result = agreement(tmp_path, "--output", str(tmp_path / "agreement.md"), "--plot", str(tmp_path / "agreement.png"))
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(tmp_path / "agreement.png")).shape == (272, 256, 3)  # one panel: one glyph count
    assert "| spark | 1 | 0 | +0.020 | +0.100 | +0.050 | +0.100 | yes |" in result.stdout
    assert "| spark | 1 | 1 | -0.010 | +0.050 | -0.010 | +0.020 | no |" in result.stdout
    assert "| spark | 1 | 3 | +0.000 | +0.020 | +0.000 | +0.000 | tie |" in result.stdout
    assert "| spark | 1 | 3 | +0.003 | +0.057 |" in result.stdout
    assert "1 of 2 paired F0.5 differences have the same sign in both modes; 1 exactly 0 in one mode (no sign)." \
        in result.stdout
    assert "| random | 1 | 2 |" not in result.stdout
    assert (tmp_path / "agreement.md").read_text() == result.stdout


def test_runs_of_other_glyphs_are_not_paired(tmp_path):
    write_runs(tmp_path / "frozen", "frozen", {("random", 0): (0.13, 0.50)}, pixels=900)
    write_runs(tmp_path / "full", "full", {("random", 0): (0.20, 0.60)}, pixels=948)
    result = agreement(tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith(
        "run ('random', 1, 0): 900 labelled pixels in one output, 948 in the other: not the same glyphs")
