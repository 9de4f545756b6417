"""Pretraining's GPU throughput levers side by side: samples/s, share of the chip's peak, memory and data wait.

    python benchmarks/pretrain_levers.py                 # on a GPU: SparK, resnet50_3d, 32 × 256², bs 8
    python benchmarks/pretrain_levers.py --method vicreg # any method of pretrain/methods.py's registry
    python benchmarks/pretrain_levers.py --tiny          # the same sequence at toy sizes, to check it on a CPU
    python benchmarks/pretrain_levers.py --variants default channels_last   # a subset (the default always runs)

Every variant is docs/pretrain.md's real-segment pretraining command (depth 32, tile 256, bs 8, base_lr 0.03, 8 workers;
bf16 autocast on a GPU) on `--segment` (the demo by default) with the settings of pretrain/utils/arg_util.py's "GPU
throughput" block changed: channels-last, cudnn.benchmark, batch ×2 and ×4 (lr = base_lr × bs / 256), AdamW with and
without its fused kernel, more DataLoader workers and prefetch, no pinned memory, torch.compile, and all that paid
together. Each is built afresh and trained in this process with pretrain/main.py's own pieces (build_loader,
build_model, build_optimizer, the method's training_step, schedule.optimizer_step), so SparK's masking and sparse
BatchNorm are in the measured step. Each runs `--warmup` untimed steps (DataLoader workers starting, cuDNN's
autotuning, compilation), then `--steps` timed ones: the same number for every variant.

Columns: samples/s over the timed steps; counted FLOPs per sample (benchmarks/utilisation.py: forward + backward at
these sizes, the same for every variant) × samples/s as TFLOP/s, and its share of the peak measured here (a bf16
matrix product; fp32 on a CPU) and of the data sheet's (H100/H200); peak GPU memory allocated (and reserved by the
caching allocator) from the variant's start; the share of the timed steps' wall time spent waiting for a batch.

Time on one GPU, estimated, not measured: the plain variants take `--warmup` + `--steps` steps each (5 + 15 at bs 8
are about 8 s of steps at the 19 samples/s measured on an H200 for the default, plus building the model and starting
the workers; a batch ×4 variant four times the steps); the compiled ones add their compilation, which is not known
yet. A variant that would start after `--budget` seconds is skipped and says so, so the run ends by `--budget` plus
the variant in progress: with the default 360 s, under 8 minutes as long as that one variant, compilation included,
takes under 2. Writes benchmarks/results/pretrain_levers.json (`--tiny`: pretrain_levers_tiny.json) unless `--output`
says otherwise.
"""
import argparse
import gc
import json
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import pretrain.main  # first: it imports torchvision_compat before timm
import torch

from benchmarks import utilisation
from pretrain import dist, methods, throughput
from pretrain.data.segment import SegmentError, open_segment
from pretrain.utils import arg_util, errors, schedule
from pretrain.utils.misc import write_bytes_atomic

# docs/pretrain.md's real-segment command, and a toy-sized one that runs in seconds on a CPU.
REAL_SIZES = ["--model", "resnet50_3d", "--depth", "32", "--tile_size", "256", "--bs", "8", "--base_lr", "0.03",
              "--num_workers", "8"]
TINY_SIZES = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--num_workers", "0",
              "--decoder_width", "32", "--projector", "64-64"]
ON = "true"  # Args parses booleans explicitly: --channels_last true


VARIANT_NAMES = ("default", "channels_last", "cudnn_benchmark", "channels_last_cudnn", "batch_x2", "batch_x4", "adamw",
                 "adamw_fused", "more_workers", "no_pinned_memory", "compile", "all")


def variants(base: arg_util.Args) -> list[tuple[str, str, list[str], str]]:
    """(name, label, settings changed from the base, what it computes against the default), in VARIANT_NAMES' order:
    cheap ones first, so that a budget cut leaves the compiled ones out rather than the rest. "all" combines what
    paid; its settings are chosen once the others have run (combined_changes)."""
    more_workers = str(max(1, 2 * base.num_workers))
    return [
        ("default", "default", [], "the default"),
        ("channels_last", "channels_last", ["--channels_last", ON], "the same"),
        ("cudnn_benchmark", "cudnn_benchmark", ["--cudnn_benchmark", ON], "the same"),
        ("channels_last_cudnn", "channels_last + cudnn_benchmark", ["--channels_last", ON, "--cudnn_benchmark", ON],
         "the same"),
        ("batch_x2", f"batch {2 * base.bs}", ["--bs", str(2 * base.bs)], "a larger batch, lr = base_lr × bs / 256"),
        ("batch_x4", f"batch {4 * base.bs}", ["--bs", str(4 * base.bs)], "a larger batch, lr = base_lr × bs / 256"),
        ("adamw", "opt adamw", ["--opt", "adamw"], "another optimiser (AdamW for LAMB)"),
        ("adamw_fused", "opt adamw, fused kernel", ["--opt", "adamw", "--optimizer_kernel", "fused"],
         "the same as opt adamw"),
        ("more_workers", f"{more_workers} workers, prefetch 4", ["--num_workers", more_workers, "--prefetch_factor", "4"],
         "the same"),
        ("no_pinned_memory", "no pinned memory", ["--pin_memory", "false"], "the same"),
        ("compile", "torch.compile", ["--compile_model", ON], "the same"),
        ("all", "all that paid", [], "as the variants it combines"),
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, a few steps, to check the command on a CPU "
                        "(compiling, if --variants has compile, takes minutes there)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_NAMES), choices=VARIANT_NAMES, metavar="NAME",
                        help=f"which to run, of {', '.join(VARIANT_NAMES)} (default: all; the default always runs)")
    parser.add_argument("--method", default="spark", help=f"a registered method: {', '.join(methods.METHODS)}")
    parser.add_argument("--segment", default="demo", help="segment spec (pretrain/main.py's data_path)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--budget", type=float, default=360, help="seconds after which no further variant starts")
    parser.add_argument("--output", default="", help="JSON results (default: benchmarks/results/pretrain_levers.json)")
    parser.add_argument("pretrain_options", nargs="*", help="after --: pretrain/main.py options for every variant")
    args = parser.parse_args(argv)
    if args.tiny:
        parser.set_defaults(warmup=1, steps=2)
        args = parser.parse_args(argv)
    if args.method not in methods.METHODS:
        parser.error(f"--method {args.method!r} is not one of {', '.join(methods.METHODS)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error(f"--warmup and --steps must be at least 1 (got {args.warmup}, {args.steps})")
    return args


def pretraining_args(options: list[str], steps: int, device: torch.device) -> arg_util.Args:
    """pretrain/main.py's settings for these options, filled as a one-process run on `device` fills them."""
    args = arg_util.parse_args(options)
    args.samples_per_ep = args.bs * steps  # one epoch holds the variant's warm-up and timed steps
    args.fill_runtime(str(device), 1)
    return args


def timed_steps(args, model, training_model, optimizer, batches, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, seconds waiting for a batch) of `steps` training steps as pretrain/main.py takes them."""
    method = methods.get(args.method)
    wait_seconds = 0.0
    started = tick = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        wait_seconds += time.perf_counter() - tick
        with dist.autocast(device, enabled=args.amp):
            loss, _, _ = method.training_step(training_model, batch, device, False)
        schedule.optimizer_step(loss, model, optimizer, args.clip, f"step {step}", "a benchmark setting diverged")
        tick = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, wait_seconds


def measure(options: list[str], settings, segments: list, device: torch.device) -> dict:
    """One variant: build it as pretrain/main.py does, warm up, time; samples/s, data wait and peak memory."""
    args = pretraining_args(options, settings.warmup + settings.steps, device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = pretrain.main.build_loader(args, segments, device)
    loader.sampler.set_epoch(0)
    model = pretrain.main.build_model(args).to(device)
    optimizer = pretrain.main.build_optimizer(args, model)
    schedule.apply(optimizer, args.lr, args.wd)
    training_model = throughput.compiled(model, args.compile_model)
    model.train()
    batches = iter(loader)
    timed_steps(args, model, training_model, optimizer, batches, settings.warmup, device)
    seconds, wait_seconds = timed_steps(args, model, training_model, optimizer, batches, settings.steps, device)
    result = {"bs": args.bs, "lr": args.lr, "seconds": seconds, "samples_per_s": args.bs * settings.steps / seconds,
              "data_wait_fraction": wait_seconds / seconds}
    if device.type == "cuda":
        result.update(memory_allocated_mib=torch.cuda.max_memory_allocated(device) / 2**20,
                      memory_reserved_mib=torch.cuda.max_memory_reserved(device) / 2**20)
    return result


def release(device: torch.device, compiled: bool) -> None:
    """What a variant leaves behind, before the next one: compiled graphs, the cuDNN setting, GPU memory. (Its model and
    DataLoader workers went with measure()'s frame.)"""
    if compiled:
        torch._dynamo.reset()
    torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        gc.collect()  # anything in a reference cycle still holds GPU memory: a full collection takes about 0.5 s
        torch.cuda.empty_cache()


def run_variants(settings, base_options: list[str], segments: list, device: torch.device) -> list[dict]:
    base = pretraining_args(base_options, 1, device)
    rows, started = [], time.perf_counter()
    for name, label, changes, computes in variants(base):
        if name != "default" and name not in settings.variants:
            continue
        if name == "all":
            changes = combined_changes(rows)
            computes = "as the variants it combines" if changes else "the default (nothing paid)"
        row = {"variant": label, "name": name, "settings": changes, "computes": computes, "error": None}
        if time.perf_counter() - started > settings.budget:
            row["error"] = f"skipped: past the {settings.budget:.0f} s budget"
        else:
            print(f"variant {label}: {' '.join(changes) or '(defaults)'}", flush=True)
            try:
                row.update(measure([*base_options, *changes], settings, segments, device))
            except torch.cuda.OutOfMemoryError:
                row["error"] = "does not fit in GPU memory"
            except Exception as error:  # one variant failing (a compiler error, say) must not lose the others' rows
                row["error"] = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            release(device, "--compile_model" in changes)
        rows.append(row)
    return rows


def combined_changes(rows: list[dict]) -> list[str]:
    """The settings of every variant that computes the same thing (or a larger batch: the largest that fitted) and
    ran faster than the default."""
    default = next((row for row in rows if row["name"] == "default" and not row["error"]), None)
    if default is None:
        return []
    faster = [row for row in rows if not row["error"] and row["samples_per_s"] > default["samples_per_s"]]
    same = [row for row in faster if row["computes"] == "the same"]
    larger_batches = [row for row in faster if row["computes"].startswith("a larger batch")]
    changes = {}
    for row in same + sorted(larger_batches, key=lambda row: row["bs"])[-1:]:
        changes.update(zip(row["settings"][::2], row["settings"][1::2]))
    return [item for option, value in changes.items() for item in (option, value)]


def table(rows: list[dict]) -> str:
    def number(value, digits: int = 1, scale: float = 1.0) -> str:
        return "–" if value is None else f"{value / scale:.{digits}f}"

    def share(value) -> str:
        return "–" if value is None else f"{value:.1%}"

    lines = ["| variant | samples/s | TFLOP/s | share of peak: measured matmul / data sheet | peak memory MiB "
             "(reserved) | data wait | computes | outcome |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        memory = ("–" if row.get("memory_allocated_mib") is None else
                  f"{row['memory_allocated_mib']:.0f} ({row['memory_reserved_mib']:.0f})")
        wait = row.get("data_wait_fraction")
        lines.append(f"| {row['variant']} | {number(row.get('samples_per_s'), 2)} | "
                     f"{number(row.get('achieved_flops_per_s'), 3, 1e12)} | {share(row.get('share_of_measured_peak'))}"
                     f" / {share(row.get('share_of_data_sheet_peak'))} | {memory} | {share(wait)} | {row['computes']} | "
                     f"{row['error'] or 'ok'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    base_options = [*(TINY_SIZES if settings.tiny else REAL_SIZES), "--method", settings.method,
                    "--data_path", settings.segment, *settings.pretrain_options]
    try:
        segments = open_segment([settings.segment])  # built or fetched once here, so that no variant's time includes it
        base = pretraining_args(base_options, 1, device)
    except (SegmentError, arg_util.ArgumentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if device.type == "cpu":  # as pretrain/main.py sets them for its cpu_threads 0
        torch.set_num_threads(dist.automatic_cpu_threads(base.num_workers))
    flops_per_sample = utilisation.pretraining_flops_per_sample(base, segments)
    measured_peak = (utilisation.measured_matmul_peak(device) if not settings.tiny
                     else utilisation.measured_matmul_peak(device, size=512, repeats=5))
    sheet_peak = utilisation.data_sheet_peak(device_name)
    release(device, compiled=False)  # the matrices' memory, so that the first variant's reserved memory is its own
    print(f"{device_name}, torch {torch.__version__}; {settings.method} {base.model}, {base.depth} × {base.tile_size}², "
          f"bs {base.bs}: {flops_per_sample / 1e9:.1f} GFLOP per sample (counted); peak: measured "
          f"{measured_peak / 1e12:.3f} TFLOP/s, data sheet "
          f"{'–' if sheet_peak is None else f'{sheet_peak / 1e12:.1f} TFLOP/s'}", flush=True)

    started = time.perf_counter()
    rows = run_variants(settings, base_options, segments, device)
    for row in rows:
        achieved = utilisation.utilisation(flops_per_sample, row.get("samples_per_s"), measured_peak)
        row.update(achieved_flops_per_s=achieved["achieved_flops_per_s"],
                   share_of_measured_peak=achieved["share_of_peak"],
                   share_of_data_sheet_peak=utilisation.utilisation(flops_per_sample, row.get("samples_per_s"),
                                                                    sheet_peak)["share_of_peak"])
    output = pathlib.Path(settings.output or REPO_ROOT / "benchmarks" / "results" /
                          f"pretrain_levers{'_tiny' if settings.tiny else ''}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output, json.dumps({
        "settings": vars(settings), "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
        "flops_per_sample": flops_per_sample, "measured_peak_flops_per_s": measured_peak,
        "data_sheet_peak_flops_per_s": sheet_peak, "warmup_steps": settings.warmup, "timed_steps": settings.steps,
        "seconds": time.perf_counter() - started, "variants": rows}, indent=1).encode())
    print(f"\n{settings.warmup} + {settings.steps} steps per variant; {time.perf_counter() - started:.0f} s in all\n")
    print(table(rows))
    print(f"\nwritten to {output}")
    failed = [row["variant"] for row in rows if row["error"] and not row["error"].startswith(("skipped", "does not fit"))]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
