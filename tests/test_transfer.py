"""evaluate/transfer.py asks VesuviusPretraining's two transfer questions with frozen-encoder probes: (a) trains on
the segments and the rest of the held-out one and scores only a band of it, (b) trains on the segments alone and
scores the whole held-out segment; its tables hold the runs' own recorded scores."""
import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from evaluate import encoder_input, report, transfer
from finetune.metrics import f05_at
from pretrain.data.segment import open_segment
from tests.conftest import DEMO_FAMILY_SHAPE, REPO_ROOT
from tests.conftest import FINETUNE_TINY as TINY


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_each_question_scores_its_held_out_pixels_and_the_tables_hold_the_runs_scores(demo_family_cache, tmp_path,
                                                                                         monkeypatch):
    pairs = list(zip(TINY[::2], TINY[1::2]))
    settings = [item for name, value in pairs if name not in ("--MODEL", "--DEPTH", "--TILE_SIZE", "--NUM_EPOCHS")
                for item in (name, value)]
    output = tmp_path / "transfer"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "transfer.py"), "--pretrained_path", "random",
                             "--segment_id", "demo:1", "demo:2", "--held_out", "demo:3", "--seeds", "1", "--model",
                             "resnet18_3d_tiny", "--depth", "8", "--tile_size", "32", "--output", str(output), "--",
                             *settings, "--NUM_EPOCHS", "1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "SEGMENT_CACHE_DIR": str(demo_family_cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(output / "transfer.csv")))
    assert [(row["question"], row["encoder"], row["seeds"]) for row in rows] == [("a", "random", "1"), ("b", "random", "1")]
    runs = {run["question"]: run for run in csv.DictReader(open(output / "runs.csv"))}
    table = (output / "transfer.md").read_text()
    monkeypatch.setenv("SEGMENT_CACHE_DIR", str(demo_family_cache))
    held_out = open_segment("demo:3")
    for row in rows:  # each number is the run's pooled held-out score, as the run logged it
        run_dir = output / f"question_{row['question']}" / "runs" / "random_probe_seed0"
        records = read_log(run_dir)
        pooled = [record for record in records if record["event"] == "pooled_prediction"][-1]
        run = runs[row["question"]]
        assert pooled["segments"] == ["demo_3"]
        assert float(run["f05"]) == pooled["validation_calibrated_f05"] == float(row["f05_mean"])
        assert float(run["auc"]) == pooled["validation_auc"] == float(row["auc_mean"])
        assert float(run["threshold"]) == pooled["validation_calibrated_threshold"]
        assert f"| random | probe | 1 | {pooled['validation_calibrated_f05']:.3f} " in table
        assert all(list(record["validation_segments"]) == ["demo_3"] for record in records if record["event"] == "epoch")
        segments = {item["name"]: item for item in records[0]["segments"]}
        assert segments["demo_1"]["held_out"] is None and segments["demo_2"]["held_out"] is None  # they train whole
        assert segments["demo_1"]["trains"] and segments["demo_2"]["trains"]
        band = segments["demo_3"]["held_out"]
        scored_yx = np.zeros(DEMO_FAMILY_SHAPE[1:], bool)
        scored_yx[band["y0"]:band["y1"], band["x0"]:band["x1"]] = True
        scored_yx &= held_out.mask
        assert pooled["validation_pixels"] == np.count_nonzero(scored_yx)
        prediction = cv2.imread(str(run_dir / "predictions" / "demo_3.png"), cv2.IMREAD_UNCHANGED) / 255.0
        rescored = f05_at(prediction[scored_yx], held_out.inklabels[scored_yx] > 0, pooled["validation_calibrated_threshold"])
        assert abs(rescored - pooled["validation_calibrated_f05"]) < 0.02
        assert (output / f"question_{row['question']}" / "random_probe.png").stat().st_size > 0
    # (a) trains on 70 % of demo:3 and scores only its band; (b) never trains on demo:3 and scores all of it.
    segments_a = {item["name"]: item for item in read_log(output / "question_a" / "runs" / "random_probe_seed0")[0]["segments"]}
    band = segments_a["demo_3"]["held_out"]
    assert segments_a["demo_3"]["trains"] and segments_a["demo_3"]["training_tiles"] > 0
    assert band["x1"] - band["x0"] == 64 and (band["y0"], band["y1"]) == (0, DEMO_FAMILY_SHAPE[1])  # 0.3 × 192
    segments_b = {item["name"]: item for item in read_log(output / "question_b" / "runs" / "random_probe_seed0")[0]["segments"]}
    assert not segments_b["demo_3"]["trains"] and segments_b["demo_3"]["training_tiles"] == 0


def test_the_supervised_control_trains_on_its_question_s_data_only(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(report, "run_step", lambda name, command, log=None: commands.append(command))
    args = transfer.parse_args(["--pretrained_path", "random", "--output", str(tmp_path)])
    settings = encoder_input.common_settings(["random"], args)
    for question in ("a", "b"):
        checkpoint = transfer.train_control(question, settings, args, ["--NUM_EPOCHS", "1"])
        assert checkpoint == str(tmp_path / f"question_{question}" / "control" / "supervised" / "best.pth")
    control_a, control_b = commands
    assert control_a[control_a.index("--segment_id"):][:9] == ["--segment_id", "demo:1", "demo:2", "demo:3", "demo:4",
                                                               "--VALIDATION_FRACTION", "0", "0", "0"]
    assert control_a[control_a.index("--VALIDATION_FRACTION") + 4] == "0.3"
    assert "--freeze_encoder" not in control_a  # full fine-tuning: an encoder that has seen labels
    assert control_b[control_b.index("--segment_id"):][:6] == ["--segment_id", "demo:1", "demo:2", "demo:3",
                                                               "--VALIDATION_SEGMENTS", "demo:4"]
    assert control_a[-2:] == control_b[-2:] == ["--NUM_EPOCHS", "1"]


@pytest.mark.parametrize("arguments, message", [
    (["--held_out", "demo:2"], "--held_out demo:2 is also in --segment_id"),
    (["--segment_id", "demo:1", "demo:1"], "--segment_id names demo:1 twice"),
    (["--names", "supervised", "--supervised_control"], "the name 'supervised' is the supervised control's"),
], ids=["held-out-trains", "twice", "control-name"])
def test_bad_inputs_are_one_line_naming_the_option(arguments, message):
    with pytest.raises(encoder_input.EvaluationError, match=message):
        transfer.parse_args(["--pretrained_path", "random", *arguments])
