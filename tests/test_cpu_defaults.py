"""Without a GPU, `python pretrain/main.py` with no arguments pretrains the narrow ResNet-50 on fewer crops (so the
quickstart finishes in minutes on a CPU), says so in its first line with the options for the full width, and any
setting given on the command line wins. Pretraining prints a line per epoch."""

import pytest
import torch

from pretrain.data.segment import SegmentError
from pretrain.utils import arg_util
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment
from tests.test_probe import run_main


def test_the_cpu_defaults_fill_only_what_the_command_line_left_out():
    args = arg_util.parse_args([])
    line = args.use_cpu_defaults()
    assert (args.model, args.samples_per_ep) == ("resnet50_3d_narrow", 48)
    assert line.startswith("no GPU: model resnet50_3d_narrow, samples_per_ep 48") and line.endswith(
        "for the full width, as on a GPU: --model resnet50_3d --samples_per_ep 180")
    args = arg_util.parse_args(["--model", "resnet18_3d_tiny", "--samples=6"])  # an abbreviation counts as given
    args_abbreviated = arg_util.parse_args(["--samples", "6"])
    assert args.use_cpu_defaults() == "" and (args.model, args.samples_per_ep) == ("resnet18_3d_tiny", 6)
    assert args_abbreviated.use_cpu_defaults().endswith("--model resnet50_3d")
    assert (args_abbreviated.model, args_abbreviated.samples_per_ep) == ("resnet50_3d_narrow", 6)
    big_batch = arg_util.parse_args(["--bs", "128"])
    big_batch.use_cpu_defaults()
    assert big_batch.samples_per_ep == 128  # never fewer crops than a batch


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU keeps the defaults")
def test_pretraining_says_first_what_it_chose_without_a_gpu(tmp_path, monkeypatch, capsys):
    with pytest.raises(SegmentError):  # the line comes before the data is read
        run_main(["--data_path", str(tmp_path / "missing.zarr"), "--exp_dir", str(tmp_path / "run")], monkeypatch)
    assert capsys.readouterr().out.splitlines()[0] == (
        "no GPU: model resnet50_3d_narrow, samples_per_ep 48, so that this finishes in minutes on a CPU; for the full "
        "width, as on a GPU: --model resnet50_3d --samples_per_ep 180")


def test_pretraining_prints_a_line_per_epoch(tmp_path, monkeypatch, capsys):
    segment = write_zarr_segment(tmp_path / "s.zarr", random_volume((20, 96, 96), seed=3))
    write_png(segment / "mask.png", rectangle_mask((96, 96), margin=2))
    run_main(["--data_path", str(segment), "--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64",
              "--samples_per_ep", "2", "--ep", "2", "--num_workers", "0", "--cpu_threads", "1", "--vis_every", "0",
              "--decoder_width", "32", "--exp_dir", str(tmp_path / "run")], monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("no GPU") for line in lines)  # both settings given: nothing chosen
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
