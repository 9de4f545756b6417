"""Reading a run's `log.jsonl`, as `pretrain.utils.misc.JsonLinesLog` writes it for pretraining and fine-tuning
runs: every script that reads a run's results reads them here, so all of them see the same epochs.

An epoch can be logged twice: a run killed after an epoch's record but before the checkpoint that commits it trains
that epoch again when resumed, and logs it again. The last record of each (round, epoch) is the one that stands.
"""
import json
import os
import pathlib

OLD_VALIDATION_PREFIX = "val_"


def records(run_dir: str | os.PathLike, event: str | None = None) -> list[dict]:
    """The records of the run's log.jsonl in the order written (only those of `event`, if given), each epoch once.
    A last line cut short (a kill while writing it) is left out; no log is FileNotFoundError."""
    lines = (pathlib.Path(run_dir) / "log.jsonl").read_text().splitlines()
    written = []
    for number, line in enumerate(lines):
        try:
            written.append(renamed_metrics(json.loads(line)))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise ValueError(f"{pathlib.Path(run_dir) / 'log.jsonl'} line {number + 1} is not JSON") from None
    last_of_epoch = {epoch_key(record): index for index, record in enumerate(written) if record.get("event") == "epoch"}
    return [record for index, record in enumerate(written)
            if (record.get("event") != "epoch" or last_of_epoch[epoch_key(record)] == index)
            and (event is None or record.get("event") == event)]


def renamed_metrics(record: dict) -> dict:
    """The record with the validation metrics named as today: logs written before 2026-12-04 named them `val_*`."""
    return {("validation_" + name.removeprefix(OLD_VALIDATION_PREFIX) if name.startswith(OLD_VALIDATION_PREFIX)
             else name): value for name, value in record.items()}


def epoch_key(record: dict) -> tuple[int, int]:
    """(round, epoch): fine-tuning's iterative rounds each count epochs from 1; pretraining has no rounds."""
    return record.get("round", 0), record["epoch"]


def epochs(run_dir: str | os.PathLike, round_number: int | None = None) -> list[dict]:
    """The run's epoch records, each epoch once, in order (only those of `round_number`, if given)."""
    return [record for record in records(run_dir, "epoch")
            if round_number is None or record.get("round", 0) == round_number]


def best_epoch(run_dir: str | os.PathLike, metric: str = "validation_loss") -> dict:
    """The epoch record with the lowest `metric` (fine-tuning's best.pth, in scheme "validation")."""
    return min(epochs(run_dir), key=lambda record: record[metric])
