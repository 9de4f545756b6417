"""The GPU benchmarks on a CPU: `benchmarks/gpu_entry_points.py` without a GPU says so in one line and exits 0; its
runs cover every registered method; `benchmarks/pretrain_levers.py --tiny` counts FLOPs and shares as a hand count."""
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_entry_points, pretrain_levers, utilisation
from pretrain import methods
from pretrain.data.segment import open_segment
from tests.conftest import REPO_ROOT
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment
from tests.test_methods import TOY_METHOD


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark measures (minutes)")
def test_without_a_gpu_it_says_so_and_measures_nothing():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_entry_points.py")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "no GPU found (torch.cuda.is_available() is False): nothing measured; --smoke runs the tiny sequence here"]


# A method whose whole step is one convolution, so that its FLOPs can be counted by hand.
ONE_CONV_METHOD = '''"""One 3×3×3 convolution of the crop, and the mean square of its output as the loss."""
import torch

from pretrain.methods import Method


class OneConvMethod(Method):
    name = "one_conv"
    title = "one convolution"
    checkpoint_part = "withnothing_one_conv"

    def build_model(self, args, encoder, sync_batchnorm):
        return torch.nn.Conv3d(1, 4, kernel_size=3, padding=1)

    def training_step(self, model, batch, device, show):
        return model(batch.to(device)).square().mean(), {}, None


METHOD = OneConvMethod()
'''


@pytest.fixture(scope="module")
def segment_path(tmp_path_factory) -> str:
    path = write_zarr_segment(tmp_path_factory.mktemp("segment") / "s.zarr", random_volume((24, 128, 128), seed=6))
    write_png(path / "mask.png", rectangle_mask((128, 128), margin=4))
    return str(path)


def register(monkeypatch, folder, name: str, source: str) -> None:
    (folder / f"{name}_method.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setitem(methods.METHODS, name, f"{name}_method")


def test_the_levers_table_counts_flops_and_share_of_peak_as_a_hand_count(segment_path, tmp_path, monkeypatch, capsys):
    register(monkeypatch, tmp_path, "one_conv", ONE_CONV_METHOD)
    compiled = []  # torch.compile is never run in tests: a stand-in records what it was given
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    threads = torch.get_num_threads()
    output = tmp_path / "levers.json"
    try:
        assert pretrain_levers.main(["--tiny", "--method", "one_conv", "--segment", segment_path,
                                     "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets this process's threads as pretrain/main.py does
    result = json.loads(output.read_text())
    # --tiny crops are (1, 16, 64, 64); the step is the convolution's forward, 2·Cin·Cout·k³ per output voxel, and its
    # weight gradient, as many again (the crop needs no gradient).
    forward = 2 * 1 * 4 * 3**3 * (16 * 64 * 64)
    assert result["flops_per_sample"] == 2 * forward
    rows = result["variants"]
    assert [row["name"] for row in rows] == list(pretrain_levers.VARIANT_NAMES)
    assert [row["error"] for row in rows] == [None] * len(rows)
    assert len(compiled) >= 1 and isinstance(compiled[0], torch.nn.Conv3d)
    printed = capsys.readouterr().out
    for row in rows:
        achieved = 2 * forward * row["samples_per_s"]
        assert row["achieved_flops_per_s"] == pytest.approx(achieved)
        assert row["share_of_measured_peak"] == pytest.approx(achieved / result["measured_peak_flops_per_s"])
        assert row["share_of_data_sheet_peak"] is None  # a CPU has no data-sheet entry
        assert 0 <= row["data_wait_fraction"] < 1
        assert f"| {row['variant']} | {row['samples_per_s']:.2f} | {achieved / 1e12:.3f} | " \
               f"{row['share_of_measured_peak']:.1%} / – |" in printed
    assert next(row for row in rows if row["name"] == "batch_x2")["lr"] == 2 * rows[0]["lr"]  # lr = base_lr × bs / 256


def test_a_registered_method_is_benchmarked_without_editing_the_benchmark(segment_path, tmp_path, monkeypatch):
    register(monkeypatch, tmp_path, "toy", TOY_METHOD)
    commands = {}

    def run(name, command, work_dir, timeout):  # the runs themselves are not this test's business
        commands[name] = command
        return {"name": name, "error": None, "output": "", "wall_seconds": 0.0}

    monkeypatch.setattr(gpu_entry_points, "run", run)
    args = gpu_entry_points.parse_args(["--smoke", "--segment", segment_path])
    results = gpu_entry_points.run_all(args, tmp_path / "runs", open_segment(segment_path), gpu_count=1)
    assert list(commands) == [*methods.METHODS]  # no SparK encoder was written: fine-tuning and ink_map skipped
    assert commands["toy"][commands["toy"].index("--method") + 1] == "toy"
    toy = next(result for result in results if result["name"] == "toy")
    assert toy["label"].startswith("toy pretraining, resnet18_3d_tiny") and toy["flops_per_sample"] > 0


def test_the_data_sheet_peak_is_found_by_device_name():
    assert utilisation.data_sheet_peak("NVIDIA H100 80GB HBM3") == 989.5e12
    assert utilisation.data_sheet_peak("NVIDIA H100 PCIe") == 756e12
    assert utilisation.data_sheet_peak("NVIDIA H200") == 989.5e12
    assert utilisation.data_sheet_peak("NVIDIA H200 NVL") == 835.5e12
    assert utilisation.data_sheet_peak("NVIDIA A100-SXM4-80GB") is None


def test_the_entry_points_table_gives_each_training_run_its_share_of_the_devices_it_ran_on():
    info = {"gpu_count": 0, "gpus": []}
    peaks = gpu_entry_points.device_peaks(info, smoke=True)  # a CPU: a measured matmul, no data sheet
    assert peaks["measured_flops_per_s"] > 0 and peaks["data_sheet_flops_per_s"] is None
    peaks = {"measured_flops_per_s": 500e12, "data_sheet_flops_per_s": 989.5e12}
    common = {"error": None, "wall_seconds": 1.0, "gpu_memory_peak_mib": None, "gpu_memory_before_mib": None}
    results = [{**common, "label": "SparK", "flops_per_sample": 1.445e12, "samples_per_s": 19.0},
               {**common, "label": "SparK, torchrun", "flops_per_sample": 1.445e12, "samples_per_s": 38.0, "devices": 2},
               {**common, "label": "ink_map", "tiles_per_s": 50.0}]
    gpu_entry_points.add_utilisation(results, peaks)
    spark, torchrun, ink_map = results
    assert spark["achieved_flops_per_s"] == pytest.approx(1.445e12 * 19)
    assert spark["share_of_measured_peak"] == pytest.approx(1.445e12 * 19 / 500e12)
    assert torchrun["share_of_data_sheet_peak"] == pytest.approx(spark["share_of_data_sheet_peak"])  # two devices
    assert ink_map["achieved_flops_per_s"] is None and ink_map["share_of_measured_peak"] is None
    rows = gpu_entry_points.table(results).splitlines()
    assert rows[2] == "| SparK | 19.0 | – | 1445.0 | 27.455 | 5.5% / 2.8% | – | – | 1 | ok |"
    assert rows[4] == "| ink_map | – | 50.0 | – | – | – / – | – | – | 1 | ok |"
