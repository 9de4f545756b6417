"""Every F0.5 fine-tuning prints or logs comes with its chance level (calling every pixel ink), and a run that
ends within NO_SKILL_MARGIN of chance says so in one warning line."""
import os
import re
import subprocess
import sys
import warnings

import pytest

from finetune import evaluation, train
from finetune.metrics import all_ink_f05
from tests.conftest import FINETUNE_TINY, REPO_ROOT


def run_train(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "finetune" / "train.py"), *FINETUNE_TINY, *arguments],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def scalars(folder) -> dict:
    """{tag: [values in step order]} of a TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics_of(prefix: str, f05: float, ink_fraction: float) -> dict:
    return {f"{prefix}{key}": value for key, value in
            {"f05": f05, "threshold": 0.5, "auc": 0.6, "ink_fraction": ink_fraction}.items()}


def test_describe_puts_chance_beside_every_f05():
    metrics = {**metrics_of("labelled_tiles_", 0.8, 0.3), **metrics_of("unlabelled_area_", 0.141, 0.1152)}
    text = evaluation.describe(metrics)
    assert f"labelled tiles F0.5 0.800 (threshold 0.50; chance {all_ink_f05(0.3):.3f}), AUC 0.600" in text
    assert "where nothing was labelled F0.5 0.141 (threshold 0.50; chance 0.140)" in text


@pytest.mark.parametrize("metrics, warned", [
    (metrics_of("validation_", 0.141, 0.1152), True),  # the self-training rounds that never learnt: chance 0.140
    (metrics_of("validation_", 0.189, 0.1152), True),  # within the margin
    (metrics_of("validation_", 0.191, 0.1152), False),
    # In scheme iterative the area nobody labelled decides, not the labelled tiles the model was fitted to.
    ({**metrics_of("labelled_tiles_", 0.9, 0.3), **metrics_of("unlabelled_area_", 0.15, 0.1152)}, True),
    ({**metrics_of("labelled_tiles_", 0.9, 0.3), **metrics_of("unlabelled_area_", 0.5, 0.1152)}, False),
    (metrics_of("labelled_tiles_", 0.38, 0.3), True),  # without full labels, the fit is all there is
], ids=["at-chance", "within-margin", "above-margin", "unlabelled-at-chance", "unlabelled-learnt", "fit-only"])
def test_a_run_that_ends_within_the_no_skill_margin_of_chance_gets_one_warning(metrics, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.warn_if_no_skill(metrics, "round 2")
    assert len(caught) == int(warned)
    if warned:
        assert re.match(r"round 2 shows no skill: its F0\.5 \(.+\) 0\.\d{3} is less than 0\.05 above chance 0\.\d{3}",
                        str(caught[0].message))


def test_validation_and_iterative_runs_log_validation_f05_auc_and_chance_and_print_chance(labelled_segment_path, tmp_path):
    arguments = ["--segment_id", str(labelled_segment_path), "--OUTPUT_DIR", str(tmp_path)]
    validation = run_train([*arguments, "--exp_name", "held_out"])
    assert validation.returncode == 0, validation.stderr[-3000:]
    epoch_lines = [line for line in validation.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(re.search(r"F0\.5 \d\.\d{3} \(threshold \d\.\d\d; chance 0\.\d{3}\)", line)
                                         for line in epoch_lines)
    logged = scalars(tmp_path / "held_out" / "tensorboard_logs")
    assert {"validation/f05", "validation/auc", "validation/f05_chance"} <= set(logged)
    assert len(logged["validation/f05_chance"]) == 2 and 0 < logged["validation/f05_chance"][0] < 1  # one point per epoch

    iterative = run_train([*arguments, "--exp_name", "rounds", "--scheme", "iterative", "--inklabel_path",
                           "two_letters.png", "--SELF_TRAINING_ROUNDS", "1"])
    assert iterative.returncode == 0, iterative.stderr[-3000:]
    prediction_lines = [line for line in iterative.stdout.splitlines() if line.startswith("prediction: ")]
    assert len(prediction_lines) == 2 and all(line.count("chance") == 2 for line in prediction_lines)
    for round_number in (1, 2):  # one point per round, from its whole-segment prediction
        logged = scalars(tmp_path / "rounds" / "tensorboard_logs" / f"round_{round_number:02d}")
        assert all(len(logged[tag]) == 1 for tag in ("validation/f05", "validation/auc", "validation/f05_chance"))
    # Whether the tiny model learnt or not, a warning line, if any, is the one line of the no-skill rule.
    assert all(re.match(r"warning: round \d shows no skill", line)
               for line in iterative.stderr.splitlines() if "no skill" in line)
