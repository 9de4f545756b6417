"""The report command runs every step on a tiny configuration and writes a report that links its figures."""
import re
import subprocess
import sys

from tests.conftest import REPO_ROOT
from tests.conftest import FINETUNE_TINY as TINY


def test_report_runs_all_steps_and_writes_markdown_with_figures(labelled_segment_path, tmp_path):
    finetune_settings = [argument for argument in TINY if argument not in ("--MODEL", "resnet18_3d_tiny")]
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "report.py"), "--segment", str(labelled_segment_path),
               "--model", "resnet18_3d_tiny", "--spark_epochs", "2", "--vicreg_epochs", "1", "--vicreg_bs", "4",
               "--cka_every", "1", "--variant_epochs", "1",
               "--variants", "mask0.3=--mask 0.3", "zscore=--normalization zscore :: --NORMALIZATION zscore",
               "zscore_seed1=--normalization zscore --seed 1 :: --NORMALIZATION zscore",
               "--pretrain_args", "--depth 16 --input_size 64 --samples_per_ep 8 --decoder_width 32 --projector 64-64 "
                                  "--num_workers 0 --vis_every 0",
               "--finetune_args", " ".join(finetune_settings), "--feature_args", "--depth 16 --tile_size 32",
               "--work", str(tmp_path / "work"), "--notes", str(tmp_path / "notes" / "report.md"),
               "--images", str(tmp_path / "images")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "notes" / "report.md").read_text()
    for heading in ("## Frozen-encoder probe", "## Kinetics-700", "## CKA", "## Unsupervised ink map"):
        assert heading in report
    # spark_ep1, spark_mask0.3 and spark_zscore: what else was tried; supervised: the control
    for encoder in ("random", "spark", "vicreg", "spark_ep1", "spark_mask0.3", "supervised", "random_zscore",
                    "spark_zscore"):
        assert f"| {encoder} | probe |" in report
    # A variant probed its own way is compared with the random encoder probed that way, the others with random.
    assert "| spark_zscore | random_zscore |" in report and "| spark_mask0.3 | random |" in report
    # Another seed with the same probe settings shares that random probe instead of training it again.
    assert "| spark_zscore_seed1 | random_zscore |" in report and "random_zscore_seed1" not in report
    assert "| encoder | best component: F0.5 | its AUC | best k-means cluster: F0.5 | its AUC | linear probe: F0.5 |" in report
    assert re.search(r"\*\*On validation F0.5, the frozen SparK encoder \(default settings\) (beats|does not)", report)
    assert "| random and spark ep2 |" in report and "| spark ep1 and spark ep2 |" in report
    assert "2 epoch(s)" in report and "embedding std" in report  # both pretraining runs summarised
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) == 7  # 3 probes, the CKA heatmap, 3 ink maps
    for figure in figures:
        assert (tmp_path / "notes" / figure).resolve().stat().st_size > 0

    # A second run reuses every finished run: no pretraining epoch and no probe epoch is trained again.
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "epoch 1/" not in again.stderr
