"""The GPU throughput levers (pretrain/throughput.py, arg_util's "GPU throughput" block) change how a step runs, not
what it computes: each gives the default's loss and gradients on a tiny CPU step. torch.compile is never run here:
its wiring is checked with a stand-in."""
import json
import sys

import pytest
import torch

import pretrain.main
from pretrain import throughput
from pretrain.data.segment import open_segment
from pretrain.spark import SparK3d
from pretrain.utils import arg_util
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

TINY = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--decoder_width", "32"]


def spark_loss_and_gradients(options: list[str], inp_bcdhw: torch.Tensor, active_b1dhw: torch.Tensor) -> tuple:
    torch.manual_seed(0)
    model = pretrain.main.build_model(arg_util.parse_args([*TINY, *options]))
    loss = model(inp_bcdhw, active_b1dhw)
    loss.backward()
    return model, loss.detach(), {name: parameter.grad for name, parameter in model.named_parameters()}


def test_channels_last_gives_the_default_loss_and_gradients():
    inp_bcdhw = torch.rand(1, 1, 16, 64, 64, generator=torch.Generator().manual_seed(1))
    active_b1dhw = torch.rand(1, 1, 2, 2, 2, generator=torch.Generator().manual_seed(2)) > 0.5
    active_b1dhw[:, :, 0, 0, 0] = True  # at least one visible cell
    _, loss, gradients = spark_loss_and_gradients([], inp_bcdhw, active_b1dhw)
    model, loss_channels_last, gradients_channels_last = spark_loss_and_gradients(
        ["--channels_last", "true"], inp_bcdhw, active_b1dhw)
    weights = {name: weight for name, weight in model.state_dict().items() if weight.dim() == 5}
    assert any(name.startswith("decoder.") for name in weights)  # the encoder's and the decoder's
    for name, weight in weights.items():
        assert weight.is_contiguous(memory_format=torch.channels_last_3d), name
    assert not weights["sparse_encoder.encoder.layer1.0.conv1.weight"].is_contiguous()  # (B, C, D, H, W) order no more
    torch.testing.assert_close(loss_channels_last, loss, rtol=1e-5, atol=1e-6)
    assert gradients_channels_last.keys() == gradients.keys()
    # Float tolerance, per tensor against its norm: the same sums in another order through a dozen BatchNorm layers
    # differ by up to 6e-4 of a gradient's norm here; a wrong mask or layout would differ by its whole size.
    for name, gradient in gradients.items():
        assert (gradients_channels_last[name] - gradient).norm() <= 2e-3 * gradient.norm(), name


@pytest.mark.parametrize("kernel", ["foreach", "fused"])
def test_adamw_kernels_take_the_default_step(kernel):
    def one_step(kernel_options: list[str]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        # No bias before the BatchNorm, as in the ResNet: BatchNorm removes any shift, so such a bias's gradient is
        # rounding noise near Adam's eps, and a kernel that rounds otherwise moves it by up to half a step.
        model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, bias=False), torch.nn.BatchNorm3d(4),
                                    torch.nn.Conv3d(4, 2, 1))
        args = arg_util.parse_args(["--opt", "adamw", *kernel_options])
        args.fill_runtime("cpu", 1)
        optimizer = pretrain.main.build_optimizer(args, model)
        assert all(optimizer.defaults.get(name) for name in throughput.optimizer_kernel_options(args.optimizer_kernel))
        for _ in range(2):
            model(torch.rand(2, 1, 4, 6, 6, generator=torch.Generator().manual_seed(3))).square().mean().backward()
            optimizer.step()
        return [parameter.detach() for parameter in model.parameters()]

    default = one_step([])
    with_kernel = one_step(["--optimizer_kernel", kernel])
    for parameter, parameter_with_kernel in zip(default, with_kernel):
        torch.testing.assert_close(parameter_with_kernel, parameter, rtol=1e-6, atol=1e-7)
    assert throughput.optimizer_kernel_options(kernel) == {kernel: True}


def test_an_optimizer_kernel_that_lamb_lacks_is_refused_in_one_line():
    with pytest.raises(arg_util.ArgumentError, match="optimizer_kernel 'fused' needs opt 'adamw'"):
        arg_util.parse_args(["--optimizer_kernel", "fused"])
    with pytest.raises(arg_util.ArgumentError, match="optimizer_kernel 'fast' is not one of default, foreach, fused"):
        arg_util.parse_args(["--optimizer_kernel", "fast", "--opt", "adamw"])
    with pytest.raises(arg_util.ArgumentError, match="prefetch_factor 0 is out of range: it must be ≥ 1"):
        arg_util.parse_args(["--prefetch_factor", "0"])


def test_every_lever_in_a_run_gives_the_default_run_loss(tmp_path, monkeypatch):
    """pretrain/main.py end to end, once with the defaults and once with every lever on (torch.compile replaced by a
    stand-in that records what it was given): the same crops, masks and losses, and cudnn.benchmark and the compiled
    model wired where they belong."""
    segment = write_zarr_segment(tmp_path / "s.zarr", random_volume((24, 128, 128), seed=5))
    write_png(segment / "mask.png", rectangle_mask((128, 128), margin=4))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    threads = torch.get_num_threads()

    def epoch_losses(name: str, options: list[str]) -> list[float]:
        monkeypatch.setattr(sys, "argv", ["pretrain/main.py", *TINY, "--samples_per_ep", "4", "--ep", "1",
                                          "--num_workers", "0", "--cpu_threads", "1", "--vis_every", "0",
                                          "--data_path", str(segment), "--exp_dir", str(tmp_path / name), *options])
        try:
            assert pretrain.main.main() == 0
        finally:
            torch.set_num_threads(threads)
        records = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        return [record["loss"] for record in records if record["event"] == "epoch"]

    default = epoch_losses("default", [])
    assert compiled == [] and torch.backends.cudnn.benchmark is False
    levers = epoch_losses("levers", ["--channels_last", "true", "--cudnn_benchmark", "true", "--compile_model", "true",
                                     "--num_workers", "1", "--prefetch_factor", "4", "--pin_memory", "false"])
    assert torch.backends.cudnn.benchmark is True
    assert len(compiled) == 1 and isinstance(compiled[0], SparK3d)  # the model the step calls
    assert compiled[0].sparse_encoder.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert levers == pytest.approx(default, rel=1e-5)

    # The DataLoader settings reach the loader (a CUDA device only as a name: nothing is loaded).
    for options, pinned, prefetch in (([], True, None), (["--num_workers", "1", "--pin_memory", "false"], False, 2),
                                      (["--num_workers", "1", "--prefetch_factor", "4"], True, 4)):
        args = arg_util.parse_args([*TINY, "--num_workers", "0", "--samples_per_ep", "4", *options])
        args.fill_runtime("cuda", 1)
        loader = pretrain.main.build_loader(args, open_segment([str(segment)]), torch.device("cuda"))
        assert (loader.pin_memory, loader.prefetch_factor) == (pinned, prefetch), options
