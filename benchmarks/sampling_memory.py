"""Peak memory and speed of patch sampling as the segment grows.

    python benchmarks/sampling_memory.py                      # 65 × 8192 × 8192
    python benchmarks/sampling_memory.py --sizes 2048 4096 8192

For each size, a segment zarr is generated chunk by chunk (so generation itself stays bounded) into a
temporary folder, then a fresh process samples pretraining crops from it (RandomPatchDataset, random
positions over the whole mask) and reports its peak RSS and patches/s. The content is cheap to compress
(smooth ramps plus a little noise per chunk): the files stay small, while every chunk decodes to full size.
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
sys.path.insert(0, str(REPO_ROOT))

PROBE = r"""
import json, resource, sys, time
from pretrain.data.patches import RandomPatchDataset
from pretrain.data.segment import open_segment
path, depth, tile, samples, lru_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
segment = open_segment(path, lru_bytes=lru_mb * 2**20)
dataset = RandomPatchDataset([segment], depth=depth, tile_size=tile, samples_per_epoch=samples, seed=0)
started = time.perf_counter()
for index in range(samples):
    dataset[index]
seconds = time.perf_counter() - started
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "patches_per_second": samples / seconds, "decoded_chunks": segment.volume.decoded_chunks}))
"""


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
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192], help="segment sides (Y = X)")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--lru_mb", type=int, default=512)
    args = parser.parse_args()
    rows = []
    for side in args.sizes:
        folder = pathlib.Path(tempfile.mkdtemp(prefix="sampling_memory_"))
        try:
            generate_segment(folder / "segment.zarr", side)
            result = subprocess.run([sys.executable, "-c", PROBE, str(folder / "segment.zarr"), str(args.depth),
                                     str(args.tile), str(args.samples), str(args.lru_mb)],
                                    cwd=REPO_ROOT, capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        row = {"segment": f"65 × {side} × {side}", "voxels_mib": 65 * side * side / 2**20, **measured}
        rows.append(row)
        print(f"| {row['segment']} | {row['voxels_mib']:.0f} MiB of voxels | peak RSS {row['peak_rss_mib']:.0f} MiB | "
              f"{row['patches_per_second']:.1f} patches/s ({args.depth}×{args.tile}²) | {row['decoded_chunks']} chunks decoded |",
              flush=True)
    output = REPO_ROOT / "benchmarks" / "results" / "sampling_memory.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
