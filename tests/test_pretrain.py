"""`python pretrain/main.py` end to end on a tiny model and segment: outputs, resume, torchrun, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tqdm

from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.models import build_encoder
from tests.conftest import REPO_ROOT, hara_checkpoint
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

TINY = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--samples_per_ep", "4",
        "--num_workers", "0", "--cpu_threads", "1", "--vis_every", "1", "--decoder_width", "32", "--base_lr", "0.1"]


@pytest.fixture(scope="module")
def segment_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("segment")
    volume = random_volume((65, 128, 128), seed=11)
    path = write_zarr_segment(folder / "tiny.zarr", volume, chunks=(32, 64, 64))
    write_png(path / "mask.png", rectangle_mask((128, 128), margin=4))
    return str(path)


def run_pretrain(arguments: list[str], timeout: float = 300, torchrun_processes: int = 0) -> subprocess.CompletedProcess:
    if torchrun_processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun_processes}",
                   str(REPO_ROOT / "pretrain" / "main.py"), *arguments]
    else:
        command = [sys.executable, str(REPO_ROOT / "pretrain" / "main.py"), *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


# TINY as users run it: the default (persistent) DataLoader workers.
DEFAULT_WORKERS = [argument for argument in TINY if argument not in ("--num_workers", "0")]


@pytest.fixture(scope="module")
def finished_run(segment_path, tmp_path_factory):
    """A finished 2-epoch SparK run of DEFAULT_WORKERS on the module's segment, shared by the tests that only read
    its outputs: the end-to-end checks, the uninterrupted run a resume must match, and the checkpoint that runs of
    another architecture or method must refuse to resume (one run instead of four)."""
    exp_dir = tmp_path_factory.mktemp("finished_run")
    result = run_pretrain([*DEFAULT_WORKERS, "--ep", "2", "--data_path", segment_path, "--exp_dir", str(exp_dir)])
    assert result.returncode == 0, result.stderr
    return exp_dir


def test_end_to_end_writes_both_checkpoints_logs_and_tensorboard(finished_run):
    full = checkpoint.read(finished_run / "resnet18_3d_tiny_withdecoder_spark_style.pth")
    assert full["kind"] == "spark" and full["epoch"] == 1 and full["global_step"] == 4
    assert {"model", "optimizer", "args", "input", "commit"} <= set(full)
    encoder = checkpoint.read(finished_run / "resnet18_3d_tiny_timm_style.pth")
    assert encoder["kind"] == "encoder" and encoder["epoch"] == 2 and encoder["method"] == "spark"
    assert checkpoint.input_settings(encoder) == InputSettings(model="resnet18_3d_tiny", depth=16, tile_size=64)
    build_encoder("resnet18_3d_tiny").load_state_dict(encoder["model"], strict=True)  # dense names, strict
    assert list((finished_run / "tensorboard_logs").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (finished_run / "log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and "pretrain/main.py" in records[0]["command"]
    assert [record["epoch"] for record in records if record["event"] == "epoch"] == [1, 2]
    assert all(np.isfinite(record["loss"]) for record in records if record["event"] == "epoch")
    assert not list(finished_run.glob(".*.tmp"))


def test_tensorboard_holds_scalars_and_reconstruction_images(segment_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run_pretrain([*TINY, "--ep", "1", "--data_path", segment_path, "--exp_dir", str(tmp_path),
                           "--mask_mode", "column"])
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "tensorboard_logs")).Reload()
    assert {"train/loss", "hp/lr", "hp/wd", "train/grad_norm", "perf/samples_per_s"} <= set(events.Tags()["scalars"])
    assert "reconstruction/input_masked_reconstruction" in events.Tags()["images"]


def test_resume_matches_an_uninterrupted_run(segment_path, finished_run, tmp_path):
    straight, interrupted = finished_run, tmp_path / "interrupted"  # the same command, stopped after epoch 1
    first = run_pretrain([*DEFAULT_WORKERS, "--ep", "2", "--data_path", segment_path, "--exp_dir", str(interrupted),
                          "--stop_after_ep", "1"])
    assert first.returncode == 0, first.stderr
    second = run_pretrain([*DEFAULT_WORKERS, "--ep", "2", "--data_path", segment_path, "--exp_dir", str(interrupted)])
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    name = "resnet18_3d_tiny_withdecoder_spark_style.pth"
    expected = checkpoint.read(straight / name)["model"]
    resumed = checkpoint.read(interrupted / name)["model"]
    for key in expected:
        assert torch.allclose(expected[key].float(), resumed[key].float(), atol=1e-5), key
    # Resuming with other input settings would feed the model data unlike what it learnt from: refused.
    other = run_pretrain([*TINY, "--ep", "3", "--data_path", segment_path, "--exp_dir", str(interrupted),
                          "--normalization", "zscore"])
    assert other.returncode == 2 and "was pretrained on resnet18_3d_tiny, 16 layers centred, range normalisation" \
        in other.stderr.splitlines()[-1]


def test_torchrun_two_processes_gloo(segment_path, labelled_segment_path, tmp_path):
    result = run_pretrain([*TINY, "--ep", "1", "--data_path", segment_path, "--exp_dir", str(tmp_path),
                           "--probe_segment", str(labelled_segment_path)], torchrun_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("iterations per epoch") == 1  # rank 0's only
    assert result.stdout.count("ink probe: ") == 1  # rank 0 probes, rank 1 waits for it
    assert "probe__auc" in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    saved = checkpoint.read(tmp_path / "resnet18_3d_tiny_withdecoder_spark_style.pth")
    assert saved["global_step"] == 2  # 4 samples, global batch 2 split over 2 processes
    assert not any(key.startswith("module.") for key in saved["model"])  # the unwrapped model is saved


# A missing --resume_from checkpoint, a non-numeric --ep and an unwritable --exp_dir: tests/test_bad_inputs.py.
@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--tile_size", "70"], "tile_size 70 is not a multiple of 32"),
        (["--depth", "8"], "grid (d, h, w) = (1, 2, 2) of cells (8, 32, 32); 'cell' masking needs at least 2 cells in depth"),
        (["--data_path", "20990101000000"], "20990101000000"),
        (["--lr", "0.5"], "--lr is filled at runtime (base_lr × bs / 256: set base_lr), not a setting"),
    ],
    ids=["input-size", "grid-too-small", "unknown-segment", "runtime-field"],
)
def test_bad_settings_give_one_clear_line(segment_path, tmp_path, monkeypatch, arguments, message):
    monkeypatch.setenv("VESUVIUS_DATA_URL", "http://127.0.0.1:9")  # nothing listens there: unknown IDs fail
    # A server that cannot be reached is retried with backoff for about 15 s by default; a 1 s deadline ends the
    # retries sooner, with one line naming the segment all the same (the backoff itself: tests/test_remote.py).
    monkeypatch.setenv("SEGMENT_HTTP_DEADLINE", "1")
    result = run_pretrain([*TINY, "--data_path", segment_path, "--exp_dir", str(tmp_path / "run"), *arguments],
                          timeout=120)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_resume_from_another_architecture_is_refused(segment_path, finished_run, tmp_path):
    checkpoint = finished_run / "resnet18_3d_tiny_withdecoder_spark_style.pth"
    before = checkpoint.read_bytes()
    result = run_pretrain([*TINY, "--model", "resnet50_3d_narrow", "--data_path", segment_path,
                           "--exp_dir", str(tmp_path / "b"), "--resume_from", str(checkpoint)])
    assert result.returncode == 2 and "holds a resnet18_3d_tiny model; this run builds resnet50_3d_narrow" in result.stderr
    assert checkpoint.read_bytes() == before


def test_init_weight_of_another_architecture_names_the_model_to_set(segment_path, tmp_path):
    checkpoint.save(tmp_path / "narrow.pth", "encoder", build_encoder("resnet50_3d_narrow").state_dict(),
                    InputSettings(model="resnet50_3d_narrow"))
    result = run_pretrain([*TINY, "--data_path", segment_path, "--exp_dir", str(tmp_path / "run"),
                           "--init_weight", str(tmp_path / "narrow.pth")])
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"error: encoder-only weights from {tmp_path / 'narrow.pth'} do not "
                                              "fit resnet18_3d_tiny: it holds a resnet50_3d_narrow encoder: set --model "
                                              "resnet50_3d_narrow")


def test_non_finite_loss_stops_with_a_clear_message(segment_path, tmp_path):
    import pretrain.main
    from pretrain.utils import arg_util, misc

    class NanModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def forward(self, inp_bcdhw, return_visuals=False):
            loss = self.weight.sum() * float("nan")
            return (loss, None) if return_visuals else loss

    args = arg_util.parse_args(["--exp_dir", str(tmp_path), "--vis_every", "0"])
    args.fill_runtime("cpu", 1)
    model = NanModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from pretrain.data.patches import EpochSampler

    class Zeros(torch.utils.data.Dataset):
        def __getitem__(self, key):  # keyed by (epoch, index), as the pretraining datasets
            return torch.zeros(1, 16, 96, 96)

    loader = torch.utils.data.DataLoader(Zeros(), batch_size=2, sampler=EpochSampler(6))
    with pytest.raises(pretrain.utils.schedule.NonFiniteLossError, match="loss is nan at epoch 1, iteration 0.*last good checkpoint"):
        pretrain.main.train_one_epoch(args, model, model, optimizer, loader, 0, 0, misc.TensorboardLogger(tmp_path / "tb"),
                                      tqdm.tqdm(disable=True))
    assert model.weight.item() == 1.0  # no step was taken with the non-finite loss


def test_vicreg_run_from_a_kinetics_encoder_logs_its_terms_and_refuses_a_spark_resume(segment_path, finished_run,
                                                                                      tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.save(hara_checkpoint(700, True)[0], tmp_path / "r3d18_KM_200ep.pth")
    vicreg = [*TINY, "--method", "vicreg", "--bs", "4", "--samples_per_ep", "8", "--projector", "64-64",
              "--data_path", segment_path, "--exp_dir", str(tmp_path / "vicreg")]
    result = run_pretrain([*vicreg, "--ep", "1", "--init_weight", str(tmp_path / "r3d18_KM_200ep.pth")])
    assert result.returncode == 0, result.stderr
    assert "initialised the encoder with Kinetics (resnet-18)" in result.stdout
    assert (tmp_path / "vicreg" / "resnet18_3d_tiny_withprojector_vicreg_style.pth").is_file()
    build_encoder("resnet18_3d_tiny").load_state_dict(checkpoint.read(tmp_path / "vicreg" / "resnet18_3d_tiny_timm_style.pth")["model"])
    events = EventAccumulator(str(tmp_path / "vicreg" / "tensorboard_logs")).Reload()
    terms = {"vicreg/invariance", "vicreg/variance", "vicreg/covariance", "vicreg/embedding_std"}
    assert terms <= set(events.Tags()["scalars"]) and "views/view1_view2" in events.Tags()["images"]
    epoch_record = [json.loads(line) for line in (tmp_path / "vicreg" / "log.jsonl").read_text().splitlines()][-1]
    invariance = events.Scalars("vicreg/invariance")
    assert epoch_record["vicreg__invariance"] == pytest.approx(sum(event.value for event in invariance) / len(invariance))
    assert epoch_record["vicreg__embedding_std"] > 0

    refused = run_pretrain([*vicreg, "--resume_from", str(finished_run / "resnet18_3d_tiny_withdecoder_spark_style.pth")])
    assert refused.returncode == 2 and "is a spark checkpoint; this run pretrains with vicreg" in refused.stderr


# What a tiny run of each method wrote at commit 258a180, before methods became modules of one interface (issue 24):
# each epoch's logged loss (and VICReg's terms), and sums over the tensors of the full checkpoint and of the encoder.
# One torch thread: another thread count sums in another order. On this machine the runs are bit-identical
# (also with num_workers 0); 1e-6 leaves room for another CPU's rounding, and any change of crop, view, mask,
# schedule or step moves these numbers by far more.
REFERENCE_RUNS = {
    "spark": ([], {
        "epoch 1 loss": 1.1944900155067444, "epoch 2 loss": 1.194882869720459,
        "model_sum": 1618.190378791781, "model_square_sum": 2964.1320777966057, "encoder_sum": 1177.8772606380433}),
    "vicreg": (["--method", "vicreg", "--bs", "4", "--samples_per_ep", "8", "--projector", "64-64"], {
        "epoch 1 loss": 22.686811447143555, "epoch 1 vicreg__invariance": 0.2429780811071396,
        "epoch 1 vicreg__variance": 0.6456049978733063, "epoch 1 vicreg__covariance": 0.4722348749637604,
        "epoch 1 vicreg__embedding_std": 0.28488247096538544,
        "epoch 2 loss": 21.301609992980957, "epoch 2 vicreg__invariance": 0.1927611231803894,
        "epoch 2 vicreg__variance": 0.6389736533164978, "epoch 2 vicreg__covariance": 0.5082404315471649,
        "epoch 2 vicreg__embedding_std": 0.2865765243768692,
        "model_sum": 1344.3939888648724, "model_square_sum": 3575.6442180231725, "encoder_sum": 1251.5748822615656}),
}


@pytest.mark.parametrize("method", REFERENCE_RUNS)
def test_a_tiny_run_writes_what_it_wrote_before_methods_became_modules(method, tmp_path):
    volume = random_volume((65, 128, 128), seed=11)  # the module's segment, rebuilt: its fixture may change
    segment = write_zarr_segment(tmp_path / "tiny.zarr", volume, chunks=(32, 64, 64))
    write_png(segment / "mask.png", rectangle_mask((128, 128), margin=4))
    settings, expected = REFERENCE_RUNS[method]
    result = run_pretrain([*DEFAULT_WORKERS, "--cpu_threads", "1", "--ep", "2", "--data_path", str(segment),
                           "--exp_dir", str(tmp_path / "run"), *settings])
    assert result.returncode == 0, result.stderr

    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    written = {f"epoch {record['epoch']} {name}": value for record in records if record["event"] == "epoch"
               for name, value in record.items() if name == "loss" or name.startswith("vicreg__")}
    model_state = checkpoint.read(next((tmp_path / "run").glob("*_with*_style.pth")))["model"]
    encoder_state = checkpoint.read(tmp_path / "run" / "resnet18_3d_tiny_timm_style.pth")["model"]
    written["model_sum"] = sum(float(tensor.double().sum()) for tensor in model_state.values())
    written["model_square_sum"] = sum(float(tensor.double().pow(2).sum()) for tensor in model_state.values())
    written["encoder_sum"] = sum(float(tensor.double().sum()) for tensor in encoder_state.values())
    # Another CPU (another SIMD width, so another summation order) moves two epochs' weights by a few 1e-6;
    # a change of the step itself (other data or masks, a step more or less, lr 1 % off) moves them past 1e-5.
    assert written == pytest.approx(expected, rel=1e-5)


def test_the_tile_side_has_one_name_and_the_old_one_still_works_with_a_note(capsys):
    from pretrain.utils import arg_util

    assert arg_util.parse_args(["--tile_size", "64"]).tile_size == 64 and not capsys.readouterr().err
    assert arg_util.parse_args(["--input_size", "64"]).tile_size == 64
    assert arg_util.parse_args(["--input_size=128"]).tile_size == 128
    assert capsys.readouterr().err.strip().splitlines() == [
        "note: --input_size is now --tile_size; the old name still works"] * 2
