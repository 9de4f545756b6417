"""How much does the online ink probe's score move with its own seed alone, on a fixed encoder?

    python benchmarks/ink_probe_noise.py --model resnet50_3d_narrow --seeds 0 1 2 3 4

The probe seed (`--probe_seed` of pretrain/main.py) chooses the tiles, their split into fitted and scored halves and
the fitted pixels; the encoder stays the random initialisation of `--encoder_seed` (the run's seed), read with the
input settings of `--method`. The spread of AUC, average precision and F0.5 over seeds is the noise a rise of the
probe curve must clear to be read as the encoder's doing (a run keeps one seed, so its curve moves less than this:
this is the spread between runs of other probe seeds). Writes benchmarks/results/ink_probe_noise.json and prints a
Markdown table.
"""
import argparse
import json
import os
import pathlib
import statistics
import sys
import time


import torch

from pretrain import methods
from pretrain.data.segment import open_segment
from pretrain.models import build_encoder
from pretrain.probe import SCORES, probe_encoder, read_tiles
from pretrain.utils import arg_util, errors, misc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="probe seeds")
    parser.add_argument("--encoder_seed", type=int, default=0, help="the random initialisation probed")
    options, pretrain_arguments = parser.parse_known_args()
    load_before = os.getloadavg()
    args = arg_util.parse_args(pretrain_arguments)
    args.fill_runtime("cpu", 1)
    torch.set_num_threads(args.cpu_threads or 1)
    segment = open_segment(args.probe_segment or args.data_path[0], scroll=args.scroll)
    torch.manual_seed(options.encoder_seed)
    encoder = build_encoder(args.model).eval()
    method = methods.get(args.method)
    started = time.perf_counter()
    runs = []
    for seed in options.seeds:
        tiles = read_tiles(segment, args.input_settings(), args.probe_tiles, seed)
        scores = probe_encoder(method, encoder, tiles, torch.device("cpu"), seed, amp=False)
        runs.append({"seed": seed, **{name: getattr(scores, name) for name in (*SCORES, "f05_chance", "ink_fraction")}})
        print(f"seed {seed}: " + ", ".join(f"{name} {value:.3f}" for name, value in runs[-1].items() if name != "seed"))
    summary = {name: {"mean": statistics.mean(run[name] for run in runs), "std": statistics.stdev(run[name] for run in runs),
                      "min": min(run[name] for run in runs), "max": max(run[name] for run in runs)}
               for name in (*SCORES, "f05_chance")}
    result = {"command": " ".join([sys.executable, *sys.argv]), "commit": misc.git_commit(), "segment": segment.name,
              "model": args.model, "method": args.method, "input": args.input_settings().describe(),
              "probe_tiles": args.probe_tiles, "encoder_seed": options.encoder_seed, "runs": runs, "summary": summary,
              "seconds": time.perf_counter() - started, "load_average_before": load_before,
              "load_average_after": os.getloadavg()}
    output = pathlib.Path(__file__).resolve().parent / "results" / "ink_probe_noise.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"| {args.model}, random init (seed {options.encoder_seed}), {len(runs)} probe seeds | mean | std | min | max |")
    print("|---|---|---|---|---|")
    for name, values in summary.items():
        print(f"| {name} | {values['mean']:.3f} | {values['std']:.3f} | {values['min']:.3f} | {values['max']:.3f} |")
    print(f"load average {load_before[0]:.1f} before, {result['load_average_after'][0]:.1f} after; {output}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
