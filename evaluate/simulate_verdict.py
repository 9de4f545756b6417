"""The few-label verdict's error rates, by simulating the report's whole design (evaluate/verdict_rule.py has the
rule, the noise measured from real runs, and the scenarios).

    python evaluate/simulate_verdict.py                                   # seed counts 8 … 32, the report's design
    python evaluate/simulate_verdict.py --seeds 20 --glyphs 1 2 4 --encoders_per_group 1 1 --experiments 4000
"""
import argparse
import sys

from evaluate import verdict_rule
from pretrain.utils import errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--seeds", nargs="+", default=["8", "12", "16", "20", "24", "32"],
                        help="seed counts to try: each one count for every glyph count, or one per glyph count joined "
                             "by commas (8,8,3)")
    parser.add_argument("--glyphs", type=int, nargs="+", default=[1, 2, 4], help="the glyph counts compared")
    parser.add_argument("--encoders_per_group", type=int, nargs="+", default=[1, 1],
                        help="pretrained encoders per input-settings group (the report: SparK; VICReg)")
    parser.add_argument("--random_arms", type=int, default=2, help="random arms each encoder must beat")
    parser.add_argument("--alpha", type=float, default=verdict_rule.ALPHA, help="the whole report's family-wise error")
    parser.add_argument("--experiments", type=int, default=2000, help="simulated reports per scenario")
    args = parser.parse_args(argv)
    try:
        seed_counts = [tuple(int(count) for count in seeds.split(",")) for seeds in args.seeds]
    except ValueError:
        parser.error(f"--seeds {' '.join(args.seeds)}: each is a count, or counts joined by commas")
    if any(len(seeds) not in (1, len(args.glyphs)) for seeds in seed_counts):
        parser.error(f"--seeds {' '.join(args.seeds)}: give one count, or one per --glyphs value")
    if min(map(min, seed_counts)) < 1 or min(args.glyphs) < 1 or min(args.encoders_per_group) < 1 or args.random_arms < 1 \
            or args.experiments < 1:
        parser.error("every count must be at least 1")
    print(f"rule: {verdict_rule.__doc__.split(chr(10) + chr(10))[0]}")
    print("| seeds per glyph count | any yes/suggestive, no difference | yes, +0.10 every run at 1-2 glyphs | yes, "
          "+0.10 as take-off at 1-2 glyphs | no, no difference | no, harm -0.10 |")
    print("|---|---|---|---|---|---|")
    for seeds in seed_counts:
        design = verdict_rule.Design(tuple(args.encoders_per_group), tuple(args.glyphs),
                                     seeds * len(args.glyphs) if len(seeds) == 1 else seeds, args.random_arms, args.alpha)
        rates = verdict_rule.error_rates(design, args.experiments)
        print(f"| {','.join(map(str, seeds))} | {rates.false_claim:.1%} | {rates.power_shift:.1%} | {rates.power_takeoff:.1%} | "
              f"{rates.no_when_none:.1%} | {rates.no_when_harm:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
