"""The report's verdict on several segments (--curve_segments): each segment's curves in a folder of their own, the
report segment's where a report of that segment alone keeps them, a segment named twice by two spellings refused,
and the rendered report giving each segment its curves and its verdict."""
import copy
import pathlib
import sys

import pytest

from evaluate import render_report, report
from tests.test_report_registry import results_with


def parse(monkeypatch, *arguments: str):
    monkeypatch.setattr(sys, "argv", ["evaluate/report.py", "--work", "work", *arguments])
    return report.parse_args()


def test_each_curve_segment_has_its_own_folder_and_the_report_segment_keeps_its_own(monkeypatch):
    assert report.curve_folders(parse(monkeypatch)) == {"demo": pathlib.Path("work")}
    folders = report.curve_folders(parse(monkeypatch, "--curve_segments", "demo:0", "demo:1"))
    assert folders == {"demo:0": pathlib.Path("work"), "demo:1": pathlib.Path("work/segments/demo_1")}


def test_one_segment_named_twice_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(monkeypatch, "--curve_segments", "demo", "demo:1", "demo:0")
    assert exit_info.value.code == 2
    assert "--curve_segments names a segment twice (demo demo:1 demo:0 are demo:0 demo:1 demo:0)" in capsys.readouterr().err


def test_the_report_gives_each_segment_its_curves_and_its_verdict(monkeypatch):
    monkeypatch.setattr(render_report, "RATE_EXPERIMENTS", 20)  # the wording is tested, not the rates
    results = results_with(["spark", "vicreg"])
    first = {**results["label_efficiency"][0], "segment": "demo", "verdict": "no on demo"}
    second = {**copy.deepcopy(first), "segment": "demo:1", "verdict": "no on demo:1", "plot": "other.png"}
    results["label_efficiency"] = [first, second]
    text = render_report.render(results, lambda source, name: name)
    assert text.index("### Segment `demo`") < text.index("(report_label_efficiency_0.png)") \
        < text.index("### Segment `demo:1`") < text.index("(report_label_efficiency_1.png)")
    assert "- **Few labels** on `demo` (spark, vicreg against random): no on demo" in text
    assert "- **Few labels** on `demo:1` (spark, vicreg against random): no on demo:1" in text
    assert "- **How far to trust it**: for each segment's whole design" in text
    alone = render_report.render(results_with(["spark", "vicreg"]), lambda source, name: name)
    assert "### Segment" not in alone and "for this report's whole design" in alone


def test_a_verdict_only_report_runs_no_probes_and_says_what_it_left_out(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(report, "pretrain", lambda args: calls.append("pretrain") or {})
    monkeypatch.setattr(report, "label_efficiency", lambda args, encoders: calls.append("label_efficiency"))
    monkeypatch.setattr(report, "probes", lambda args, encoders: calls.append("probes"))
    monkeypatch.setattr(report, "representations", lambda args, encoders: calls.append("representations"))
    monkeypatch.setattr(render_report, "render_to_files", lambda *folders: calls.append("render"))
    monkeypatch.setattr(sys, "argv", ["evaluate/report.py", "--work", str(tmp_path), "--verdict_only"])
    assert report.main() == 0
    assert calls == ["pretrain", "label_efficiency", "render"]
    assert render_report.steps_run(tmp_path / "results") == ["run", "pretraining", "label_efficiency"]

    monkeypatch.setattr(render_report, "RATE_EXPERIMENTS", 20)
    results = {step: value for step, value in results_with(["spark", "vicreg"]).items()
               if step in ("run", "pretraining", "label_efficiency")}
    results["run"].update(command="python evaluate/report.py --curve_segments demo demo:1 --verdict_only", segment="demo")
    text = render_report.render(results, lambda source, name: name)
    assert "## Frozen-encoder probe" not in text and "## CKA" not in text and "- **Frozen probe**" not in text
    assert "## Not in this report" in text and "`python evaluate/report.py --curve_segments demo demo:1` adds them" in text
    assert "- **Segment** `demo`, which every method pretrained on" in text
    assert "- **Few labels** (spark, vicreg against random): no reading" in text
