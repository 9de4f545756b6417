"""Methods join the encoder report by the registry alone: a method registered in pretrain/methods.py is pretrained,
curved, probed, compared and mapped by evaluate/report.py, and evaluate/render_report.py shows it, without either
file naming it. The method is tests/test_methods.py's toy, registered as that test registers it."""
import dataclasses
import sys

import pytest

from evaluate import render_report, report, verdict_rule
from pretrain import methods
from tests.test_methods import TOY_METHOD


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.METHODS, "toy", "toy_method")


def test_a_registered_method_joins_the_report_plan_and_its_curves(toy_registered, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate/report.py", "--method_epochs", "3", "--method_args", "toy=--bs 4",
                                      "--variants", "mask=--mask 0.4"])
    args = report.parse_args()
    runs = report.pretraining_runs(args)
    assert list(runs) == ["spark", "vicreg", "toy", "spark_mask"]
    assert runs["toy"] == (["--method", "toy", "--ep", "3", "--bs", "4"], "toy pretraining with `--bs 4`")
    assert runs["spark"][0] == ["--method", "spark", "--ep", "40"]
    assert args.curves == ["spark", "vicreg", "toy"]


def test_settings_for_an_unregistered_method_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["evaluate/report.py", "--method_args", "mae=--bs 4"])
    with pytest.raises(SystemExit) as exit_info:
        report.parse_args()
    assert exit_info.value.code == 2
    assert "no registered method 'mae' (pretrain/methods.py has spark, vicreg)" in capsys.readouterr().err


def probe_row(encoder: str, f05: float) -> dict:
    return {"encoder": encoder, "seeds": "3", "f05_mean": f05, "f05_min": f05, "f05_max": f05, "f05_difference": 0.01,
            "f05_difference_low": -0.02, "f05_difference_high": 0.04, "auc_mean": 0.6, "auc_min": 0.6, "auc_max": 0.6,
            "auc_difference": 0.0, "auc_difference_low": -0.01, "auc_difference_high": 0.01, "f05_oracle_mean": 0.3}


def results_with(names: list[str]) -> dict:
    """The results report.py's steps write, for random, SparK's epochs 4 and 8 and the methods `names`."""
    epoch = {"loss": 0.5, "seconds": 60.0}
    pretraining = {name: {"command": f"python pretrain/main.py --method {name}", "description": f"{name} pretraining",
                          "samples_per_epoch": 180, "batch_size": 4, "epochs": [epoch, epoch]} for name in names}
    encoders = ["random", *names]
    cka_labels = ["random", "spark ep4", "spark ep8", *[name for name in names if name != "spark"]]
    mapping = {"f05": 0.2, "auc": 0.6}
    return {
        "run": {"command": "python evaluate/report.py", "date": "2026-01-01", "commit": "abc", "seconds": 600.0},
        "pretraining": pretraining,
        "label_efficiency": [{"command": "python evaluate/label_efficiency.py", "table": "| table |",
                              "plot": "curves.png", "encoders": names, "verdict": "no reading",
                              "design": dataclasses.asdict(verdict_rule.Design())}],
        "probes": {"control_command": "python finetune/train.py", "groups": [{
            "command": "python evaluate/encoders.py", "baseline": "random",
            "rows": [probe_row(name, 0.2) for name in encoders],
            "images": {name: f"{name}_probe.png" for name in encoders},
            "no_skill_band": {"chance_f05": 0.14, "blind_mean": 0.15, "blind_p95": 0.2, "oracle_mean": 0.2,
                              "oracle_p95": 0.25}}]},
        "cka": {"command": "python evaluate/cka.py", "spark_epochs": [4, 8], "heatmap": "cka.png",
                "rows": [{"stage": "4", "kernel": kernel, "a": a, "b": b, "cka": "0.5"}
                         for kernel in ("linear", "rbf") for i, a in enumerate(cka_labels) for b in cka_labels[i:]]},
        "ink_maps": {name: {"command": f"python evaluate/ink_map.py {name}", "segment": "demo", "ink_fraction": 0.1,
                            "grid_factor": 4, "best_component": mapping, "best_cluster": mapping,
                            "linear_probe": mapping, "map": f"{name}_map.png"} for name in encoders},
    }


def test_a_registered_method_appears_in_the_rendered_report(toy_registered):
    text = render_report.render(results_with(["spark", "vicreg", "toy"]), lambda source, name: name)
    assert "![probe toy](report_probe_toy.png)" in text  # its frozen probe's map
    assert "| toy and spark ep8 |" in text and "| vicreg and spark ep8 |" in text  # its CKA against SparK's last epoch
    assert "![ink map toy](report_ink_map_toy.png)" in text
    assert "- **Frozen probe**: toy scores F0.5 0.200 against random's" in text
    assert "random, spark, vicreg, toy:" in text
