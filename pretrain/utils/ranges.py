"""The range of a numeric setting, declared once beside the settings and checked by each script's one parser:
finetune/train.py's SETTING_RANGES (through finetune/config.py), pretrain/utils/arg_util.py's SETTING_RANGES, and the
argparse options of finetune/predict.py and evaluate/ (`ranged`). A value out of range is one line naming the
setting, the value and the range, before anything runs: `--LR -0.01` would otherwise be a traceback from deep inside
torch, and `--STOP_AFTER_EPOCHS -1` a run that never trains and never says why."""
import argparse
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Range:
    """Finite numbers from `low` to `high` (None: no bound on that side), each bound included unless said."""

    low: float | None = None
    high: float | None = None
    low_included: bool = True
    high_included: bool = True

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value >= self.low if self.low_included else value > self.low)
        below = self.high is None or (value <= self.high if self.high_included else value < self.high)
        return above and below

    def __str__(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'≥' if self.low_included else '>'} {self.low}")
        if self.high is not None:
            bounds.append(f"{'≤' if self.high_included else '<'} {self.high}")
        return " and ".join(bounds) or "a finite number"

AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
AT_LEAST_2 = Range(2)
ABOVE_0 = Range(0, low_included=False)
FRACTION = Range(0, 1)  # 0 to 1, both included
FRACTION_BELOW_1 = Range(0, 1, high_included=False)
FRACTION_ABOVE_0 = Range(0, 1, low_included=False)
FRACTION_INSIDE = Range(0, 1, low_included=False, high_included=False)  # neither 0 nor 1


def problem(name: str, value, allowed: Range) -> str | None:
    """'NAME VALUE is not RANGE' for a value (or any item of a list of values) out of range; None is no value and
    passes (a setting whose None means "the checkpoint's own")."""
    values = value if isinstance(value, list) else [value]
    wrong = [item for item in values if item is not None and item not in allowed]
    if not wrong:
        return None
    shown = " ".join(map(str, values)) if isinstance(value, list) else str(value)
    return f"{name} {shown} is out of range: it must be {allowed}" + (" (each value)" if isinstance(value, list) else "")


def ranged(kind: type, allowed: Range):
    """An argparse `type=` that converts to `kind` and refuses a value out of `allowed`, in argparse's one line."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {allowed}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert
