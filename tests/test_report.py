"""The report command runs every step on a tiny configuration, each step writes its results, the report is rendered
from them with its figures, a variant pretrained on other input is probed next to a random encoder read the same way,
and a rerun reuses every finished run."""
import json
import re
import subprocess
import sys

from tests.conftest import FINETUNE_TINY, REPO_ROOT


def test_report_runs_every_step_and_renders_from_the_results(labelled_segment_path, tmp_path):
    pairs = list(zip(FINETUNE_TINY[::2], FINETUNE_TINY[1::2]))
    finetune = [item for name, value in pairs if name not in ("--MODEL", "--DEPTH", "--TILE_SIZE") for item in (name, value)]
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "report.py"), "--segment_id", str(labelled_segment_path),
               "--model", "resnet18_3d_tiny", "--spark_epochs", "2", "--vicreg_epochs", "1", "--vicreg_bs", "4",
               "--cka_every", "1", "--variant_epochs", "1", "--variants", "zscore=--normalization zscore", "--glyphs", "1", "--seeds", "1", "--probe_seeds", "1", "--finetune_tile_size", "32",
               "--random_epochs_factor", "1", "--jobs", "2",
               "--curve_args", "--min_glyph_pixels 100 --score_part 0.4",
               "--pretrain_args", "--depth 16 --tile_size 64 --samples_per_ep 8 --decoder_width 32 --projector 64-64 "
                                  "--num_workers 0 --cpu_threads 1 --vis_every 0 --probe_every 0",  # the probe: tests/test_probe.py
               "--finetune_args", " ".join([*finetune, "--MIN_INK_FRACTION", "0.05"]),
               "--feature_args", "--tile_size 64", "--work", str(tmp_path / "work"),
               "--notes", str(tmp_path / "notes" / "report.md"), "--images", str(tmp_path / "images")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = {path.stem: json.loads(path.read_text()) for path in (tmp_path / "work" / "results").glob("*.json")}
    assert set(results) == {"run", "pretraining", "label_efficiency", "probes", "cka", "ink_maps"}
    # Each step records its command; VICReg (which standardises its views: zscore) and the zscore variant learnt on
    # other input than SparK and are probed in a group of their own, next to a random encoder read their way; SparK's
    # early encoder is probed with random and SparK.
    assert results["pretraining"]["spark_zscore"]["input"]["normalization"] == "zscore"
    groups = {group["baseline"]: [row["encoder"] for row in group["rows"]] for group in results["probes"]["groups"]}
    assert groups == {"random": ["random", "spark", "spark_ep1", "supervised"],
                      "random_vicreg": ["random_vicreg", "vicreg", "spark_zscore"]}
    assert all("--normalization zscore" in group["command"] for group in results["probes"]["groups"]
               if group["baseline"] == "random_vicreg")
    assert results["pretraining"]["vicreg"]["input"]["normalization"] == "zscore"
    curves, vicreg_curves = results["label_efficiency"]
    assert [(row["encoder"], row["glyphs"]) for row in curves["summary"]] == [("random", 1), ("spark", 1)]
    assert [(row["encoder"], row["glyphs"]) for row in vicreg_curves["summary"]] == [("random", 1), ("vicreg", 1)]
    assert {row["mode"] for row in curves["summary"] + vicreg_curves["summary"]} == {"frozen"}  # --curve_modes' default

    report = (tmp_path / "notes" / "report.md").read_text()
    for heading in ("## Few-label curves", "## Frozen-encoder probe", "## Kinetics-700", "## CKA",
                    "## Unsupervised ink map", "## What it means"):
        assert heading in report
    assert curves["verdict"] in report and vicreg_curves["verdict"] in report and "| spark_zscore | random_vicreg |" in report
    assert "| spark_ep1 | random |" in report and "| random and spark ep2 |" in report
    rows = {row["encoder"]: row for row in results["probes"]["groups"][0]["rows"]}
    assert f"| spark | random | 1 | {float(rows['spark']['f05_mean']):.3f} (" in report
    for step in ("pretraining", "cka"):  # the commands that measured each number are in the report
        commands = [value["command"] for value in results[step].values()] if step == "pretraining" else [results[step]["command"]]
        assert all(command in report for command in commands)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) == 9  # 2 curves (SparK's input, VICReg's), 3 probes, the CKA heatmap, 3 ink maps
    for figure in figures:
        assert (tmp_path / "notes" / figure).resolve().stat().st_size > 0

    # With --jobs 2 the pretraining runs went side by side, their output to <run>.log.
    assert sorted(log.name for log in (tmp_path / "work").glob("*.log")) == ["spark.log", "vicreg.log"]
    assert all("epoch 1/" in log.read_text() for log in (tmp_path / "work").glob("*.log"))

    # A second run starts none of the finished steps: 3 pretraining runs, 2 curve groups, the supervised control,
    # 2 probe groups, CKA and 3 ink maps. The report, rendered again from the same results by the renderer alone,
    # is the same.
    logs = {log: log.stat().st_mtime_ns for log in (tmp_path / "work").glob("*.log")}
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier with the same command and code") == 12, again.stdout
    assert "epoch 1/" not in again.stderr and {log: log.stat().st_mtime_ns for log in logs} == logs
    rendered = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "render_report.py"), "--results",
                               str(tmp_path / "work" / "results"), "--notes", str(tmp_path / "notes" / "again.md"),
                               "--images", str(tmp_path / "images")], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    assert (tmp_path / "notes" / "again.md").read_text() == (tmp_path / "notes" / "report.md").read_text()
