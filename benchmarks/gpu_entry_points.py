"""Every entry point on the GPU: samples/s, tiles/s and peak GPU memory, for notes/performance.md.

    python benchmarks/gpu_entry_points.py            # on a GPU machine: a few minutes, realistic sizes
    python benchmarks/gpu_entry_points.py --smoke    # the same sequence at tiny sizes, on any device (a minute or two)

Each step is the real command, run as a subprocess on the demo segment (`--segment`):
1. SparK pretraining, resnet50_3d, 32 layers × 256², bf16 (the entry scripts' default on a GPU), two epochs of
   `--steps` steps; samples/s and the data-wait fraction are the second epoch's, from the run's log.jsonl;
2. the same with VICReg, and with every other method registered in pretrain/methods.py;
3. fine-tuning from the SparK encoder (its model and input settings, as the checkpoint records them) for one
   epoch, then the whole-segment prediction: samples/s of the training epoch (its progress bar's count over its
   elapsed time, worker start-up included), tiles/s of the prediction (its tiles over the log's prediction
   seconds, which include scoring the prediction);
4. `evaluate/ink_map.py` on the SparK encoder: tiles/s of its encoding loop (progress bar, as above);
5. SparK pretraining as in 1., on two GPUs with torchrun (the same batch per GPU), where there are two or more.
   `--smoke` on a machine without a GPU runs it as two CPU processes instead, to check the command.
Peak GPU memory is nvidia-smi's `memory.used` polled during each run (CUDA context and the caching allocator's
reserve included: what the run holds), with its value before the run. The progress bars' counts come from tqdm's
TQDM_BAR_FORMAT variable, so the entry scripts need no timing code of their own.
Utilisation, per training run: FLOPs per sample as torch's FlopCounterMode counts one forward + backward at the run's
sizes (benchmarks/utilisation.py), times samples/s, as TFLOP/s and as a share of the device's peak: a bf16 matrix
product measured after the runs (fp32 on a CPU), and the data sheet's dense bf16 figure where the GPU is known
(H100, H200). `benchmarks/pretrain_levers.py` compares pretraining's throughput settings on the same terms.

Prints the environment and a Markdown table; writes benchmarks/results/gpu_entry_points.json (with `--smoke`:
gpu_entry_points_smoke.json). Runs write into a temporary folder, removed at the end unless a run failed
(`--work_dir` keeps them). Without a GPU and without `--smoke`, it says so in one line and measures nothing.
"""
import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import torch

from benchmarks import utilisation
from finetune.inference import covering_origins
from evaluate import encoder_input
from pretrain import checkpoint, methods
from pretrain.data.patches import SOME_PAPYRUS, tile_origins
from pretrain.data.remote import RemoteReadError
from pretrain.data.segment import SegmentError, open_segment
from pretrain.utils import arg_util, errors, run_log
from pretrain.utils.misc import RenamedOption, write_bytes_atomic

# tqdm takes its defaults from TQDM_* variables: every progress bar of a run then ends with a line giving its
# description, its count and its elapsed seconds.
PROGRESS_FORMAT = "{desc}|n={n}|elapsed={elapsed_s:.3f}"
PROGRESS_LINE = re.compile(r"([^\r\n|]*)\|n=(\d+)\|elapsed=([0-9.]+)")
MEMORY_POLL_SECONDS = 0.5
# Tiny sizes for --smoke (options given on the command line still win), and the settings that keep each run
# to seconds on a CPU: a small decoder and projector, few fine-tuning tiles, a coarse prediction grid.
SMOKE_SIZES = {"model": "resnet18_3d_tiny", "depth": 16, "input_size": 64, "bs": 2, "steps": 2, "finetune_batch": 4,
               "inference_stride": 64, "num_workers": 1}
SMOKE_PRETRAIN = ["--decoder_width", "32", "--projector", "64-64"]
SMOKE_FINETUNE = ["--STRIDE", "128", "--MIN_TILES_PER_EPOCH", "16"]
NO_GPU_LINE = "no GPU found (torch.cuda.is_available() is False): nothing measured; --smoke runs the tiny sequence here"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is")
    encoder_input.add_segment_argument(parser, "segment spec for every run")
    parser.add_argument("--model", default="resnet50_3d", help="encoder (fine-tuning and ink_map take SparK's)")
    parser.add_argument("--depth", type=int, default=32, help="layers per tile")
    parser.add_argument("--tile_size", "--input_size", dest="input_size", type=int, default=256, action=RenamedOption,
                        help="tile side in pixels (--input_size: its older name)")
    parser.add_argument("--bs", type=int, default=8, help="pretraining batch per GPU")
    parser.add_argument("--steps", type=int, default=24, help="pretraining steps per epoch (two epochs)")
    parser.add_argument("--finetune_batch", type=int, default=16, help="fine-tuning and prediction batch")
    parser.add_argument("--inference_stride", type=int, default=32, help="whole-segment prediction stride")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers per process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take before it is stopped")
    parser.add_argument("--work_dir", default="", help="keep the runs' outputs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**SMOKE_SIZES)
        args = parser.parse_args(argv)
    return args


class GpuMemoryPoller:
    """Peak nvidia-smi `memory.used` (MiB) per GPU while the `with` block runs, and its value at the start.
    Nothing (None) where nvidia-smi is missing, as on a CPU machine."""

    def __init__(self) -> None:
        self.before = self.peak = gpu_memory_used_mib()
        self.running = False

    def poll(self) -> None:
        while self.running:
            used = gpu_memory_used_mib()
            if used is not None and self.peak is not None:
                self.peak = [max(peak, now) for peak, now in zip(self.peak, used)]
            time.sleep(MEMORY_POLL_SECONDS)

    def __enter__(self) -> "GpuMemoryPoller":
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exception) -> None:
        self.running = False
        self.thread.join()


def nvidia_smi(fields: str) -> list[list[str]] | None:
    """One row of `fields` per GPU, or None without nvidia-smi."""
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return [[value.strip() for value in line.split(",")] for line in result.stdout.strip().splitlines()]


def gpu_memory_used_mib() -> list[int] | None:
    rows = nvidia_smi("memory.used")
    try:
        return None if rows is None else [int(row[0]) for row in rows]
    except ValueError:  # "[N/A]", as a MIG slice reports it
        return None


def environment(gpu_count: int) -> dict:
    """What the numbers were measured on. GPU names come from nvidia-smi: asking torch would open a CUDA
    context in this process, whose memory every run's measurement would then include."""
    gpus = [{"name": name, "memory_mib": memory, "driver": driver}
            for name, memory, driver in nvidia_smi("name,memory.total,driver_version") or []]
    return {"gpu_count": gpu_count, "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if gpu_count else None, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}


def describe_environment(info: dict) -> str:
    if info["gpu_count"]:
        names = ", ".join(f"{gpu['name']} ({gpu['memory_mib']} MiB)" for gpu in info["gpus"]) or "names unknown"
        device = f"{info['gpu_count']} GPU(s): {names}; driver {info['gpus'][0]['driver'] if info['gpus'] else '?'}"
    else:
        device = "no GPU: CPU only"
    return (f"{device}; torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}; Python {info['python']}; "
            f"{info['cpu_count']} CPU cores ({info['cpu']})")


def run(name: str, command: list[str], work_dir: pathlib.Path, timeout: float) -> dict:
    """Run one command with its output in work_dir/<name>.log; its exit status, wall time, GPU memory and output."""
    log_path = work_dir / f"{name}.log"
    environment_variables = {**os.environ, "TQDM_BAR_FORMAT": PROGRESS_FORMAT, "PYTHONUNBUFFERED": "1"}
    print(f"running {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log, GpuMemoryPoller() as memory:
        # A session of its own, so that a run past its time is stopped with every process it started.
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=environment_variables, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    output = log_path.read_text(errors="replace")
    lines = [line.strip() for line in re.split(r"[\r\n]", output) if line.strip()]
    error = None
    if returncode != 0:
        errors = [line for line in lines if line.startswith("error:")]
        error = f"timed out after {timeout:.0f} s" if returncode is None else (errors or lines or ["no output"])[-1]
    return {"name": name, "command": command, "returncode": returncode, "error": error,
            "wall_seconds": time.perf_counter() - started, "gpu_memory_before_mib": memory.before,
            "gpu_memory_peak_mib": memory.peak, "output": output}


def last_progress(output: str, description: str) -> tuple[int, float] | None:
    """(count, elapsed seconds) of the last progress-bar line whose description starts with `description`."""
    matches = [(int(count), float(elapsed)) for desc, count, elapsed in PROGRESS_LINE.findall(output)
               if desc.strip().startswith(description)]
    return matches[-1] if matches else None


def log_records(run_dir: pathlib.Path, event: str) -> list[dict]:
    """The run's `event` records, none if it wrote no log (it failed before its first epoch)."""
    return run_log.records(run_dir, event) if (run_dir / "log.jsonl").is_file() else []


def pretraining_measures(exp_dir: pathlib.Path) -> dict:
    """The last epoch's samples/s (all processes together) and data-wait fraction, from log.jsonl."""
    epochs = log_records(exp_dir, "epoch")
    if not epochs:
        return {}
    return {"samples_per_s": epochs[-1]["samples_per_s"], "data_wait_fraction": epochs[-1]["data_wait_fraction"],
            "epoch_seconds": epochs[-1]["seconds"]}


def pretrain_options(args, method: str, exp_dir: pathlib.Path, processes: int = 1) -> list[str]:
    return ["--method", method, "--model", args.model, "--depth", str(args.depth), "--tile_size", str(args.input_size),
            "--bs", str(args.bs * processes), "--samples_per_ep", str(args.bs * processes * args.steps), "--ep", "2",
            "--wp_ep", "1", "--num_workers", str(args.num_workers), "--data_path", args.segment,
            "--exp_dir", str(exp_dir), "--exp_name", exp_dir.name, *(SMOKE_PRETRAIN if args.smoke else [])]


def pretrain_command(args, method: str, exp_dir: pathlib.Path, processes: int = 1) -> list[str]:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, str(REPO_ROOT / "pretrain" / "main.py"), *pretrain_options(args, method, exp_dir, processes)]


def finetune_measures(args, result: dict, experiment_dir: pathlib.Path, segment) -> dict:
    """Training samples/s from the epoch's progress bar; prediction tiles/s from the log's prediction seconds."""
    measures = {}
    progress = last_progress(result["output"], "epoch 1/1")
    if progress is not None:
        steps, elapsed = progress
        measures.update(samples_per_s=steps * args.finetune_batch / elapsed, training_steps=steps,
                        training_seconds=elapsed)
    predictions = log_records(experiment_dir, "prediction")
    if predictions:
        tiles = len(covering_origins(segment.mask, args.input_size, args.inference_stride))
        measures.update(prediction_tiles=tiles, prediction_seconds=predictions[-1]["seconds"],
                        tiles_per_s=tiles / max(predictions[-1]["seconds"], 0.1))
    return measures


def ink_map_measures(args, result: dict, segment) -> dict:
    progress = last_progress(result["output"], "encoding tiles")
    if progress is None:
        return {}
    batches, elapsed = progress
    # The tiles of evaluate/ink_map.py's feature_grid: half-tile stride, mask coverage ≥ SOME_PAPYRUS.
    tiles = len(tile_origins(segment, args.input_size, args.input_size // 2, min_mask_fraction=SOME_PAPYRUS))
    return {"tiles": tiles, "batches": batches, "encoding_seconds": elapsed, "tiles_per_s": tiles / elapsed}


def run_all(args, work_dir: pathlib.Path, segment, gpu_count: int) -> list[dict]:
    """Every entry point in turn (every registered pretraining method); a run that needs the SparK encoder is skipped
    when there is none. Each training run's counted FLOPs per sample are counted here first, on the meta device or the
    CPU (benchmarks/utilisation.py), so that this process opens no CUDA context while the runs' memory is polled."""
    sizes = f"{args.model}, {args.depth} × {args.input_size}²"
    results = []
    for method in methods.METHODS:
        options = pretrain_options(args, method, work_dir / method)
        flops_per_sample = utilisation.pretraining_flops_per_sample(arg_util.parse_args(options), [segment])
        result = run(method, pretrain_command(args, method, work_dir / method), work_dir, args.timeout)
        result.update(label=f"{methods.get(method).title}, {sizes}, bs {args.bs}, 2 epochs × {args.steps} steps",
                      flops_per_sample=flops_per_sample, **pretraining_measures(work_dir / method))
        results.append(result)

    encoder_path = checkpoint.encoder_file(work_dir / "spark", args.model)
    if encoder_path.is_file():
        command = [sys.executable, str(REPO_ROOT / "finetune" / "train.py"), "--exp_name", "finetune",
                   "--OUTPUT_DIR", str(work_dir), "--segment_id", args.segment, "--pretrained_path", str(encoder_path),
                   "--NUM_EPOCHS", "1", "--BATCH_SIZE", str(args.finetune_batch),
                   "--INFERENCE_STRIDE", str(args.inference_stride), "--NUM_WORKERS", str(args.num_workers),
                   *(SMOKE_FINETUNE if args.smoke else [])]
        flops_per_sample = utilisation.finetuning_flops_per_sample(args.model, args.depth, args.input_size)
        result = run("finetune", command, work_dir, args.timeout)
        result.update(label=f"fine-tuning 1 epoch (bs {args.finetune_batch}) + whole-segment prediction "
                            f"(stride {args.inference_stride}), SparK encoder", flops_per_sample=flops_per_sample,
                      **finetune_measures(args, result, work_dir / "finetune", segment))
        results.append(result)
        command = [sys.executable, str(REPO_ROOT / "evaluate" / "ink_map.py"), "--pretrained_path", str(encoder_path),
                   "--segment_id", args.segment, "--output", str(work_dir / "ink_map")]
        result = run("ink_map", command, work_dir, args.timeout)
        result.update(label="evaluate/ink_map.py, SparK encoder, stage 1", **ink_map_measures(args, result, segment))
        results.append(result)
    else:
        print("skipped fine-tuning and ink_map: SparK pretraining left no encoder", flush=True)

    # Two processes need two GPUs, one each; without any GPU (--smoke only) two CPU processes check the command.
    if gpu_count >= 2 or (gpu_count == 0 and args.smoke):
        exp_dir = work_dir / "spark_torchrun"
        result = run("spark_torchrun", pretrain_command(args, "spark", exp_dir, processes=2), work_dir, args.timeout)
        result.update(label=f"SparK pretraining, torchrun × 2 {'GPUs' if gpu_count else 'CPU processes'}, {sizes}, "
                            f"bs {args.bs} per process (samples/s of both)", devices=2,
                      flops_per_sample=next(result for result in results if result["name"] == "spark")["flops_per_sample"],
                      **pretraining_measures(exp_dir))
        results.append(result)
    else:
        print("skipped torchrun: it needs two GPUs, and this machine has one", flush=True)
    return results


def device_peaks(info: dict, smoke: bool) -> dict:
    """FLOP/s of one device: a matrix product measured now (after the runs: measuring opens a CUDA context here, which
    would have counted in the runs' memory), and the data sheet's for the GPU's name where known."""
    device = torch.device("cuda" if info["gpu_count"] else "cpu")
    measured = (utilisation.measured_matmul_peak(device, size=1024, repeats=3) if smoke and device.type == "cpu"
                else utilisation.measured_matmul_peak(device))
    sheet = utilisation.data_sheet_peak(info["gpus"][0]["name"]) if info["gpus"] else None
    return {"measured_flops_per_s": measured, "data_sheet_flops_per_s": sheet}


def add_utilisation(results: list[dict], peaks: dict) -> None:
    """Each training run's achieved FLOP/s (counted FLOPs per sample × samples/s) and its share of the peak of the
    devices it ran on."""
    for result in results:
        devices = result.get("devices", 1)
        measured = utilisation.utilisation(result.get("flops_per_sample"), result.get("samples_per_s"),
                                           devices * peaks["measured_flops_per_s"])
        sheet = peaks["data_sheet_flops_per_s"]
        result.update(achieved_flops_per_s=measured["achieved_flops_per_s"],
                      share_of_measured_peak=measured["share_of_peak"],
                      share_of_data_sheet_peak=utilisation.utilisation(result.get("flops_per_sample"),
                                                                       result.get("samples_per_s"),
                                                                       devices * sheet if sheet else None)["share_of_peak"])


def table(results: list[dict]) -> str:
    def number(value, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    def memory(result: dict) -> str:
        if result["gpu_memory_peak_mib"] is None:
            return "–"
        # Several GPUs (torchrun): the busiest one, which bounds what fits.
        peak, before = max(zip(result["gpu_memory_peak_mib"], result["gpu_memory_before_mib"]))
        return f"{peak} MiB ({before} before)"

    def share(value) -> str:
        return "–" if value is None else f"{value:.1%}"

    rows = ["| run | samples/s | tiles/s | GFLOP/sample | TFLOP/s | share of peak: matmul / data sheet | data wait | "
            "peak GPU memory | wall s | outcome |", "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        wait = result.get("data_wait_fraction")
        flops, achieved = result.get("flops_per_sample"), result.get("achieved_flops_per_s")
        rows.append(f"| {result['label']} | {number(result.get('samples_per_s'))} | "
                    f"{number(result.get('tiles_per_s'))} | {'–' if flops is None else f'{flops / 1e9:.1f}'} | "
                    f"{'–' if achieved is None else f'{achieved / 1e12:.3f}'} | "
                    f"{share(result.get('share_of_measured_peak'))} / {share(result.get('share_of_data_sheet_peak'))} | "
                    f"{'–' if wait is None else f'{wait:.0%}'} | {memory(result)} | {result['wall_seconds']:.0f} | "
                    f"{result['error'] or 'ok'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_count == 0 and not args.smoke:
        print(NO_GPU_LINE)
        return 0
    info = environment(gpu_count)
    print(f"environment: {describe_environment(info)}", flush=True)
    try:
        segment = open_segment(args.segment)  # built or fetched once here, so that no run's time includes it
    except (SegmentError, RemoteReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"segment: {segment}", flush=True)
    work_dir = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_entry_points_"))
    if work_dir.is_dir() and any(work_dir.iterdir()) and args.work_dir:
        print(f"error: --work_dir {work_dir} is not empty: the runs would resume there instead of running",
              file=sys.stderr)
        return 2
    work_dir.mkdir(parents=True, exist_ok=True)
    results = run_all(args, work_dir, segment, gpu_count)
    peaks = device_peaks(info, args.smoke)
    add_utilisation(results, peaks)

    failed = [result["name"] for result in results if result["error"]]
    for result in results:
        if result["error"]:
            print(f"\n{result['name']} failed; the end of its output ({work_dir / (result['name'] + '.log')}):\n"
                  + "\n".join(result["output"].replace("\r", "\n").strip().splitlines()[-15:]))
    output = REPO_ROOT / "benchmarks" / "results" / f"gpu_entry_points{'_smoke' if args.smoke else ''}.json"
    output.parent.mkdir(exist_ok=True)
    summary = [{key: value for key, value in result.items() if key != "output"} for result in results]
    write_bytes_atomic(output, json.dumps({"settings": vars(args), "environment": info, "peaks": peaks, "runs": summary},
                                          indent=1, default=str).encode())
    print(f"\n{'smoke run (tiny sizes), ' if args.smoke else ''}{describe_environment(info)}; "
          f"bf16 autocast on the GPU (fp32 on the CPU)\n")
    print(table(results))
    print(f"\nwritten to {output}")
    if failed:
        print(f"failed: {', '.join(failed)}; their outputs stay in {work_dir}")
        return 1
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
