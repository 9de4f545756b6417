"""Every reader of a run's log.jsonl sees each epoch once: the last record of an epoch logged twice (a kill between
its record and its checkpoint) stands, per iterative round; a last line cut short by a kill is left out."""
import json

import pytest

from pretrain.utils import run_log


def write_log(folder, records, tail: str = "") -> None:
    (folder / "log.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


def test_an_epoch_logged_twice_counts_once_the_last_record_standing(tmp_path):
    write_log(tmp_path, [
        {"event": "start", "args": {"bs": 2}},
        {"event": "epoch", "round": 1, "epoch": 1, "validation_loss": 0.9},
        {"event": "epoch", "round": 1, "epoch": 2, "validation_loss": 0.5},  # killed before its checkpoint: again
        {"event": "start", "args": {"bs": 2}},
        {"event": "epoch", "round": 1, "epoch": 2, "validation_loss": 0.7},
        {"event": "epoch", "round": 2, "epoch": 1, "validation_loss": 0.6},
        {"event": "prediction", "round": 2, "seconds": 1.0},
    ], tail='{"event": "epoch", "round": 2, "ep')  # a kill while writing the last line
    assert [(record["round"], record["epoch"], record["validation_loss"]) for record in run_log.epochs(tmp_path)] == [
        (1, 1, 0.9), (1, 2, 0.7), (2, 1, 0.6)]
    assert [record["epoch"] for record in run_log.epochs(tmp_path, round_number=2)] == [1]
    assert run_log.best_epoch(tmp_path) == {"event": "epoch", "round": 2, "epoch": 1, "validation_loss": 0.6}
    assert [record["event"] for record in run_log.records(tmp_path)] == [
        "start", "epoch", "start", "epoch", "epoch", "prediction"]
    assert len(run_log.records(tmp_path, "start")) == 2 and run_log.records(tmp_path, "prediction")[0]["seconds"] == 1.0


def test_pretraining_epochs_have_no_round_and_a_broken_line_inside_is_an_error(tmp_path):
    write_log(tmp_path, [{"event": "epoch", "epoch": 1, "loss": 2.0}, {"event": "epoch", "epoch": 1, "loss": 1.5}])
    assert run_log.epochs(tmp_path) == [{"event": "epoch", "epoch": 1, "loss": 1.5}]
    (tmp_path / "log.jsonl").write_text('{"event": "start"}\nnot json\n{"event": "epoch", "epoch": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        run_log.records(tmp_path)
    with pytest.raises(FileNotFoundError):
        run_log.records(tmp_path / "missing")


def test_a_log_from_before_the_validation_prefix_reads_with_todays_names(tmp_path):
    write_log(tmp_path, [{"event": "epoch", "round": 1, "epoch": 1, "train_loss": 0.8, "val_loss": 0.9,
                          "val_segments": {"demo_3": {"loss": 0.9}}},
                         {"event": "epoch", "round": 1, "epoch": 2, "train_loss": 0.7, "val_loss": 0.4}])
    assert run_log.best_epoch(tmp_path) == {"event": "epoch", "round": 1, "epoch": 2, "train_loss": 0.7,
                                            "validation_loss": 0.4}
    assert run_log.epochs(tmp_path)[0]["validation_segments"] == {"demo_3": {"loss": 0.9}}
