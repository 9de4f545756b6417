"""Peak memory and speed of patch sampling as the segment grows, against loading the segment into RAM.

    python benchmarks/sampling_memory.py                                  # 65 × 2048 × 2048
    python benchmarks/sampling_memory.py --sizes 2048 4096 8192           # the larger sizes
    python benchmarks/sampling_memory.py --sizes 8192 --in_ram_dtype float32

For each size, a segment zarr is generated chunk by chunk (so generation itself stays bounded) into a
temporary folder. Then two fresh processes sample the same number of pretraining crops at random
positions over the mask:
- ours: RandomPatchDataset reading through the segment reader (chunk reads, a bounded LRU);
- in RAM: the common approach, the whole volume read into one float array (float64 as ScrollMAE stores it,
  or `--in_ram_dtype float32`), then crops sliced from it. A size whose array would not fit in the RAM
  available is not run; its row gives the bytes it would need.
Each reports its peak RSS and patches/s. The content is cheap to compress (smooth ramps plus a little
noise per chunk): the files stay small, while every chunk decodes to full size.
Writes benchmarks/results/sampling_memory.json and prints a Markdown table.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

from pretrain.utils import errors  # noqa: E402

PROBE = r"""
import json, resource, sys, time
from pretrain.data.patches import InputSettings, RandomPatchDataset
from pretrain.data.segment import open_segment
path, depth, tile, samples, lru_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
segment = open_segment(path, lru_bytes=lru_mb * 2**20)
dataset = RandomPatchDataset([segment], InputSettings(depth=depth, tile_size=tile), samples_per_epoch=samples, seed=0)
started = time.perf_counter()
for index in range(samples):
    dataset[0, index]
seconds = time.perf_counter() - started
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "patches_per_second": samples / seconds, "decoded_chunks": segment.volume.decoded_chunks}))
"""

IN_RAM_PROBE = r"""
import json, resource, sys, time
import cv2, numpy as np, zarr
from pretrain.data.patches import depth_window  # imports torch, as any training process does
path, depth, tile, samples, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
array = zarr.open_group(path, mode="r")["0"]
started = time.perf_counter()
volume = np.empty(array.shape, dtype)  # the whole segment as float, filled one chunk row at a time
rows = array.chunks[1]
for y in range(0, array.shape[1], rows):
    volume[:, y:y + rows] = array[:, y:y + rows, :]
load_seconds = time.perf_counter() - started
layers = depth_window(array.shape[0], depth)
mask = cv2.imread(path + "/mask.png", cv2.IMREAD_GRAYSCALE) > 0
ys, xs = np.nonzero(mask[: array.shape[1] - tile, : array.shape[2] - tile])
rng = np.random.default_rng(0)
started = time.perf_counter()
for index in rng.integers(0, len(ys), samples):
    patch = np.ascontiguousarray(volume[layers, ys[index]:ys[index] + tile, xs[index]:xs[index] + tile], np.float32)
seconds = time.perf_counter() - started
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "patches_per_second": samples / seconds, "load_seconds": load_seconds}))
"""


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":") for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def run_probe(probe: str, *arguments) -> dict:
    result = subprocess.run([sys.executable, "-c", probe, *map(str, arguments)], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: the probe failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout)


def generate_segment(path: pathlib.Path, side: int, chunk_side: int = 256) -> None:
    import cv2
    import zarr

    root = zarr.open_group(path, mode="w")
    array = root.create_array("0", shape=(65, side, side), chunks=(16, chunk_side, chunk_side), dtype="uint8")
    rng = np.random.default_rng(0)
    ramp = np.linspace(60, 180, chunk_side, dtype=np.float32)
    for y in range(0, side, chunk_side):
        row = np.empty((65, chunk_side, side), np.uint8)
        for x in range(0, side, chunk_side):
            noise = rng.integers(0, 4, (65, chunk_side, chunk_side), dtype=np.uint8)
            row[:, :, x : x + chunk_side] = (ramp[None, :, None] + noise).astype(np.uint8)
        array[:, y : y + chunk_side, :] = row
    mask = np.zeros((side, side), np.uint8)
    cv2.circle(mask, (side // 2, side // 2), int(side * 0.48), 255, -1)
    cv2.imwrite(str(path / "mask.png"), mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048], help="segment sides (Y = X)")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--lru_mb", type=int, default=512)
    parser.add_argument("--in_ram_dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    rows = []
    print("| segment | voxels | ours: peak RSS | ours: patches/s | in RAM: peak RSS | in RAM: patches/s (load s) | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    for side in args.sizes:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="sampling_memory_"))
        in_ram_bytes = 65 * side * side * np.dtype(args.in_ram_dtype).itemsize
        try:
            generate_segment(folder / "segment.zarr", side)
            ours = run_probe(PROBE, folder / "segment.zarr", args.depth, args.tile, args.samples, args.lru_mb)
            # Leave 1 GiB for the rest of the machine: a probe killed for memory would say nothing.
            in_ram = (run_probe(IN_RAM_PROBE, folder / "segment.zarr", args.depth, args.tile, args.samples,
                                args.in_ram_dtype) if in_ram_bytes < available_bytes() - 2**30 else None)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = {"segment": f"65 × {side} × {side}", "voxels_mib": 65 * side * side / 2**20, "ours": ours,
               "in_ram": in_ram, "in_ram_dtype": args.in_ram_dtype, "in_ram_array_mib": in_ram_bytes / 2**20}
        rows.append(row)
        if in_ram is None:
            in_ram_cells = f"does not fit: needs {in_ram_bytes / 2**30:.1f} GiB as {args.in_ram_dtype} | – | –"
        else:
            in_ram_cells = (f"{in_ram['peak_rss_mib']:.0f} MiB ({args.in_ram_dtype}) | {in_ram['patches_per_second']:.0f} "
                            f"({in_ram['load_seconds']:.0f} s) | {ours['peak_rss_mib'] / in_ram['peak_rss_mib']:.3f}")
        print(f"| {row['segment']} | {row['voxels_mib']:.0f} MiB | {ours['peak_rss_mib']:.0f} MiB | "
              f"{ours['patches_per_second']:.0f} | {in_ram_cells} |", flush=True)
    output = REPO_ROOT / "benchmarks" / "results" / "sampling_memory.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))

if __name__ == "__main__":
    errors.install(__file__)
    main()
