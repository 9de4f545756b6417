"""Whole-segment inference: our streamed sliding window against one that holds the segment in RAM.

    python benchmarks/inference_memory.py                                   # 65 × 2048 × 2048, stride 32
    python benchmarks/inference_memory.py --sizes 8192 --stride 64          # larger, behind the flag

A segment zarr is generated chunk by chunk (as in sampling_memory.py), then two fresh processes predict
ink over its whole mask with the same seeded InkUNet, tile, stride, batch and Gaussian blending:
- ours: `finetune.inference.predict_segment`, tiles read through the segment reader by a DataLoader worker
  (so reading overlaps the model), only the current band of rows accumulated, the map written row band by
  row band to a zarr on disk;
- in RAM, the Grand Prize approach: the model's depth window read into one (D, Y, X) uint8 array, (Y, X)
  float32 sums of weighted predictions and of weights, tiles sliced from RAM, the map divided at the end.
Each reports tiles/s (the in-RAM time includes loading the volume: both decode every chunk once). Memory is
the proportional set size (PSS) of the probe's whole process tree, polled every 100 ms: its peak, and its
value after imports and model build (the baseline, before any data), so the table gives both the total and
the part that grows with the segment. PSS counts pages a DataLoader worker shares with its parent once. The two maps are then
compared pixel by pixel. Writes benchmarks/results/inference_memory.json and prints a Markdown table.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import zarr

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

from benchmarks.sampling_memory import generate_segment
from pretrain.utils import errors

MEMORY_POLL_SECONDS = 0.1  # reading smaps_rollup walks the page tables: polling faster costs a core

COMMON = r"""
import json, sys, time
import pretrain.torchvision_compat
import numpy as np, torch
from finetune import inference
from finetune.model import build_ink_unet
from pretrain import dist
segment_path, output_path, model_name, depth, tile, stride, batch_size, threads = sys.argv[1:9]
depth, tile, stride, batch_size = int(depth), int(tile), int(stride), int(batch_size)
torch.set_num_threads(int(threads))
torch.manual_seed(0)
device = dist.initialize()
model = build_ink_unet(model_name).eval().to(device)
"""

STREAMED = COMMON + r"""
import zarr
from pretrain.data.patches import InputSettings
from pretrain.data.segment import open_segment
settings = InputSettings(model=model_name, depth=depth, tile_size=tile)
segment = open_segment(segment_path, lru_bytes=int(sys.argv[9]) * 2**20)
print("ready", flush=True)  # the benchmark takes the baseline memory now
output = zarr.create_array(output_path, shape=segment.mask.shape, chunks=(tile, 4096), dtype="float32", fill_value=0)
tiles = len(inference.covering_origins(segment.mask, tile, stride))
started = time.perf_counter()
inference.predict_segment(model, segment, segment.mask, settings, stride, batch_size, device,
                          num_workers=int(sys.argv[10]), output_yx=output)
seconds = time.perf_counter() - started
print(json.dumps({"tiles": tiles, "seconds": seconds, "tiles_per_second": tiles / seconds}))
"""

IN_RAM = COMMON + r"""
import cv2, zarr
from pretrain.data.patches import depth_window, normalize_patch
array = zarr.open_group(segment_path, mode="r")["0"]
mask_yx = cv2.imread(segment_path + "/mask.png", cv2.IMREAD_GRAYSCALE) > 0
print("ready", flush=True)  # the benchmark takes the baseline memory now
started = time.perf_counter()
volume_dyx = array[depth_window(array.shape[0], depth)]  # the depth window, whole, as uint8
weights_tt = inference.gaussian_weights(tile)
weighted_sum_yx = np.zeros(mask_yx.shape, np.float32)
weight_sum_yx = np.zeros(mask_yx.shape, np.float32)
origins = inference.covering_origins(mask_yx, tile, stride)
with torch.no_grad():
    for first in range(0, len(origins), batch_size):
        batch = origins[first:first + batch_size]
        tiles_b1dtt = torch.from_numpy(np.stack([normalize_patch(volume_dyx[:, y:y + tile, x:x + tile], "range")
                                                  for y, x in batch]))[:, None].to(device)
        with dist.autocast(device):  # as predict_segment
            probabilities_btt = torch.sigmoid(model(tiles_b1dtt).float())[:, 0].cpu().numpy()
        for (y, x), probabilities_tt in zip(batch, probabilities_btt):
            weighted_sum_yx[y:y + tile, x:x + tile] += weights_tt * probabilities_tt
            weight_sum_yx[y:y + tile, x:x + tile] += weights_tt
probabilities_yx = np.divide(weighted_sum_yx, weight_sum_yx, out=weighted_sum_yx, where=weight_sum_yx > 0)
probabilities_yx[~mask_yx] = 0.0
seconds = time.perf_counter() - started
np.save(output_path, probabilities_yx)
print(json.dumps({"tiles": len(origins), "seconds": seconds, "tiles_per_second": len(origins) / seconds}))
"""


def process_tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants: pages shared between a process and
    its forked DataLoader workers count once, split between them."""
    total_kib, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as rollup:
                total_kib += next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending += [int(child) for child in children.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue  # a process that just ended
    return total_kib / 1024


def run_measured(probe: str, *arguments) -> dict:
    """Run a probe, polling its process tree's memory: the peak, and the baseline when it says "ready"."""
    process = subprocess.Popen([sys.executable, "-c", probe, *map(str, arguments)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    memory = {"peak": 0.0, "baseline": None, "running": True}

    def poll() -> None:
        while memory["running"]:
            memory["peak"] = max(memory["peak"], process_tree_pss_mib(process.pid))
            time.sleep(MEMORY_POLL_SECONDS)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        if process.stdout.readline().strip() == "ready":
            memory["baseline"] = process_tree_pss_mib(process.pid)
        result_line = process.stdout.readline()
        messages = process.stderr.read()
        process.wait()
    finally:
        memory["running"] = False
        poller.join()
    if process.returncode != 0 or memory["baseline"] is None:
        raise SystemExit(f"error: the probe failed: {(messages.strip().splitlines() or ['no output'])[-1]}")
    return {**json.loads(result_line), "baseline_pss_mib": memory["baseline"], "peak_pss_mib": memory["peak"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048], help="segment sides (Y = X)")
    parser.add_argument("--model", default="resnet50_3d_narrow", help="encoder of the InkUNet (random weights)")
    parser.add_argument("--depth", type=int, default=32, help="layers per tile (the Grand Prize used 26)")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each process")
    parser.add_argument("--lru_mb", type=int, default=256, help="our reader's cache of decoded chunks")
    parser.add_argument("--num_workers", type=int, default=1, help="our DataLoader workers (reading overlaps the model)")
    args = parser.parse_args()
    settings = [args.model, args.depth, args.tile, args.stride, args.batch_size, args.threads]
    rows = []
    print("| segment | tiles | ours: tiles/s | in RAM: tiles/s | throughput ratio | ours: peak PSS (over baseline) "
          "| in RAM: peak PSS (over baseline) | PSS ratio (over baseline) | max abs difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side in args.sizes:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="inference_memory_"))
        try:
            generate_segment(folder / "segment.zarr", side)
            ours = run_measured(STREAMED, folder / "segment.zarr", folder / "ours.zarr", *settings, args.lru_mb,
                                args.num_workers)
            in_ram = run_measured(IN_RAM, folder / "segment.zarr", folder / "in_ram.npy", *settings)
            reference = np.load(folder / "in_ram.npy", mmap_mode="r")
            streamed = zarr.open_array(folder / "ours.zarr", mode="r")
            difference = max(float(np.abs(streamed[y:y + 1024] - reference[y:y + 1024]).max())
                             for y in range(0, side, 1024))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = {"segment": f"65 × {side} × {side}", "ours": ours, "in_ram": in_ram, "max_abs_difference": difference,
               "throughput_ratio": ours["tiles_per_second"] / in_ram["tiles_per_second"],
               "pss_ratio": ours["peak_pss_mib"] / in_ram["peak_pss_mib"],
               "pss_over_baseline_ratio": ((ours["peak_pss_mib"] - ours["baseline_pss_mib"])
                                           / (in_ram["peak_pss_mib"] - in_ram["baseline_pss_mib"]))}
        rows.append(row)

        def memory(result):
            return f"{result['peak_pss_mib']:.0f} MiB ({result['peak_pss_mib'] - result['baseline_pss_mib']:.0f})"

        print(f"| {row['segment']} | {ours['tiles']} | {ours['tiles_per_second']:.1f} | {in_ram['tiles_per_second']:.1f} "
              f"| {row['throughput_ratio']:.2f} | {memory(ours)} | {memory(in_ram)} | {row['pss_ratio']:.3f} "
              f"({row['pss_over_baseline_ratio']:.3f}) | {difference:.1e} |", flush=True)
    output = REPO_ROOT / "benchmarks" / "results" / "inference_memory.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    errors.install(__file__)
    main()
