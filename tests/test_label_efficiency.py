"""Few-label fine-tuning curves: glyph choice is reproducible and never near the scoring region; thresholds are
chosen on the calibration strip; the verdict follows the paired statistics; a tiny run of the command writes the
table, CSV, plot and each run's prediction, a rerun reuses every finished run of the same code, and a run of other
code or inputs is run again with the earlier one kept (fine-tuned and frozen runs alike)."""
import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import scipy.ndimage
import torch

from evaluate import label_efficiency, statistics, verdict_rule
from finetune import inference
from finetune.model import build_ink_unet
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.data.segment import open_segment
from pretrain.models import build_encoder
from tests.conftest import FINETUNE_TINY, REPO_ROOT


def test_glyph_sets_are_reproducible_nested_and_far_from_the_scoring_region(labelled_segment_path):
    segment = open_segment(labelled_segment_path)
    regions = label_efficiency.regions(segment, label_part=0.4, score_part=0.4, tile_size=32)
    found = label_efficiency.glyphs(segment.inklabels, regions.label_yx, min_pixels=100)
    assert len(found) == 6  # the 16 × 10 blocks wholly left of x = 76: two columns of three
    for seed in (0, 1):
        sets = [label_efficiency.glyph_labels(found, segment.shape[1:], seed, count) > 0 for count in (1, 2, 4)]
        again = label_efficiency.glyph_labels(found, segment.shape[1:], seed, 4) > 0
        assert np.array_equal(sets[2], again)
        assert [scipy.ndimage.label(labels)[1] for labels in sets] == [1, 2, 4]
        assert (sets[0] <= sets[1]).all() and (sets[1] <= sets[2]).all()  # each seed's sets grow with k
        assert (sets[2] <= segment.inklabels.astype(bool)).all() and (sets[2] <= regions.label_yx).all()
        # Every scored pixel lies at least the gap (1 - 0.4 - 0.4 of the width) away from every labelled one.
        distance_yx = scipy.ndimage.distance_transform_edt(~sets[2])
        assert distance_yx[regions.score_yx].min() >= 0.2 * 192 - 1
    assert not np.array_equal(label_efficiency.glyph_labels(found, segment.shape[1:], 0, 2),
                              label_efficiency.glyph_labels(found, segment.shape[1:], 1, 2))
    assert regions.score_yx.any() and not (regions.score_yx & ~segment.mask).any()
    # Chance is F0.5 of calling every scored pixel ink: precision = its ink fraction q, recall = 1.
    q = segment.inklabels[regions.score_yx].astype(bool).mean()
    assert 0 < q < 1 and regions.chance_f05 == pytest.approx(1.25 * q / (0.25 * q + 1))


def test_curves_are_written_and_a_rerun_reuses_every_run(labelled_segment_path, tmp_path):
    torch.manual_seed(4)
    checkpoint.save(tmp_path / "pretrained.pth", "encoder", build_encoder("resnet18_3d_tiny").state_dict(),
                    InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32))
    pairs = list(zip(FINETUNE_TINY[::2], FINETUNE_TINY[1::2]))
    finetune = [item for name, value in pairs if name not in ("--MODEL", "--DEPTH", "--TILE_SIZE") for item in (name, value)]
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--pretrained_path", "random",
               str(tmp_path / "pretrained.pth"), "--names", "random", "pretrained", "--segment_id",
               str(labelled_segment_path), "--glyphs", "1", "2", "--seeds", "1", "--label_part", "0.4", "--score_part",
               "0.4", "--min_glyph_pixels", "100", "--jobs", "2", "--random_epochs_factor", "2", "--output",
               str(tmp_path / "curves"), "--", *finetune]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # One seed shows no gain (p 0.5): no cell can be claimed, so the longer random arm trains nowhere.
    assert "random_x2: at glyph count(s) none" in result.stdout
    curves = tmp_path / "curves"
    runs = list(csv.DictReader(open(curves / "runs.csv")))
    assert all(float(row["cpu_seconds"]) > 0 for row in runs)
    assert sorted((row["encoder"], row["glyphs"]) for row in runs) == [
        ("pretrained", "1"), ("pretrained", "2"), ("random", "1"), ("random", "2")]
    segment = open_segment(labelled_segment_path)
    scoring = label_efficiency.regions(segment, 0.4, 0.4, 32).score_yx
    calibration = label_efficiency.regions(segment, 0.4, 0.4, 32).calibration_yx
    ink = segment.inklabels > 0
    for row in runs:  # the threshold comes from the calibration strip, the score from the scoring region
        prediction = cv2.imread(str(curves / "runs" / row["name"] / "prediction.png"), cv2.IMREAD_UNCHANGED) / 255.0
        threshold = label_efficiency.best_threshold(prediction[calibration], ink[calibration])
        assert float(row["threshold"]) == threshold
        assert float(row["f05"]) == label_efficiency.f05_at(prediction[scoring], ink[scoring], threshold)
        oracle = label_efficiency.ink_metrics(prediction[scoring], ink[scoring])
        assert float(row["f05_oracle"]) == oracle.f05 and float(row["auc"]) == oracle.auc
        assert int(row["scored_pixels"]) == scoring.sum() and int(row["labelled_pixels"]) == 160 * int(row["glyphs"])
        assert row["code"].split("-")[0] == label_efficiency.git_commit().split("-")[0] and row["code"] == runs[0]["code"]
    summary = list(csv.DictReader(open(curves / "label_efficiency.csv")))
    assert len(summary) == 4 and all(row["f05_min"] == row["f05_max"] == row["f05_mean"] for row in summary)  # one seed
    table = (curves / "label_efficiency.md").read_text()
    assert "| random | full |" in table and "| pretrained | full |" in table and "No-skill band" in table
    # One seed gives no interval: whatever the scores, the answer is inconclusive, never "no".
    assert "Does a pretrained encoder, fine-tuned, find ink with fewer labels? **Inconclusive**" in table
    assert (curves / "label_efficiency.png").read_bytes().startswith(b"\x89PNG")

    log = curves / "runs" / "random_full_k1_seed0" / "train.log"
    before = log.stat().st_mtime_ns
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log.stat().st_mtime_ns == before and list(csv.DictReader(open(curves / "runs.csv"))) == runs

    assert label_efficiency.earlier_run(log.parent, json.loads((log.parent / "result.json").read_text())["key"],
                                        reuse_other_code=False) is not None


def test_frozen_runs_read_each_encoder_s_features_once_with_the_same_glyphs_and_scores(labelled_segment_path, tmp_path):
    torch.manual_seed(4)
    checkpoint.save(tmp_path / "pretrained.pth", "encoder", build_encoder("resnet18_3d_tiny").state_dict(),
                    InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32))
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--pretrained_path", "random",
               str(tmp_path / "pretrained.pth"), "--names", "random", "pretrained", "--segment_id",
               str(labelled_segment_path), "--glyphs", "1", "2", "--seeds", "2", "--label_part", "0.4", "--score_part",
               "0.4", "--min_glyph_pixels", "100", "--modes", "frozen", "--random_epochs_factor", "2",
               "--output", str(tmp_path / "curves")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list(csv.DictReader(open(tmp_path / "curves" / "runs.csv")))
    assert sorted((row["encoder"], row["mode"], row["glyphs"], row["seed"]) for row in runs) == sorted(
        (encoder, "frozen", glyphs, seed) for encoder in ("random", "pretrained") for glyphs in "12" for seed in "01")
    # Features once per encoder, and once per seed for random, whose seed is its initialisation.
    computed = sorted((row["encoder"], row["seed"]) for row in runs if float(row["feature_cpu_seconds"]) > 0)
    assert computed[:1] == [("pretrained", computed[0][1])] and computed[1:] == [("random", "0"), ("random", "1")]
    segment = open_segment(labelled_segment_path)
    scoring = label_efficiency.regions(segment, 0.4, 0.4, 32)
    for row in runs:  # scored as every run is: the calibrated threshold, the scored region
        prediction = cv2.imread(str(tmp_path / "curves" / "runs" / row["name"] / "prediction.png"), cv2.IMREAD_UNCHANGED)
        assert not prediction[~(scoring.calibration_yx | scoring.score_yx)].any()
        assert float(row["f05"]) == label_efficiency.scores(prediction / 255.0, segment, scoring)["f05"]
    table = (tmp_path / "curves" / "label_efficiency.md").read_text()
    assert "| pretrained | frozen |" in table
    assert "Does a pretrained encoder, read frozen by a linear probe, find ink with fewer labels?" in table

    # A rerun reuses every run of the same key without computing any encoder's features ...
    assert "encoding tiles" in result.stderr
    predictions = {row["name"]: tmp_path / "curves" / "runs" / row["name"] / "prediction.png" for row in runs}
    written = {name: path.stat().st_mtime_ns for name, path in predictions.items()}
    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "encoding tiles" not in again.stderr and list(csv.DictReader(open(tmp_path / "curves" / "runs.csv"))) == runs
    assert {name: path.stat().st_mtime_ns for name, path in predictions.items()} == written
    # ... and other weights at the same path run the pretrained encoder's runs again, the earlier ones kept aside.
    torch.manual_seed(5)
    checkpoint.save(tmp_path / "pretrained.pth", "encoder", build_encoder("resnet18_3d_tiny").state_dict(),
                    InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32))
    changed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert changed.returncode == 0, changed.stderr[-3000:]
    rerun = {name for name, path in predictions.items() if path.stat().st_mtime_ns != written[name]}
    assert rerun == {name for name in predictions if name.startswith("pretrained")}
    assert sorted(path.name for path in (tmp_path / "curves" / "runs" / ".superseded").iterdir()) == sorted(
        f"{name}-1" for name in rerun)
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="--modes frozen"):
        label_efficiency.parse_args(["--pretrained_path", "random", "--modes", "frozen", "--self_training_rounds", "1"])


def test_runs_predict_only_where_predictions_are_read_and_read_the_same(labelled_segment_path):
    segment = open_segment(labelled_segment_path)
    scoring = label_efficiency.regions(segment, 0.4, 0.4, 32)
    region_yx = label_efficiency.predicted_region(scoring) > 0
    assert (region_yx == (scoring.calibration_yx | scoring.score_yx)).all() and region_yx.sum() < 0.7 * segment.mask.sum()
    torch.manual_seed(0)
    model = build_ink_unet("resnet18_3d_tiny").eval()
    settings = InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32)
    whole_yx, part_yx = (inference.predict_segment(model, segment, where_yx, settings, 16, 4, torch.device("cpu"))
                         for where_yx in (segment.mask, region_yx))
    assert not part_yx[~region_yx].any()
    np.testing.assert_allclose(part_yx[region_yx], whole_yx[region_yx], atol=1e-6)  # the same tiles cover each pixel
    whole, part = (label_efficiency.scores(map_yx, segment, scoring) for map_yx in (whole_yx, part_yx))
    assert part["auc"] == pytest.approx(whole["auc"], abs=1e-6) and part["threshold"] == whole["threshold"]


def test_a_run_of_other_code_or_inputs_is_kept_aside_and_run_again(tmp_path, capsys):
    folder = tmp_path / "runs" / "random_full_k1_seed0"
    folder.mkdir(parents=True)
    key = {"code": "0ldc0de", "inputs": ["--SEED", "0"]}
    (folder / "result.json").write_text(json.dumps({"command": ["python"], "key": key, "code": "0ldc0de", "f05": 0.5}))
    (folder / "prediction.png").write_bytes(b"earlier")
    assert label_efficiency.earlier_run(folder, key, reuse_other_code=False)["f05"] == 0.5
    other_code = {**key, "code": "n3wc0de"}
    assert label_efficiency.earlier_run(folder, other_code, reuse_other_code=True)["f05"] == 0.5
    other_inputs = {**key, "inputs": ["--SEED", "0", "--LR", "1"]}
    assert label_efficiency.earlier_run(folder, other_inputs, reuse_other_code=True) is None  # inputs always count
    assert "random_full_k1_seed0 ran with other code or inputs: running it again" in capsys.readouterr().out
    assert json.loads((folder / "key.json").read_text()) == other_inputs and not (folder / "result.json").exists()
    aside = tmp_path / "runs" / ".superseded" / "random_full_k1_seed0-1"
    assert (aside / "prediction.png").read_bytes() == b"earlier"
    # A killed run of the same key is left to continue; one of another key is set aside too.
    (folder / "last.pth").write_bytes(b"half")
    assert label_efficiency.earlier_run(folder, other_inputs, reuse_other_code=False) is None
    assert (folder / "last.pth").read_bytes() == b"half"
    assert label_efficiency.earlier_run(folder, other_code, reuse_other_code=False) is None
    assert not (folder / "last.pth").exists()
    # Unfinished work has no result to reuse: no --reuse_other_code hint.
    assert capsys.readouterr().out.strip().endswith(
        "holds unfinished work or work without a key: running it afresh (kept in "
        f"{tmp_path / 'runs' / '.superseded' / 'random_full_k1_seed0-2'})")
    assert (tmp_path / "runs" / ".superseded" / "random_full_k1_seed0-2" / "last.pth").read_bytes() == b"half"


def test_paired_interval_sign_flip_and_holm():
    differences = [0.10, 0.12, 0.08, 0.11, 0.09, 0.13, 0.10, 0.07]
    mean, low, high = statistics.paired_interval(differences)
    assert mean == pytest.approx(0.1) and 0 < low < mean < high
    # Every one of 8 seeds gains: only the identity of the 256 sign patterns is as extreme.
    assert statistics.sign_flip_p(differences) == 1 / 256
    assert statistics.sign_flip_p(differences, 0.05, "less") == 1.0
    assert statistics.sign_flip_p([-value for value in differences]) == 1.0
    # A run that took off moves the statistic by its rank, not its size: one huge loss among seven gains.
    # Ranks: the seven ties 4 each, the loss 8; a pattern is as extreme when its negative ranks sum to at most 8.
    assert statistics.sign_flip_p([0.1] * 7 + [-0.5]) == (1 + 7 + 21 + 1) / 256
    assert statistics.holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]  # 0.01 ≤ 0.05/3; 0.03 > 0.05/2
    assert statistics.holm([0.01, 0.02, 0.04], 0.05) == [True, True, True]


def paired_results(encoder_scores, random_scores, glyphs=1, random_name="random"):
    return ([{"encoder": "spark", "mode": "full", "glyphs": glyphs, "seed": seed, "f05": score}
             for seed, score in enumerate(encoder_scores)]
            + [{"encoder": random_name, "mode": "full", "glyphs": glyphs, "seed": seed, "f05": score}
               for seed, score in enumerate(random_scores)])


def test_verdict_follows_the_paired_comparisons_and_the_longer_random_arm():
    band = label_efficiency.NoSkillBand(chance_f05=0.13, blind_mean=0.12, blind_p95=0.15, oracle_mean=0.15, oracle_p95=0.16)
    random_f05 = [0.20, 0.25, 0.18, 0.22, 0.30, 0.21, 0.19, 0.24]
    better = [score + gain for score, gain in zip(random_f05, [0.10, 0.12, 0.08, 0.11, 0.09, 0.13, 0.10, 0.07])]
    compared = label_efficiency.comparisons(paired_results(better, random_f05))
    assert [row["claim"] for row in compared] == ["yes"] and compared[0]["p_gain"] == 1 / 256
    assert label_efficiency.verdict(compared, band).startswith("**Yes**")
    assert "Holm's step-down across the 1 cell(s)" in label_efficiency.verdict(compared, band)
    # Holm across cells: the same evidence at 2 glyphs too is a second cell; 1/256 still clears 0.05/2.
    two_cells = label_efficiency.comparisons(paired_results(better, random_f05)
                                             + paired_results(better, random_f05, glyphs=2))
    assert [row["claim"] for row in two_cells] == ["yes", "yes"]
    # A small alpha (the report's share) that 1/256 does not clear leaves the gain unclaimed: inconclusive.
    assert [row["claim"] for row in label_efficiency.comparisons(paired_results(better, random_f05), 0.003)] == \
        ["inconclusive"]
    # An arm named `scratch`, as older code named random (an older command's --names, or the runs it left), is
    # still the baseline, not one more pretrained encoder.
    older = label_efficiency.comparisons(paired_results(better, random_f05, random_name="scratch"))
    assert [(row["encoder"], row["against"], row["claim"]) for row in older] == [("spark", "scratch", "yes")]
    # A random arm with twice the epochs that catches up takes the win away, and rules out a gain over it.
    longer = [{"encoder": "random_x2", "mode": "full", "glyphs": 1, "seed": seed, "f05": score}
              for seed, score in enumerate(better)]
    compared = label_efficiency.comparisons(paired_results(better, random_f05) + longer)
    assert sorted(row["against"] for row in compared) == ["random", "random_x2"]
    assert label_efficiency.verdict(compared, band).startswith("**No**")
    # One seed with both arms at chance: inconclusive, not "no".
    compared = label_efficiency.comparisons(paired_results([0.13], [0.13]))
    assert label_efficiency.verdict(compared, band).startswith("**Inconclusive**")
    # A significant gain below the goal's margin, or beyond its glyphs, is only suggestive.
    small = [score + 0.02 + 0.001 * seed for seed, score in enumerate(random_f05)]
    assert [row["claim"] for row in label_efficiency.comparisons(paired_results(small, random_f05))] == ["suggestive"]
    assert [row["claim"] for row in label_efficiency.comparisons(paired_results(better, random_f05, glyphs=8))] == \
        ["suggestive"]


def test_the_longer_random_arm_trains_only_where_a_cell_can_be_claimed():
    random_f05 = [0.20, 0.25, 0.18, 0.22, 0.30, 0.21, 0.19, 0.24]
    better = [score + gain for score, gain in zip(random_f05, [0.10, 0.12, 0.08, 0.11, 0.09, 0.13, 0.10, 0.07])]
    # About random at 2 glyphs: a gain of 0.05 ruled out with p 0.039 (10 of 256 sign patterns), no gain shown.
    alike = [score + difference for score, difference in
             zip(random_f05, [-0.033, -0.019, 0.025, 0.063, -0.008, 0.082, -0.04, 0.021])]
    stage_one = paired_results(better, random_f05) + paired_results(alike, random_f05, glyphs=2)
    assert label_efficiency.claimable_counts(stage_one, 0.05) == [1]
    assert label_efficiency.claimable_counts(stage_one, 0.003) == []  # 1/256 does not clear a smaller share
    # The longer arm at 1 glyph only. At 2 glyphs "no" is judged as if that arm were there: p 0.039 does not clear
    # ALPHA over 2 arms, as it would with one; and the claims where it ran are those of the whole design.
    longer = [{"encoder": "random_x2", "mode": "full", "glyphs": 1, "seed": seed, "f05": score}
              for seed, score in enumerate(random_f05)]
    claims = {row["glyphs"]: row["claim"] for row in label_efficiency.comparisons(stage_one + longer, 0.05, 2)}
    assert claims == {1: "yes", 2: "inconclusive"}
    assert {row["glyphs"]: row["claim"] for row in label_efficiency.comparisons(stage_one, 0.05, 1)}[2] == "no"
    # Where the longer arm ran nowhere, the same holds.
    alone = paired_results(alike, random_f05, glyphs=2)
    assert [row["claim"] for row in label_efficiency.comparisons(alone, 0.05, 2)] == ["inconclusive"]


def test_the_simulated_rule_keeps_its_error_rates_for_the_report_s_design():
    """The rule under the report's design (SparK and VICReg in groups of their own, 1, 2, 4 glyphs, random and
    random_x2) with noise drawn from measured runs: rarely a false claim, "yes" when every run gains +0.10 at 1–2
    glyphs, and "no" reachable under a harm. A small simulation: the command's own uses thousands of reports."""
    design = verdict_rule.Design(seeds=(20, 20, 20))
    assert verdict_rule.Design().seeds == design.seeds  # the seed count the simulation chose is the default design's
    none = verdict_rule.simulate(design, "none", 120, seed=1)
    assert np.mean(none >= verdict_rule.CLAIMS.index("suggestive")) <= 0.05
    assert np.mean(verdict_rule.simulate(design, "shift", 80, seed=2) == verdict_rule.CLAIMS.index("yes")) >= 0.7
    assert np.mean(verdict_rule.simulate(design, "harm", 80, seed=3) == verdict_rule.CLAIMS.index("no")) > 0
    # The old rule's trap: a mean of +0.05 in one cell of 3 seeds is no claim at all.
    assert not (verdict_rule.simulate(verdict_rule.Design(seeds=(3, 3, 3)), "none", 100)
                >= verdict_rule.CLAIMS.index("suggestive")).any()
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "simulate_verdict.py"), "--seeds", "4",
                             "--experiments", "50"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "| 4 | " in result.stdout, result.stderr


def test_budget_arm_trains_longer_and_bad_counts_are_one_error_line(labelled_segment_path, tmp_path, capsys):
    assert label_efficiency.without_epochs(["--LR", "1e-3", "--NUM_EPOCHS", "3", "--NUM_EPOCHS=4"]) == (["--LR", "1e-3"], 4)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--pretrained_path",
                             "random", "--segment_id", str(labelled_segment_path), "--output", str(tmp_path), "--seeds", "0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --seeds 0: at least 1 seed is needed"]
    with pytest.raises(SystemExit) as refused:
        label_efficiency.parse_args(["--pretrained_path", "random", "--alpha", "1.5"])
    assert refused.value.code == 2 and "--alpha: 1.5 is out of range: it must be > 0 and < 1" in capsys.readouterr().err
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="--glyphs 0 1"):
        label_efficiency.parse_args(["--pretrained_path", "random", "--glyphs", "0", "1"])
    # Seeds: one count for every number of glyphs, or one count per number.
    assert label_efficiency.parse_args(["--pretrained_path", "random", "--glyphs", "1", "2", "4", "--seeds", "8", "8", "3"]
                                       ).seeds_per_glyphs == {1: 8, 2: 8, 4: 3}
    assert label_efficiency.parse_args(["--pretrained_path", "random", "--glyphs", "1", "2"]).seeds_per_glyphs == {1: 3, 2: 3}
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="--seeds gives 2 counts for 3 --glyphs"):
        label_efficiency.parse_args(["--pretrained_path", "random", "--glyphs", "1", "2", "4", "--seeds", "8", "3"])
    with pytest.raises(SystemExit):  # out of range: argparse's one line (tests/test_one_line_exits.py)
        label_efficiency.parse_args(["--pretrained_path", "random", "--jobs", "-1"])
    with pytest.raises(SystemExit):
        label_efficiency.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "compare every encoder with training from scratch, paired by seed." in help_text
    assert "-- --NUM_EPOCHS 10" in help_text


def test_a_prior_adds_arms_at_every_k_and_alone_at_k_0(labelled_segment_path, tmp_path):
    labels = cv2.imread(str(labelled_segment_path / "inklabels.png"), cv2.IMREAD_UNCHANGED).astype(np.float32)
    cv2.imwrite(str(tmp_path / "prior.png"), cv2.GaussianBlur(labels, (0, 0), 2).astype(np.uint8))
    with pytest.raises(label_efficiency.encoder_input.EvaluationError, match="0, no human label, needs a --prior"):
        label_efficiency.parse_args(["--pretrained_path", "random", "--glyphs", "0", "1"])
    pairs = list(zip(FINETUNE_TINY[::2], FINETUNE_TINY[1::2]))
    finetune = [item for name, value in pairs if name not in ("--MODEL", "--DEPTH", "--TILE_SIZE") for item in (name, value)]
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--pretrained_path", "random",
               "--segment_id", str(labelled_segment_path), "--glyphs", "0", "1", "--seeds", "1", "--label_part", "0.4",
               "--score_part", "0.4", "--min_glyph_pixels", "100", "--model", "resnet18_3d_tiny", "--depth", "8",
               "--tile_size", "32", "--prior", str(tmp_path / "prior.png"), "--prior_name", "blurred",
               "--output", str(tmp_path / "curves"), "--", *finetune]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {(row["mode"], row["glyphs"]): row for row in csv.DictReader(open(tmp_path / "curves" / "runs.csv"))}
    assert set(runs) == {("full", "1"), ("full, prior blurred", "0"), ("full, prior blurred", "1")}
    for (mode, glyphs), row in runs.items():
        recorded = json.loads((tmp_path / "curves" / "runs" / row["name"] / "result.json").read_text())["command"]
        assert ("--PRIOR_PATH" in recorded) == ("prior" in mode)
        assert ("--inklabel_path" in recorded) == (glyphs != "0")
    table = (tmp_path / "curves" / "label_efficiency.md").read_text()
    assert "| random | full, prior blurred | " in table
    # Round 0: the prior itself, scored like every prediction (blind threshold, scored region).
    prior_alone = json.loads((tmp_path / "curves" / "label_efficiency.json").read_text())["prior_alone"]
    assert f"The prior `blurred` alone (no training): F0.5 {prior_alone['f05']:.3f}" in table and prior_alone["auc"] > 0.5


def test_a_failing_run_under_jobs_is_one_error_line_and_no_further_run_starts(labelled_segment_path, tmp_path):
    command = [sys.executable, str(REPO_ROOT / "evaluate" / "label_efficiency.py"), "--pretrained_path", "random",
               "--segment_id", str(labelled_segment_path), "--glyphs", "1", "2", "--seeds", "3", "--label_part", "0.4",
               "--score_part", "0.4", "--min_glyph_pixels", "100", "--model", "resnet18_3d_tiny", "--depth", "8",
               "--tile_size", "32", "--jobs", "2", "--output", str(tmp_path / "curves"), "--", "--NUM_EPOCHS", "0"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run random_full_k1_seed0 failed: error: --NUM_EPOCHS 0 is out of range: it must be ≥ 1")
    # Two ran side by side and failed; the other four of the six runs were never started.
    started = sorted(path.name for path in (tmp_path / "curves" / "runs").iterdir())
    assert started == ["random_full_k1_seed0", "random_full_k1_seed1"]
    assert not (tmp_path / "curves" / "label_efficiency.md").exists()
