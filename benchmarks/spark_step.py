"""How much does SparK-3D's sparsity cost, and does data loading keep up?

    python benchmarks/spark_step.py                 # ResNet-50, batch 2, 16 × 96 × 96 (the demo defaults)
    python benchmarks/spark_step.py --model resnet50_3d --depth 32 --tile_size 128 --bs 4

1. Step time of a SparK-3D training step (sparse encoder, densify, decoder, masked loss, LAMB) against a
   dense step on the same batch: the same dense encoder, projections and decoder, MSE on every voxel.
   Steps alternate between the two so both see the same machine load; the medians are compared.
2. The real pipeline (demo segment → RandomPatchDataset → DataLoader workers → SparK step): the fraction of
   wall time spent waiting for data, samples/s, and peak RSS (this process and its workers).
3. Achieved FLOP/s of the SparK step (FLOPs counted by torch's FlopCounterMode, forward + backward, divided
   by the median step time) against the machine's peak, taken as the throughput of a large fp32 matrix
   product (4096², or 8192² on GPU) measured here: the best a dense kernel reaches on this machine, since a
   nominal peak needs a clock frequency the machine does not report.
Writes benchmarks/results/spark_step.json and prints a Markdown table.
"""
import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import time

import pretrain.torchvision_compat  # noqa: F401
import timm.optim
import torch

from pretrain.data.patches import EpochSampler, InputSettings, RandomPatchDataset
from pretrain.data.segment import open_segment
from pretrain.decoder import LightDecoder3d
from pretrain.encoder import SparseEncoder
from pretrain.models import build_encoder
from pretrain.spark import SparK3d
from pretrain.utils.misc import RenamedOption
from pretrain.utils import errors


class DenseAutoencoder(torch.nn.Module):
    """The dense counterpart of SparK3d: same encoder, projections and decoder; no mask, no sparse layers."""

    def __init__(self, spark: SparK3d, model_name: str) -> None:
        super().__init__()
        self.encoder = build_encoder(model_name)
        self.projections = spark.densify_projections
        self.decoder = spark.decoder

    def forward(self, inp_bcdhw: torch.Tensor) -> torch.Tensor:
        feature_maps = self.encoder(inp_bcdhw)[::-1]  # coarsest first
        reconstruction = self.decoder([projection(x) for projection, x in zip(self.projections, feature_maps)])
        return torch.nn.functional.mse_loss(reconstruction, inp_bcdhw)


def build_spark(args) -> SparK3d:
    sparse_encoder = SparseEncoder(build_encoder(args.model))
    decoder = LightDecoder3d(args.decoder_width, sparse_encoder.get_downsample_ratio())
    return SparK3d(sparse_encoder, decoder, input_size=args.tile_size, depth=args.depth, mask_ratio=0.6)


def timed_step(model, optimizer, batch) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one training step. CPU time is steadier than wall time
    when other processes share the cores; on an idle machine wall time is the number that matters."""
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = model(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if batch.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def counted_step_flops(model, batch) -> int:
    """FLOPs of one forward + backward, as torch counts them (convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measured_matmul_flops_per_second(device: torch.device) -> float:
    size = 8192 if device.type == "cuda" else 4096
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    repeats = 3 if device.type == "cpu" else 20
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * 2 * size**3 / (time.perf_counter() - started)


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50_3d")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--tile_size", "--input_size", type=int, default=96, action=RenamedOption,
                        help="tile side in pixels (--input_size: its older name)")
    parser.add_argument("--bs", type=int, default=2)
    parser.add_argument("--decoder_width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each kind")
    parser.add_argument("--pipeline_steps", type=int, default=30)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--data_path", default="demo")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    spark = build_spark(args).to(device)
    dense = DenseAutoencoder(spark, args.model).to(device)
    spark_optimizer = timm.optim.Lamb(spark.parameters(), lr=1e-4)
    dense_optimizer = timm.optim.Lamb(dense.parameters(), lr=1e-4)
    batch = torch.rand(args.bs, 1, args.depth, args.tile_size, args.tile_size, device=device)
    for _ in range(2):  # warm-up: allocator, kernels
        timed_step(spark, spark_optimizer, batch)
        timed_step(dense, dense_optimizer, batch)
    spark_seconds, dense_seconds = [], []
    for _ in range(args.steps):
        spark_seconds.append(timed_step(spark, spark_optimizer, batch))
        dense_seconds.append(timed_step(dense, dense_optimizer, batch))
    spark_median, dense_median = (statistics.median(wall for wall, _ in spark_seconds),
                                  statistics.median(wall for wall, _ in dense_seconds))
    spark_cpu_median, dense_cpu_median = (statistics.median(cpu for _, cpu in spark_seconds),
                                          statistics.median(cpu for _, cpu in dense_seconds))

    step_flops = counted_step_flops(spark, batch)
    matmul_flops_per_second = measured_matmul_flops_per_second(device)

    segment = open_segment(args.data_path)
    settings = InputSettings(model=args.model, depth=args.depth, tile_size=args.tile_size)
    dataset = RandomPatchDataset([segment], settings, samples_per_epoch=args.bs * args.pipeline_steps, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.bs, sampler=EpochSampler(len(dataset)),
                                         num_workers=args.num_workers, drop_last=True)
    wait_seconds, started, steps = 0.0, None, 0
    tick = time.perf_counter()
    for index, inp in enumerate(loader):
        if index == 2:  # the first batches include worker start-up
            wait_seconds, started, steps = 0.0, time.perf_counter(), 0
        wait_seconds += time.perf_counter() - tick
        timed_step(spark, spark_optimizer, inp.to(device))
        steps += 1
        tick = time.perf_counter()
    pipeline_seconds = time.perf_counter() - started

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}",
        "settings": vars(args),
        "spark_step_seconds_median": spark_median,
        "dense_step_seconds_median": dense_median,
        "spark_over_dense": spark_median / dense_median,
        "spark_step_cpu_seconds_median": spark_cpu_median,
        "dense_step_cpu_seconds_median": dense_cpu_median,
        "spark_over_dense_cpu_time": spark_cpu_median / dense_cpu_median,
        "load_average_before": load_before,
        "step_gflop": step_flops / 1e9,
        "achieved_gflop_per_second": step_flops / spark_median / 1e9,
        "matmul_peak_gflop_per_second": matmul_flops_per_second / 1e9,
        "fraction_of_matmul_peak": step_flops / spark_median / matmul_flops_per_second,
        "pipeline_data_wait_fraction": wait_seconds / pipeline_seconds,
        "pipeline_samples_per_second": steps * args.bs / pipeline_seconds,
        "peak_rss_mib": peak_rss_mib(),
    }
    output = pathlib.Path(__file__).resolve().parent / "results" / "spark_step.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"| {args.model} | bs {args.bs}, {args.depth}×{args.tile_size}² | SparK {spark_median:.3f} s | dense "
          f"{dense_median:.3f} s | ratio {result['spark_over_dense']:.2f} (CPU time "
          f"{result['spark_over_dense_cpu_time']:.2f}) | data wait "
          f"{result['pipeline_data_wait_fraction']:.1%} | {result['pipeline_samples_per_second']:.2f} samples/s | "
          f"peak RSS {result['peak_rss_mib']:.0f} MiB | {result['achieved_gflop_per_second']:.0f} GFLOP/s of "
          f"{result['matmul_peak_gflop_per_second']:.0f} (matmul peak): {result['fraction_of_matmul_peak']:.0%} |")
    print(f"machine: {result['machine']}; load average before {load_before:.2f}; written to {output}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
