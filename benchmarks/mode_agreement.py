"""Does a cheaper curve mode agree with full fine-tuning? Two evaluate/label_efficiency.py outputs of the same
segment and encoders (e.g. the report's frozen curves and full fine-tuning runs of a few of its seeds) are joined run
by run on (encoder, glyphs, seed): the same glyphs are labelled in both (checked by their labelled pixel count), so
each pair differs only in how the encoder was used.

    python benchmarks/mode_agreement.py --cheap experiments/report/label_efficiency \
        --full experiments/agreement/full_demo0 --output experiments/agreement/agreement.md --plot images/agreement.png

Prints per run F0.5 and AUC in both modes, and per (glyphs, seed) each encoder's paired difference from random in
both modes, and their mean per encoder and glyph count: the verdict compares exactly these differences, so agreement
of their signs and sizes is what matters. A difference of exactly 0 (both arms scored alike) is a tie, not a sign.
`--plot` draws each pair as a point, random's F0.5 across and the encoder's up, one panel per glyph count.
"""
import csv
import io
import pathlib
import sys

from pretrain.utils import errors
from pretrain.utils.errors import OneLineError
from pretrain.utils.misc import write_bytes_atomic


class AgreementError(OneLineError, ValueError):
    """The two outputs cannot be paired run by run."""


def read_runs(folder: pathlib.Path) -> dict:
    """{(encoder, glyphs, seed): runs.csv row} of one label_efficiency.py output (its first round, one mode)."""
    path = folder / "runs.csv"
    if not path.is_file():
        raise AgreementError(f"{path} does not exist: not a finished evaluate/label_efficiency.py output")
    rows = [row for row in csv.DictReader(open(path)) if row["round"] == "0"]
    modes = {row["mode"] for row in rows}
    if len(modes) != 1:
        raise AgreementError(f"{path} holds the modes {', '.join(sorted(modes))}: give an output of one mode")
    return {(row["encoder"], int(row["glyphs"]), int(row["seed"])): row for row in rows}


def against_random(pairs: list[tuple]) -> list[tuple]:
    """The (encoder, glyphs, seed) of `pairs` that have random's run of the same glyphs and seed to compare with."""
    return [(encoder, glyphs, seed) for encoder, glyphs, seed in pairs
            if encoder != "random" and ("random", glyphs, seed) in pairs]


def agreement(cheap: dict, full: dict) -> str:
    """The markdown tables: runs in both outputs, then each encoder's paired difference from random per mode."""
    pairs = sorted(set(cheap) & set(full))
    if not pairs:
        raise AgreementError("the two outputs share no (encoder, glyphs, seed) run")
    for key in pairs:
        if cheap[key]["labelled_pixels"] != full[key]["labelled_pixels"]:
            raise AgreementError(f"run {key}: {cheap[key]['labelled_pixels']} labelled pixels in one output, "
                                 f"{full[key]['labelled_pixels']} in the other: not the same glyphs")
    cheap_mode, full_mode = next(iter(cheap.values()))["mode"], next(iter(full.values()))["mode"]
    lines = [f"| encoder | glyphs | seed | F0.5 {cheap_mode} | F0.5 {full_mode} | AUC {cheap_mode} | AUC {full_mode} |",
             "|---|---|---|---|---|---|---|"]
    for key in pairs:
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {float(cheap[key]['f05']):.3f} | {float(full[key]['f05']):.3f} "
                     f"| {float(cheap[key]['auc']):.3f} | {float(full[key]['auc']):.3f} |")
    lines += ["", f"| encoder − random | glyphs | seed | F0.5 {cheap_mode} | F0.5 {full_mode} | AUC {cheap_mode} | "
              f"AUC {full_mode} | same sign (F0.5) |", "|---|---|---|---|---|---|---|---|"]
    # {(encoder, glyphs): [(cheap, full) F0.5 difference per seed]}; a difference of exactly 0 (both arms scored the
    # same, e.g. both calling every pixel ink) has no sign, so it neither agrees nor disagrees.
    by_arm, agreements = {}, []
    for encoder, glyphs, seed in against_random(pairs):
        baseline = ("random", glyphs, seed)
        differences = {metric: [float(runs[(encoder, glyphs, seed)][metric]) - float(runs[baseline][metric])
                                for runs in (cheap, full)] for metric in ("f05", "auc")}
        by_arm.setdefault((encoder, glyphs), []).append(differences["f05"])
        signs = [(difference > 0) - (difference < 0) for difference in differences["f05"]]
        same = "tie" if 0 in signs else "yes" if signs[0] == signs[1] else "no"
        agreements.append(same)
        lines.append(f"| {encoder} | {glyphs} | {seed} | {differences['f05'][0]:+.3f} | {differences['f05'][1]:+.3f} | "
                     f"{differences['auc'][0]:+.3f} | {differences['auc'][1]:+.3f} | {same} |")
    lines += ["", f"| encoder − random | glyphs | seeds | mean F0.5 {cheap_mode} | mean F0.5 {full_mode} |", "|---|---|---|---|---|"]
    for (encoder, glyphs), differences in sorted(by_arm.items()):
        means = [sum(pair[mode] for pair in differences) / len(differences) for mode in (0, 1)]
        lines.append(f"| {encoder} | {glyphs} | {len(differences)} | {means[0]:+.3f} | {means[1]:+.3f} |")
    lines += ["", f"{agreements.count('yes')} of {len(agreements) - agreements.count('tie')} paired F0.5 "
              f"differences have the same sign in both modes; {agreements.count('tie')} exactly 0 in one mode (no sign)."]
    return "\n".join(lines) + "\n"


def plot(cheap: dict, full: dict, path: pathlib.Path) -> None:
    """Each (glyphs, seed) pair of every encoder against random as a point (random's F0.5, the encoder's F0.5), in
    both modes: above the diagonal the encoder won that seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted(set(cheap) & set(full))
    counts = sorted({glyphs for _, glyphs, _ in pairs})
    figure, axes = plt.subplots(1, len(counts), figsize=(3.2 * len(counts), 3.4), squeeze=False)
    for panel, count in zip(axes[0], counts):
        panel.plot([0, 1], [0, 1], color="black", linewidth=0.8)
        for runs, marker in ((cheap, "x"), (full, "o")):
            points = [(float(runs[("random", glyphs, seed)]["f05"]), float(runs[(encoder, glyphs, seed)]["f05"]))
                      for encoder, glyphs, seed in against_random(pairs) if glyphs == count]
            if points:
                panel.scatter(*zip(*points), marker=marker, s=18, label=next(iter(runs.values()))["mode"])
        panel.set_xlim(0, 1)  # the whole scale, as every F0.5 plot here: a zoomed axis makes noise look like a gap
        panel.set_ylim(0, 1)
        panel.set_aspect("equal")
        panel.set_title(f"{count} glyph(s)", fontsize=9)
        panel.set_xlabel("F0.5, random", fontsize=8)
        panel.set_ylabel("F0.5, pretrained encoder", fontsize=8)
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=80)
    plt.close(figure)
    write_bytes_atomic(path, image.getvalue())


def main() -> int:
    parser = errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cheap", type=pathlib.Path, required=True, help="the cheaper mode's label_efficiency.py output")
    parser.add_argument("--full", type=pathlib.Path, required=True, help="the full fine-tuning output")
    parser.add_argument("--output", type=pathlib.Path, help="a markdown file for the tables (default: print them)")
    parser.add_argument("--plot", type=pathlib.Path, help="a PNG of every pair, random's F0.5 against the encoder's")
    args = parser.parse_args()
    cheap, full = read_runs(args.cheap), read_runs(args.full)
    text = agreement(cheap, full)
    if args.output:
        write_bytes_atomic(args.output, text.encode())
    if args.plot:
        plot(cheap, full, args.plot)
    print(text, end="")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
