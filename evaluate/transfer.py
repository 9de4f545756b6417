"""Does a frozen encoder find ink on a segment its probe did not train on? VesuviusPretraining's two transfer
questions, asked of each encoder with frozen-encoder probes on a family of segments.

(a) the probe trains on the training segments and 70 % of the held-out segment, and is scored on the other 30 %;
(b) the probe trains on the training segments alone, and is scored on the whole held-out segment.

    python evaluate/transfer.py --pretrained_path random experiments/transfer/spark/resnet50_3d_narrow_timm_style.pth \
        --names random spark --supervised_control
    python evaluate/transfer.py --pretrained_path random vicreg.pth --names random vicreg --output experiments/transfer/vicreg_probes
    python evaluate/transfer.py --pretrained_path random spark.pth --segment_id demo:1 demo:2 --held_out demo:3 \
        --question b -- --NUM_EPOCHS 6         # after "--": settings passed to every finetune/train.py run

Each encoder is one `finetune/train.py` run per question and seed, evaluate/encoders.py's probe (scheme
"validation", `freeze_encoder=True`; seed s is SEED s for every encoder, so runs are paired). Question (a) holds out
a band of the held-out segment only (`VALIDATION_FRACTION 0 … 0 f`: whole tiles, f of its longer side), question (b)
the whole segment (`VALIDATION_SEGMENTS`). Each run is scored from its whole-segment predictions with its last
epoch's weights (`BEST_BY last`: no epoch is chosen on the pixels it is scored on) on the held-out pixels: F0.5 at the threshold best on the labelled tiles of every
segment it trained on (never on the scored pixels), AUC, average precision, and as an extra the oracle F0.5 at the
scored pixels' own best threshold. With `--supervised_control`, each question also probes an encoder that has seen
labels: full fine-tuning from scratch on that question's training data (seed 0, as evaluate/report.py's control),
then frozen like the others; if the probe reads ink from it, the probe is not what fails.

The encoders must agree on how tiles are read (`random` follows them): SparK's (range) and VICReg's (zscore)
encoders are compared in separate runs of this command, each with its own random, as evaluate/report.py does.
Writes `transfer.md` and `transfer.csv` (per question and encoder: mean and min–max over seeds, the mean paired
difference from `random` with its 95 % t interval), `runs.csv` (per run) and, per question, `question_<q>/` with
the runs and one labels-vs-prediction image of the held-out segment per encoder (seed 0), into `--output`.
"""
import argparse
import pathlib
import sys


from evaluate import encoder_input, encoders, report
from finetune.metrics import all_ink_f05
from pretrain.data.patches import InputSettings, finetune_options
from pretrain.data.segment import segment_identity
from pretrain.utils import run_log
from pretrain.utils.misc import write_bytes_atomic
from pretrain.utils import errors, ranges

CONTROL = "supervised"  # the name of the supervised control in the tables


def question_options(question: str, args) -> list[str]:
    """finetune/train.py's segment settings for a question."""
    if question == "a":  # a band of the held-out segment only: every other segment trains whole
        fractions = ["0"] * len(args.segment_id) + [str(args.held_out_fraction)]
        return ["--segment_id", *args.segment_id, args.held_out, "--VALIDATION_FRACTION", *fractions]
    return ["--segment_id", *args.segment_id, "--VALIDATION_SEGMENTS", args.held_out]


def describe_question(question: str, args) -> str:
    training = ", ".join(args.segment_id)
    if question == "a":
        return (f"({question}) trained on {training} and about {1 - args.held_out_fraction:.0%} of {args.held_out}; "
                f"scored on a band of about {args.held_out_fraction:.0%} of {args.held_out}")
    return f"({question}) trained on {training}; scored on the whole of {args.held_out}"


def train_control(question: str, settings: InputSettings, args, extra: list[str]) -> str:
    """The supervised control of a question: full fine-tuning from scratch on its training data, never its scored
    pixels; returns the checkpoint to probe (best.pth)."""
    folder = args.output / f"question_{question}" / "control"
    report.run_step(f"supervised control, question ({question}): full fine-tuning", [
        "finetune/train.py", "--exp_name", CONTROL, "--OUTPUT_DIR", str(folder), "--scheme", "validation", "--BEST_BY", "last",
        *question_options(question, args), "--SEED", "0", *finetune_options(settings), *extra],
        log=folder / f"{CONTROL}.log" if args.jobs > 1 else None)
    return str(folder / CONTROL / "best.pth")


def probe(run: tuple, settings: InputSettings, args, extra: list[str]) -> dict:
    """One frozen-encoder probe (question, name, checkpoint, seed), run and scored by evaluate/encoders.py's
    machinery, in the question's own folder."""
    question, name, checkpoint, seed = run
    question_args = argparse.Namespace(**{**vars(args), "output": args.output / f"question_{question}"})
    result = encoders.run_finetune(name, checkpoint, "probe", seed, settings, question_args, extra,
                                   question_options(question, args))
    return {"question": question, **result}


def scored_pixels(args, question: str, name: str) -> str:
    """How many pixels a question scores and their chance level (every run of the question scores the same)."""
    pooled = run_log.records(args.output / f"question_{question}" / "runs" / f"{name}_probe_seed0", "pooled_prediction")[-1]
    return (f"{pooled['validation_pixels']} pixels scored; calling every pixel ink scores F0.5 "
            f"{all_ink_f05(pooled['validation_ink_fraction']):.3f}")


def check_segments(args) -> None:
    """The held-out segment is none of --segment_id, and no segment is named twice, in whatever spellings
    (`segment_identity`: demo:1 and demo:01, an ID bare and as scroll1:ID, a path relative and absolute)."""
    identities = [segment_identity(spec) for spec in args.segment_id]
    held_out = segment_identity(args.held_out)
    if held_out in identities:
        spelled = args.segment_id[identities.index(held_out)]
        raise encoder_input.EvaluationError(
            f"--held_out {args.held_out} is also in --segment_id" + (f" (as {spelled})" if spelled != args.held_out else "")
            + ": the held-out segment must be one the probe does not train on whole")
    for index, identity in enumerate(identities):
        if identity in identities[:index]:
            first = args.segment_id[identities.index(identity)]
            raise encoder_input.EvaluationError(f"--segment_id names {first} twice" + (
                f" (as {args.segment_id[index]} too)" if args.segment_id[index] != first else ""))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = encoders.probe_parser(__doc__)
    parser.add_argument("--segment_id", nargs="+", default=["demo:1", "demo:2", "demo:3"],
                        help="the segments every probe trains on (segment specs, as fine-tuning takes them)")
    parser.add_argument("--held_out", default="demo:4", help="the segment scored: part of it trains in question (a)")
    parser.add_argument("--held_out_fraction", type=ranges.ranged(float, ranges.FRACTION_INSIDE), default=0.3,
                        help="question (a): the width of the scored band of the held-out segment, as a fraction of "
                             "its longer side (finetune/train.py's VALIDATION_FRACTION)")
    parser.add_argument("--question", nargs="+", choices=["a", "b"], default=["a", "b"],
                        help="a: trained on the segments and the rest of the held-out one; b: on the segments alone")
    parser.add_argument("--supervised_control", action="store_true",
                        help=f"per question, also probe '{CONTROL}': an encoder fully fine-tuned from scratch on the "
                             "question's training data")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/transfer"),
                        help="folder for the tables, the images and the runs")
    args = parser.parse_args(argv)
    check_segments(args)
    encoders.check_probe_arguments(args)
    if args.supervised_control and CONTROL in args.names:
        raise encoder_input.EvaluationError(f"the name '{CONTROL}' is the supervised control's; name that encoder otherwise")
    # Every run is a process in the repository root: paths from here must mean the same files there.
    args.segment_id = [encoder_input.segment_for_runs(spec) for spec in args.segment_id]
    args.held_out = encoder_input.segment_for_runs(args.held_out)
    args.output = args.output.resolve()
    args.pretrained_path = [path if path == "random" else str(pathlib.Path(path).resolve()) for path in args.pretrained_path]
    return args


def main() -> int:
    own, extra = encoder_input.split_at_double_dash(sys.argv[1:])
    args = parse_args(own)
    pretrained = [path for path in args.pretrained_path if path != "random"]
    settings = encoder_input.common_settings(pretrained or ["random"], args)  # checks every file exists and reads
    args.output.mkdir(parents=True, exist_ok=True)

    try:  # --jobs at a time; once one fails, no other starts
        arms = {question: list(zip(args.names, args.pretrained_path)) for question in args.question}
        if args.supervised_control:
            controls = encoder_input.side_by_side(lambda question: train_control(question, settings, args, extra),
                                                  args.question, args.jobs)
            for question, control in zip(args.question, controls):
                arms[question].append((CONTROL, control))
        planned = [(question, name, checkpoint, seed) for question in args.question for seed in range(args.seeds)
                   for name, checkpoint in arms[question]]
        runs = list(encoder_input.side_by_side(lambda run: probe(run, settings, args, extra), planned, args.jobs))
    except (RuntimeError, report.StepError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    baseline = "random" if "random" in args.names else args.names[0]
    rows, sections = [], []
    for question in args.question:
        question_rows = encoders.summarise([run for run in runs if run["question"] == question], baseline)
        rows += [{"question": question, **row} for row in question_rows]
        sections.append(f"Question {describe_question(question, args)}; {scored_pixels(args, question, args.names[0])}."
                        f"\n\n{encoders.markdown_table(question_rows, baseline)}")
    description = (f"Frozen-encoder probes, input {settings.describe()}, seeds 0–{args.seeds - 1}, extra settings: "
                   f"{' '.join(extra) or 'none'}. F0.5 on the scored pixels at the threshold best on the labelled "
                   f"tiles of every segment trained on.")
    document = "\n\n".join([description, *sections])
    write_bytes_atomic(args.output / "transfer.md", f"{document}\n".encode())
    encoders.write_csv(args.output / "transfer.csv", rows)
    encoders.write_csv(args.output / "runs.csv", runs)
    print(f"\n{document}\n\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
