"""Does the online ink probe rise above the random initialisation's, and stay there? Its AUC against epoch, per run.

    python benchmarks/ink_probe_curves.py --runs experiments/probe_spark experiments/probe_vicreg \
        --noise benchmarks/results/ink_probe_noise.json --output images/ink_probe_auc.png

Reads each run's log.jsonl (pretrain/main.py's epoch records, through pretrain/utils/run_log.py), draws probe/auc
against epoch beside the run's random baseline, and shades the baseline ± 2 standard deviations of the probe's
seed-to-seed spread on a fixed encoder (benchmarks/ink_probe_noise.py). For each run it prints the first epoch from
which every probe stays above that band (or that none does), and writes the same as JSON beside the image.
"""
import argparse
import json
import pathlib
import sys


from pretrain.utils import errors, run_log
from pretrain.utils.misc import write_bytes_atomic


def first_epoch_above(epochs: list[int], aucs: list[float], ceiling: float) -> int | None:
    """The first epoch from which every probed epoch's AUC is above `ceiling`, or None."""
    for index, epoch in enumerate(epochs):
        if all(auc > ceiling for auc in aucs[index:]):
            return epoch
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="pretraining exp_dirs")
    parser.add_argument("--noise", required=True, help="benchmarks/ink_probe_noise.py's JSON")
    parser.add_argument("--output", default="images/ink_probe_auc.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = json.loads(pathlib.Path(args.noise).read_text())["summary"]["auc"]["std"]
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    summary = {}
    for run in args.runs:
        records = [record for record in run_log.epochs(run) if "probe__auc" in record]
        if not records:
            raise SystemExit(f"error: {run}/log.jsonl has no probed epoch (was the probe off?)")
        epochs, aucs = [record["epoch"] for record in records], [record["probe__auc"] for record in records]
        baseline = records[-1]["probe__auc_random"]
        ceiling = baseline + 2 * spread
        name = pathlib.Path(run).name
        line, = axes.plot(epochs, aucs, marker=".", label=name)
        axes.axhline(baseline, color=line.get_color(), linestyle="--", linewidth=0.8)
        axes.axhspan(baseline - 2 * spread, ceiling, color=line.get_color(), alpha=0.12)
        summary[name] = {"baseline_auc": baseline, "band_top": ceiling, "last_auc": aucs[-1], "best_auc": max(aucs),
                         "first_epoch_staying_above_band": first_epoch_above(epochs, aucs, ceiling)}
        above = summary[name]["first_epoch_staying_above_band"]
        print(f"{name}: AUC {aucs[0]:.3f} after epoch {epochs[0]} → {aucs[-1]:.3f} after epoch {epochs[-1]}; random "
              f"{baseline:.3f} (band to {ceiling:.3f}); "
              + (f"above the band from epoch {above} on" if above is not None else "not above the band to the end"))
    axes.set_xlabel("epoch")
    axes.set_ylabel("probe AUC (scored tiles)")
    axes.set_title("online ink probe; dashed: random init, band: ± 2 SD of probe seeds", fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    results = pathlib.Path(__file__).resolve().parent / "results" / "ink_probe_curves.json"
    results.parent.mkdir(exist_ok=True)
    write_bytes_atomic(results, json.dumps({"command": " ".join([sys.executable, *sys.argv]), "noise_std": spread,
                                            "runs": summary}, indent=1).encode())
    print(f"wrote {output} and {results}")


if __name__ == "__main__":
    errors.install(__file__)
    main()
