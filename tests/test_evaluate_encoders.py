"""The encoder evaluation command runs the probe for each encoder and seed under identical settings, scores each run
at a threshold chosen on its labelled tiles, and tabulates the seeds' spread and the paired difference from random."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.models import build_encoder
from tests.conftest import REPO_ROOT
from tests.conftest import FINETUNE_TINY as TINY


def test_evaluation_writes_table_csv_and_one_image_per_encoder(labelled_segment_path, tmp_path):
    torch.manual_seed(5)
    torch.save(build_encoder("resnet18_3d_tiny").state_dict(), tmp_path / "other_encoder.pth")
    pairs = list(zip(TINY[::2], TINY[1::2]))
    settings = [item for name, value in pairs if name not in ("--MODEL", "--DEPTH", "--TILE_SIZE") for item in (name, value)]
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "encoders.py"), "--pretrained_path", "random",
               str(tmp_path / "other_encoder.pth"), "--names", "random", "other", "--segment_id", str(labelled_segment_path),
               "--model", "resnet18_3d_tiny", "--depth", "8", "--tile_size", "32", "--seeds", "2", "--output",
               str(tmp_path / "evaluation"), "--", *settings]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "evaluation" / "encoders.csv")))
    assert [(row["encoder"], row["mode"], row["seeds"]) for row in rows] == [("random", "probe", "2"), ("other", "probe", "2")]
    runs = list(csv.DictReader(open(tmp_path / "evaluation" / "runs.csv")))
    assert sorted((run["encoder"], run["seed"]) for run in runs) == [("other", "0"), ("other", "1"), ("random", "0"),
                                                                      ("random", "1")]
    for run in runs:  # each run's scores are its whole-segment prediction's, as that run logged them
        records = [json.loads(line) for line in
                   open(tmp_path / "evaluation" / "runs" / f"{run['encoder']}_probe_seed{run['seed']}" / "log.jsonl")]
        epochs = [record for record in records if record["event"] == "epoch"]
        prediction = [record for record in records if record["event"] == "prediction"][-1]
        assert float(run["f05"]) == prediction["validation_calibrated_f05"]
        assert float(run["f05_oracle"]) == prediction["validation_f05"] >= float(run["f05"])
        # The weights scored are the last epoch's: no epoch is chosen by the loss on the band that is scored.
        assert int(run["best_epoch"]) == epochs[-1]["epoch"] and all(record["best"] for record in epochs)
        assert float(run["training_seconds"]) == epochs[-1]["training_seconds"] > 0  # the whole run's
    by_run = {(run["encoder"], run["seed"]): float(run["f05"]) for run in runs}
    other = rows[1]  # the paired difference from random, seed by seed
    differences = [by_run[("other", seed)] - by_run[("random", seed)] for seed in ("0", "1")]
    assert float(other["f05_difference"]) == pytest.approx(sum(differences) / 2)
    assert float(other["f05_difference_low"]) <= float(other["f05_difference"]) <= float(other["f05_difference_high"])
    table = (tmp_path / "evaluation" / "encoders.md").read_text()
    assert "| random | probe | 2 |" in table and "| other | probe | 2 |" in table
    for name in ("random_probe.png", "other_probe.png"):
        assert (tmp_path / "evaluation" / name).stat().st_size > 0
    assert list((tmp_path / "evaluation" / "tensorboard_logs").glob("events.out.tfevents.*"))
    # The probe really froze each encoder: the run's best checkpoint holds the encoder it was given.
    best = checkpoint.read(tmp_path / "evaluation" / "runs" / "other_probe_seed0" / "best.pth")
    given = torch.load(tmp_path / "other_encoder.pth")
    assert all(torch.equal(best["model"][f"encoder.{key}"], value) for key, value in given.items())
    # Both runs read tiles the same way, as the options said.
    for run in ("random_probe_seed0", "other_probe_seed1"):
        assert checkpoint.input_settings(checkpoint.read(tmp_path / "evaluation" / "runs" / run / "best.pth")) == \
            InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32)


def test_missing_encoder_checkpoint_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "encoders.py"), "--pretrained_path",
                             str(tmp_path / "nope.pth")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "nope.pth does not exist" in result.stderr
