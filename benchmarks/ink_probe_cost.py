"""What does the online ink probe (pretrain/probe.py) cost, as a fraction of a pretraining epoch?

    python benchmarks/ink_probe_cost.py --model resnet50_3d_narrow               # docs/pretrain.md's CPU path
    python benchmarks/ink_probe_cost.py --model resnet50_3d --depth 32 --tile_size 256 --bs 8 --steps 20   # a GPU

Any pretrain/main.py setting may be given (defaults as there). The script builds what pretrain/main.py builds (the
data, the method's model, its optimiser and the probe), trains `--steps` steps twice (a warm-up epoch, which starts the
DataLoader workers, then a timed one) and extrapolates the epoch: seconds per timed step × samples_per_ep / bs. It
times the probe's one-time work (reading the tiles; the random initialisation's baseline) apart from what it costs
every `probe_every` epochs (`OnlineProbe.after_epoch`, median of `--probes`), and divides the latter by the epoch.
Wall time and this process's CPU time are both given: on a shared machine the CPU time is the steadier number (the
DataLoader workers' CPU time is not in it; the probe reads no data after its first read), and the load average is
given beside it. Writes benchmarks/results/ink_probe_cost.json and prints a Markdown table.
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import pretrain.torchvision_compat  # noqa: F401 - must precede timm (LAMB)
import torch
import tqdm

import pretrain.main
from pretrain import dist
from pretrain.data.patches import voxel_dtypes
from pretrain.data.segment import open_segment
from pretrain.probe import OnlineProbe
from pretrain.utils import arg_util, errors, misc


def timed(work) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of `work()`."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps (after as many to warm up)")
    parser.add_argument("--probes", type=int, default=2, help="timed probes (the median is reported)")
    options, pretrain_arguments = parser.parse_known_args()
    load_before = os.getloadavg()
    folder = tempfile.mkdtemp(prefix="ink_probe_cost_")
    args = arg_util.parse_args([*pretrain_arguments, "--exp_dir", folder])
    device = dist.initialize()
    args.fill_runtime(str(device), 1)
    if device.type == "cpu":
        torch.set_num_threads(args.cpu_threads or pretrain.main.automatic_cpu_threads(args.num_workers))
    torch.manual_seed(args.seed)
    segments = open_segment(args.data_path, scroll=args.scroll, lru_bytes=args.lru_mb * 2**20)
    args.voxel_dtype = voxel_dtypes(segments)
    epoch_samples = args.samples_per_ep
    args.samples_per_ep = options.steps * args.bs
    loader = pretrain.main.build_loader(args, segments, device)
    read_wall, read_cpu, ink_probe = timed(lambda: OnlineProbe.build(args, segments))
    if not ink_probe.enabled:
        raise SystemExit(f"error: the probe is {ink_probe.note}")
    model = pretrain.main.build_model(args).to(device)
    optimizer = pretrain.main.build_optimizer(args, model)
    log = misc.JsonLinesLog(pathlib.Path(folder) / "log.jsonl")
    tensorboard = misc.TensorboardLogger(pathlib.Path(folder) / "tensorboard_logs")

    def train(epoch: int):
        return pretrain.main.train_one_epoch(args, model, model, optimizer, loader, epoch, epoch * options.steps,
                                             tensorboard, tqdm.tqdm(disable=True))

    train(0)  # warm-up: the DataLoader workers start, the allocator settles
    train_wall, train_cpu, _ = timed(lambda: train(1))
    baseline_wall, baseline_cpu, _ = timed(lambda: ink_probe.start(log, tensorboard))
    probes = [timed(lambda: ink_probe.after_epoch(model, args.ep - 1, 0, tensorboard)) for _ in range(options.probes)]
    probe_wall, probe_cpu = statistics.median(p[0] for p in probes), statistics.median(p[1] for p in probes)
    epoch_steps = epoch_samples / args.bs
    epoch_wall, epoch_cpu = train_wall / options.steps * epoch_steps, train_cpu / options.steps * epoch_steps
    result = {
        "command": " ".join([sys.executable, *sys.argv]), "commit": misc.git_commit(), "device": str(device),
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "settings": {key: getattr(args, key) for key in ("method", "model", "depth", "tile_size", "bs", "num_workers",
                                                           "probe_tiles", "probe_every")},
        "probe_tiles_kept": len(ink_probe.tiles.fit), "timed_steps": options.steps, "epoch_steps": epoch_steps,
        "step_seconds": train_wall / options.steps, "epoch_seconds": epoch_wall, "epoch_cpu_seconds": epoch_cpu,
        "probe_seconds": probe_wall, "probe_cpu_seconds": probe_cpu, "probe_fraction_of_epoch": probe_wall / epoch_wall,
        "probe_cpu_fraction_of_epoch": probe_cpu / epoch_cpu,
        "once_read_tiles_seconds": read_wall, "once_baseline_seconds": baseline_wall,
        "probe_auc": probes[-1][2]["probe__auc"], "probe_auc_random": probes[-1][2]["probe__auc_random"],
    }
    output = pathlib.Path(__file__).resolve().parent / "results" / "ink_probe_cost.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"| {args.model}, {args.depth} × {args.tile_size}², bs {args.bs}, {device} | seconds |")
    print("|---|---|")
    print(f"| one step (mean of the timed epoch) | {result['step_seconds']:.2f} |")
    print(f"| one epoch of {epoch_samples} samples (extrapolated) | {epoch_wall:.0f} (CPU {epoch_cpu:.0f}) |")
    print(f"| one probe, {result['probe_tiles_kept']} tiles | {probe_wall:.1f} (CPU {probe_cpu:.1f}) |")
    print(f"| probe / epoch | {probe_wall / epoch_wall:.1%} (CPU {probe_cpu / epoch_cpu:.1%}) |")
    print(f"| once: reading the tiles; the random baseline | {read_wall:.1f}; {baseline_wall:.1f} |")
    print(f"load average {load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after; {output}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
