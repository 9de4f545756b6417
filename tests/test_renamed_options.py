"""One concept, one name: every evaluate/ script names the starting weights --pretrained_path (as fine-tuning does)
and no weights `random`; the older names still work, each with a one-line note."""
import sys

from evaluate import cka, encoders, ink_map, label_efficiency, report


def test_older_names_still_work_each_with_a_one_line_note(capsys, monkeypatch):
    assert ink_map.parse_args(["--checkpoint", "a.pth"]).pretrained_path == "a.pth"
    assert cka.parse_args(["--checkpoints", "a.pth", "random"]).pretrained_path == ["a.pth", "random"]
    assert encoders.parse_args(["--encoders", "random", "a.pth"]).pretrained_path == ["random", "a.pth"]
    args = label_efficiency.parse_args(["--encoders", "scratch", "a.pth", "--scratch_epochs_factor", "2", "--segment", "x"])
    assert (args.pretrained_path, args.names, args.random_epochs_factor, args.segment) == (["random", "a.pth"],
                                                                                          ["random", "a"], 2, "x")
    monkeypatch.setattr(sys, "argv", ["evaluate/report.py", "--scratch_epochs_factor", "3"])
    assert report.parse_args().random_epochs_factor == 3
    assert capsys.readouterr().err.splitlines() == [f"note: {old} is now {new}; the old name still works" for old, new in [
        ("--checkpoint", "--pretrained_path"), ("--checkpoints", "--pretrained_path"), ("--encoders", "--pretrained_path"),
        ("--encoders", "--pretrained_path"), ("--scratch_epochs_factor", "--random_epochs_factor"),
        ("--segment", "--segment_id"), ("scratch", "random"), ("--scratch_epochs_factor", "--random_epochs_factor")]]
    # The current names print nothing.
    label_efficiency.parse_args(["--pretrained_path", "random", "a.pth", "--random_epochs_factor", "2"])
    assert not capsys.readouterr().err
