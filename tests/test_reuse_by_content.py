"""Reuse by content: a few-label run, a report step or a fine-tuning resume goes on from earlier work only when
everything that decides its result is the same: the code it executes (not README or notes), its command with the
content of every file it reads (an encoder overwritten in place, other glyphs), and the segment. finetune/train.py
is stubbed where the point is the decision (tests/test_label_efficiency.py reuses real runs)."""
import dataclasses
import json
import pathlib
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest
import torch

from evaluate import label_efficiency, provenance, report
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.data.segment import open_segment
from pretrain.models import build_encoder

SETTINGS = InputSettings(model="resnet18_3d_tiny", depth=8, tile_size=32)


def save_encoder(path: pathlib.Path, seed: int) -> None:
    torch.manual_seed(seed)
    checkpoint.save(path, "encoder", build_encoder("resnet18_3d_tiny").state_dict(), SETTINGS)


def stub_train(monkeypatch, shape_yx) -> list[str]:
    """finetune/train.py replaced by a stub that writes what label_efficiency reads; returns the runs it ran."""
    ran = []

    def run_training(command, log_path):
        folder = pathlib.Path(command[command.index("--OUTPUT_DIR") + 1]) / command[command.index("--exp_name") + 1]
        ran.append(folder.name)
        rng = np.random.default_rng(len(ran))
        cv2.imwrite(str(folder / "prediction.png"), rng.integers(0, 256, shape_yx, dtype=np.uint8))
        (folder / "log.jsonl").write_text(json.dumps({"event": "epoch", "round": 1, "epoch": 1, "training_seconds": 1.0}) + "\n")
        return 0, 1.0

    monkeypatch.setattr(label_efficiency, "run_training", run_training)
    return ran


def test_few_label_runs_are_reused_only_with_the_same_encoder_content_and_glyphs(labelled_segment_path, tmp_path,
                                                                                 monkeypatch):
    segment = open_segment(labelled_segment_path)
    ran = stub_train(monkeypatch, segment.shape[1:])
    encoder = tmp_path / "encoder.pth"
    save_encoder(encoder, 1)

    def curves(*regions: str) -> list[str]:
        ran.clear()
        monkeypatch.setattr(sys, "argv", [
            "label_efficiency.py", "--pretrained_path", "random", str(encoder), "--names", "random", "pretrained",
            "--segment_id", str(labelled_segment_path), "--glyphs", "1", "2", "--seeds", "1", "--min_glyph_pixels",
            "100", *(regions or ("--label_part", "0.4", "--score_part", "0.4")), "--output", str(tmp_path / "curves"),
            "--", "--NUM_EPOCHS", "1"])
        assert label_efficiency.main() == 0
        return sorted(ran)

    everything = ["pretrained_full_k1_seed0", "pretrained_full_k2_seed0", "random_full_k1_seed0", "random_full_k2_seed0"]
    assert curves() == everything
    assert curves() == []  # the same inputs: every run reused
    save_encoder(encoder, 2)  # overwritten in place: the same path, other weights
    assert curves() == ["pretrained_full_k1_seed0", "pretrained_full_k2_seed0"]
    assert len(list((tmp_path / "curves" / "runs" / ".superseded").iterdir())) == 2  # kept, not deleted
    # Other regions choose from other glyphs, and runs predict where the new regions calibrate and score: every run
    # again, those whose glyph image is the same too (their predicted region, an input by content, differs).
    before = label_efficiency.glyphs(segment.inklabels, label_efficiency.regions(segment, 0.4, 0.4, 32).label_yx, 100)
    after = label_efficiency.glyphs(segment.inklabels, label_efficiency.regions(segment, 0.5, 0.3, 32).label_yx, 100)
    assert any(np.array_equal(label_efficiency.glyph_labels(before, segment.shape[1:], 0, count),
                              label_efficiency.glyph_labels(after, segment.shape[1:], 0, count)) for count in (1, 2))
    assert curves("--label_part", "0.5", "--score_part", "0.3") == everything


def test_a_key_holds_file_contents_and_segments_not_paths(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"glyphs")
    second.write_bytes(b"glyphs")
    command = [sys.executable, "finetune/train.py", "--inklabel_path", str(first), "--segment_id", "demo:0",
               "--OUTPUT_DIR", str(tmp_path)]
    key = provenance.key(command, provenance.TRAIN_CODE)
    assert provenance.key([*command[:3], str(second), *command[4:]], provenance.TRAIN_CODE) == key  # same content
    first.write_bytes(b"other glyphs")
    assert provenance.key(command, provenance.TRAIN_CODE)["inputs"] != key["inputs"]
    other_segment = [*command[:5], "demo:1", *command[6:]]
    assert provenance.key(other_segment, provenance.TRAIN_CODE)["inputs"] != key["inputs"]
    # A segment is keyed by its identity, not its spelling: demo:00 is demo:0.
    respelled = [*command[:5], "demo:00", *command[6:]]
    assert provenance.key(respelled, provenance.TRAIN_CODE) == provenance.key(command, provenance.TRAIN_CODE)


def test_code_is_keyed_by_the_source_files_a_step_executes_so_a_readme_commit_reuses(tmp_path, monkeypatch):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "train.py").write_text("print('train')\n")
    (tmp_path / "notes").mkdir()
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    code = provenance.code_digest(provenance.TRAIN_CODE)
    (tmp_path / "README.md").write_text("# changed\n")
    (tmp_path / "notes" / "finetune.md").write_text("a note\n")
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "report.py").write_text("# not what train.py runs\n")
    assert provenance.code_digest(provenance.TRAIN_CODE) == code
    (tmp_path / "finetune" / "train.py").write_text("print('train, changed')\n")
    assert provenance.code_digest(provenance.TRAIN_CODE) != code


def test_a_report_step_reruns_afresh_with_other_settings_and_is_skipped_with_the_same(tmp_path, monkeypatch):
    commands = []

    def run(command, **_):
        commands.append(command[1:])
        (tmp_path / "spark").mkdir(exist_ok=True)
        (tmp_path / "spark" / "checkpoint.pth").write_text(" ".join(command))
        (tmp_path / "out.csv").write_text("done")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(report.subprocess, "run", run)
    pretraining = ["pretrain/main.py", "--data_path", "demo", "--exp_dir", str(tmp_path / "spark"), "--ep"]
    report.run_step("pretraining", [*pretraining, "10"], folder=tmp_path / "spark")
    report.run_step("pretraining", [*pretraining, "10"], folder=tmp_path / "spark")  # resumes its own work
    assert not (tmp_path / ".superseded").exists()
    report.run_step("pretraining", [*pretraining, "40"], folder=tmp_path / "spark")  # other settings: afresh
    assert len(commands) == 3 and "--ep 10" in (tmp_path / ".superseded" / "spark-1" / "checkpoint.pth").read_text()
    assert "--ep 40" in (tmp_path / "spark" / "checkpoint.pth").read_text()
    step = ["evaluate/cka.py", "--segment_id", "demo", "--output", str(tmp_path)]
    report.run_step("cka", step, tmp_path / "out.csv")
    report.run_step("cka", step, tmp_path / "out.csv")  # finished with the same key: not run again
    report.run_step("cka", [*step[:2], "demo:1", *step[3:]], tmp_path / "out.csv")
    assert len(commands) == 5


def test_finetuning_refuses_to_resume_from_other_encoder_content_or_other_labels(tmp_path):
    from finetune import train

    state = train.RunState(epoch=1, labels_digest="labels", inputs_digest="encoder")
    checkpoint.save(tmp_path / "last.pth", "finetune", {}, SETTINGS, config={"scheme": "validation"},
                    state=dataclasses.asdict(state))
    run = types.SimpleNamespace(config=types.SimpleNamespace(scheme="validation"), settings=SETTINGS,
                                experiment_dir=tmp_path)
    resumed, saved = train.resume_point(run, "labels", "encoder")
    assert resumed.epoch == 1 and saved is not None
    with pytest.raises(checkpoint.CheckpointError, match="another pretrained_path or PRIOR_PATH content"):
        train.resume_point(run, "labels", "overwritten encoder")
    with pytest.raises(checkpoint.CheckpointError, match="other labels"):
        train.resume_point(run, "other labels", "encoder")
    # The digest is of the files' bytes, not their names.
    (tmp_path / "encoder.pth").write_bytes(b"weights")
    (tmp_path / "copy.pth").write_bytes(b"weights")
    config = types.SimpleNamespace(pretrained_path=str(tmp_path / "encoder.pth"), PRIOR_PATH=None)
    digest = train.inputs_digest(config)
    assert train.inputs_digest(types.SimpleNamespace(pretrained_path=str(tmp_path / "copy.pth"), PRIOR_PATH=None)) == digest
    (tmp_path / "encoder.pth").write_bytes(b"other weights")
    assert train.inputs_digest(config) != digest
