"""What does the checkpoint's SHA-256 (tensors and settings) cost when a checkpoint is written and read?

    python benchmarks/checkpoint_checksum.py                    # resnet50_3d, SparK full checkpoint with LAMB state
    python benchmarks/checkpoint_checksum.py --model resnet18_3d --repeats 3

Writes the two files pretraining writes every epoch (the encoder alone, and the full SparK checkpoint with the
optimizer's two moments per weight) with `pretrain.checkpoint.save` and reads them back with `read`, each
`--repeats` times into a temp folder; times the checksum on its own (`contents_checksum` over the same contents),
and reports the medians. The checksum's share is its time over the whole save or read. Writes
benchmarks/results/checkpoint_checksum.json and prints a Markdown table.
"""
import argparse
import json
import os
import pathlib
import statistics
import tempfile
import time

import pretrain.torchvision_compat  # noqa: F401
import timm.optim
import torch

from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.decoder import LightDecoder3d
from pretrain.encoder import SparseEncoder
from pretrain.models import build_encoder
from pretrain.spark import SparK3d
from pretrain.utils import errors


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50_3d")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sparse_encoder = SparseEncoder(build_encoder(args.model))
    model = SparK3d(sparse_encoder, LightDecoder3d(256, sparse_encoder.get_downsample_ratio()), input_size=96, depth=16)
    optimizer = timm.optim.Lamb(model.parameters(), lr=1e-3)
    for parameter in model.parameters():  # one step's worth of state: LAMB's two moments per weight
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    settings = InputSettings(model=args.model)
    files = {
        "encoder": ("encoder", sparse_encoder.encoder.state_dict(), {}),
        "full (SparK + LAMB)": ("spark", model.state_dict(), {"optimizer": optimizer.state_dict(), "epoch": 0}),
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (kind, state, entries) in files.items():
            path = pathlib.Path(folder) / f"{kind}.pth"
            save = median_seconds(lambda: checkpoint.save(path, kind, state, settings, **entries), args.repeats)
            read = median_seconds(lambda: checkpoint.read(path), args.repeats)
            contents = checkpoint.read(path)
            checksum = median_seconds(lambda: checkpoint.contents_checksum(contents), args.repeats)
            rows.append({"file": name, "megabytes": round(os.path.getsize(path) / 2**20, 1),
                         "save_seconds": round(save, 3), "read_seconds": round(read, 3),
                         "checksum_seconds": round(checksum, 3),
                         "checksum_share_of_save": round(checksum / save, 3),
                         "checksum_share_of_read": round(checksum / read, 3)})
    results = {"model": args.model, "repeats": args.repeats, "torch_threads": 1, "rows": rows}
    output = pathlib.Path(__file__).resolve().parent / "results" / "checkpoint_checksum.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(results, indent=1))
    print(f"| {args.model} file | MB | save s | read s | checksum s | share of save | share of read |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['file']} | {row['megabytes']} | {row['save_seconds']} | {row['read_seconds']} | "
              f"{row['checksum_seconds']} | {row['checksum_share_of_save']:.0%} | {row['checksum_share_of_read']:.0%} |")


if __name__ == "__main__":
    errors.install(__file__)
    main()
