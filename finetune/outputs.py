"""What a fine-tuning run leaves for people: PNGs (written atomically), the labels-vs-prediction image,
TensorBoard previews, and the round folders of iterative labeling.

The prediction PNG is uint8 grey at full segment resolution (0 = no ink, 255 = certain ink), so any
image editor opens it; a person paints the refined labels over it and runs again. Each iterative run
records its round in `round_NN/` (the label file used, the prediction, the metrics), so rounds can
be compared side by side. Every image of labels for reading uses one colour scheme (`LABEL_COLOURS_BGR`:
ink white, not ink blue, unknown grey, black outside the mask) and draws its legend.
"""
import hashlib
import json
import os
import pathlib
import re

import cv2
import numpy as np
import torch

from finetune.data import UNKNOWN, Box
from pretrain.data.segment import SegmentError, parse_spec, segment_identity
from pretrain.utils import misc
from pretrain.utils.errors import OneLineError

PREVIEW_SIDE = 1024  # longest side of TensorBoard images
VALIDATION_BOX_BGR = (0, 0, 255)
CAPTION_BGR = (255, 255, 255)
CAPTION_FONT = cv2.FONT_HERSHEY_SIMPLEX
# The one colour scheme of every image of labels, and its legend. Not ink is blue, not grey, so that it is never
# mistaken for the grey of a low prediction in the panel beside it.
LABEL_BGR = {1: (255, 255, 255), 0: (170, 80, 20), UNKNOWN: (120, 120, 120)}  # ink, not ink, unknown
OUTSIDE_MASK_BGR = (0, 0, 0)
LEGEND = (("ink", LABEL_BGR[1]), ("not ink", LABEL_BGR[0]), ("unknown", LABEL_BGR[UNKNOWN]),
          ("outside the mask", OUTSIDE_MASK_BGR))
SWATCH = "[#]"  # in a caption's text, where the next legend colour is drawn; as wide as these characters
LEGEND_TEXT = "   ".join(f"{SWATCH} {name}" for name, _ in LEGEND)
LABELS_TITLE = "labels"
PREDICTION_TITLE = "prediction (ink probability: black 0, white 1)"
HELD_OUT_NOTE = "red box: held-out validation band"
SAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")
PATH_DIGEST_CHARACTERS = 8  # hex digits of a path's digest in a unique name: two paths share them with odds 1 in 4·10⁹


def output_name(spec: str, unique: bool = False) -> str:
    """The file name (without suffix) of a segment's outputs, the same for every spelling of the segment and
    readable: `demo_1` (demo:1, demo:01), the ID (a scroll-1 segment: bare or as scroll1:ID), `scroll4_<id>`, a
    local path's folder name (without `.zarr`). `unique`: a path's name also carries a digest of the resolved path
    (`seg-1a2b3c4d`), so that two folders' `seg.zarr` never share a file in one output folder, run after run."""
    parsed = parse_spec(spec)
    if parsed.kind == "demo":
        name = f"demo_{parsed.seed}"
    elif parsed.kind == "server":
        name = parsed.segment_id if parsed.scroll == "1" else f"scroll{parsed.scroll}_{parsed.segment_id}"
    else:
        name = parsed.path.resolve().name.removesuffix(".zarr")
    name = SAFE_NAME_CHARACTERS.sub("_", name).strip("._") or "segment"
    if unique and parsed.kind == "path":
        name += "-" + hashlib.sha256(parsed.identity.encode()).hexdigest()[:PATH_DIGEST_CHARACTERS]
    return name


def output_names(specs: list[str], unique: bool = False) -> list[str]:
    """One output name per spec (output_name); a segment given twice (in any spelling), or two that would write the
    same file, is an error naming both."""
    identities = [segment_identity(spec) for spec in specs]
    names = [output_name(spec, unique) for spec in specs]
    for index, name in enumerate(names):
        if identities[index] in identities[:index]:
            first = specs[identities.index(identities[index])]
            raise SegmentError(f"segment {specs[index]} is given twice" + (f" (as {first} too)" if first != specs[index]
                                                                           else ""))
        if name in names[:index]:
            raise SegmentError(f"segments {specs[names.index(name)]!r} and {specs[index]!r} would both be written to "
                               f"{name}.png; write them to separate folders (--output_dir, exp_name)")
    return names


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode, write to a temp file beside `path`, rename: an editor or a kill never sees half a PNG."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded_ok, encoded = cv2.imencode(".png", image)
    if not encoded_ok:
        raise OSError(f"could not encode {path} as PNG")
    misc.write_bytes_atomic(path, encoded.tobytes())


class NonFinitePredictionError(OneLineError, ValueError):
    """A prediction holds NaN or infinite probabilities: written as an image they would read as 0, a map that
    scores exactly chance, silently."""

    exit_status = 1


def probability_image(probabilities_yx: np.ndarray, what: str = "a prediction") -> np.ndarray:
    """(Y, X) uint8, probability × 255; a NaN or infinite probability is an error naming `what`."""
    finite_yx = np.isfinite(probabilities_yx)
    if not finite_yx.all():
        raise NonFinitePredictionError(f"{what} holds {int((~finite_yx).sum())} NaN or infinite probabilities (the "
                                       "model diverged); nothing was written")
    return np.clip(np.rint(probabilities_yx * 255.0), 0, 255).astype(np.uint8)


def text_strip(panel_width: int, gap: int, lines: list[list[tuple[int, str, tuple]]], panels: int = 1) -> np.ndarray:
    """(H, panels * panel_width + (panels - 1) * gap, 3) uint8 BGR: `lines` of (x0, text, colour) on black; each
    SWATCH in a text is drawn as the next label colour of the legend (`LEGEND`), edged in white; its last `gap`
    rows are a white line. The font scales with the panel width, so the text reads alike at every segment size
    and in TensorBoard's downscaled preview."""
    texts = [text for line in lines for _, text, _ in line]
    margin = max(2, panel_width // 60)
    # The widest text spans two thirds of a panel: small, yet readable; a narrow panel (a validation band, a
    # test segment) gives it its whole width, as two thirds of it would be too small to read.
    available = min(panel_width - 2 * margin, max(2 * panel_width // 3, 300))
    scale = available / max(cv2.getTextSize(text, CAPTION_FONT, 1.0, 1)[0][0] for text in texts)
    thickness = max(1, round(scale * 1.5))
    # A thicker stroke widens the text a little past the thin-stroke estimate: shrink to fit once more.
    scale *= min(1.0, available / max(cv2.getTextSize(text, CAPTION_FONT, scale, thickness)[0][0] for text in texts))
    (_, text_height), baseline = cv2.getTextSize(LABELS_TITLE, CAPTION_FONT, scale, thickness)
    line_height = text_height + baseline + margin
    strip = np.zeros((margin + len(lines) * line_height + gap, panels * panel_width + (panels - 1) * gap, 3), np.uint8)
    # The panels' separator runs on through the text, and one as wide divides the text from the panels, whose
    # unmasked background is as black as the strip's.
    for panel in range(1, panels):
        strip[:, panel * (panel_width + gap) - gap:panel * (panel_width + gap)] = 255
    strip[-gap:] = 255
    swatch_width = cv2.getTextSize(SWATCH, CAPTION_FONT, scale, thickness)[0][0]
    for index, line in enumerate(lines):
        text_bottom = margin + index * line_height + text_height
        for x0, text, colour in line:
            x, swatches = x0 + margin, iter(LEGEND)
            for number, part in enumerate(text.split(SWATCH)):
                if number:  # a SWATCH stood before this part
                    corners = (x, text_bottom - text_height), (x + swatch_width - 1, text_bottom)
                    cv2.rectangle(strip, *corners, next(swatches)[1], -1)
                    cv2.rectangle(strip, *corners, CAPTION_BGR, max(1, thickness // 2))
                    x += swatch_width
                cv2.putText(strip, part, (x, text_bottom), CAPTION_FONT, scale, colour, thickness, cv2.LINE_AA)
                x += cv2.getTextSize(part, CAPTION_FONT, scale, thickness)[0][0]
    return strip


def label_colours(labels_yx: np.ndarray, mask_yx: np.ndarray) -> np.ndarray:
    """(Y, X, 3) uint8 BGR of labels (1 ink, 0 not ink, UNKNOWN) in the one scheme of `LEGEND`."""
    colours_bgr = np.zeros((max(LABEL_BGR) + 1, 3), np.uint8)
    for value, colour_bgr in LABEL_BGR.items():
        colours_bgr[value] = colour_bgr
    image = colours_bgr[labels_yx]
    image[~mask_yx] = OUTSIDE_MASK_BGR
    return image


def labels_vs_prediction(labels_yx: np.ndarray, probabilities_yx: np.ndarray, mask_yx: np.ndarray,
                         held_out: Box | None = None, segment: str = "") -> np.ndarray:
    """(caption + Y, 2X + gap, 3) uint8 BGR: labels (`label_colours`) | prediction (grey), with the validation band
    outlined in red on both, under a caption: the segment shown (given `segment`: a run on several), each panel's
    title, the labels' legend and what the red box is."""
    gap = max(4, labels_yx.shape[1] // 100)
    panels = []
    for panel in (label_colours(labels_yx, mask_yx),
                  cv2.cvtColor(probability_image(probabilities_yx), cv2.COLOR_GRAY2BGR)):
        if held_out is not None:
            thickness = max(2, labels_yx.shape[1] // 400)
            cv2.rectangle(panel, (held_out.x0, held_out.y0), (held_out.x1 - 1, held_out.y1 - 1), VALIDATION_BOX_BGR,
                          thickness)
        panels.append(panel)
    separator = np.full((labels_yx.shape[0], gap, 3), 255, np.uint8)
    width = labels_yx.shape[1]
    lines = [[(0, f"segment {segment}", CAPTION_BGR)]] if segment else []
    lines += [[(0, LABELS_TITLE, CAPTION_BGR), (width + gap, PREDICTION_TITLE, CAPTION_BGR)],
              [(0, LEGEND_TEXT, CAPTION_BGR)]]
    if held_out is not None:
        lines.append([(0, HELD_OUT_NOTE, VALIDATION_BOX_BGR)])
    caption = text_strip(width, gap, lines, panels=2)
    return np.concatenate([caption, np.concatenate([panels[0], separator, panels[1]], axis=1)], axis=0)


def preview_chw(image: np.ndarray) -> torch.Tensor:
    """A (C, H, W) float tensor in [0, 1], RGB, at most PREVIEW_SIDE on its longest side, for TensorBoard."""
    scale = min(1.0, PREVIEW_SIDE / max(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        image = image[..., None]
    else:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0


def labels_with_legend(labels_yx: np.ndarray, mask_yx: np.ndarray) -> np.ndarray:
    """(legend + Y, X, 3) uint8 BGR: `label_colours` under its legend, for reading (labels_colour.png)."""
    width = labels_yx.shape[1]
    gap = max(4, width // 100)
    return np.concatenate([text_strip(width, gap, [[(0, LEGEND_TEXT, CAPTION_BGR)]]),
                           label_colours(labels_yx, mask_yx)], axis=0)


def write_round_labels(folder: pathlib.Path, labels_yx: np.ndarray, mask_yx: np.ndarray) -> None:
    """The labels a round trains on, as files that can be repainted and given back: inklabels.png (ink) and, when
    some pixels are unknown, negatives.png (not ink) and labels_colour.png (all three, for reading)."""
    write_png_atomic(folder / "inklabels.png", (labels_yx == 1).astype(np.uint8) * 255)
    if (labels_yx == UNKNOWN).any():
        write_png_atomic(folder / "negatives.png", (labels_yx == 0).astype(np.uint8) * 255)
        write_png_atomic(folder / "labels_colour.png", labels_with_legend(labels_yx, mask_yx))


def record_round(experiment_dir: pathlib.Path, round_number: int, labels_yx: np.ndarray, mask_yx: np.ndarray,
                 label_source: str, prediction_png: np.ndarray, metrics: dict) -> pathlib.Path:
    """round_NN/: the labels trained on (write_round_labels), prediction.png, metrics.json."""
    folder = experiment_dir / f"round_{round_number:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    write_round_labels(folder, labels_yx, mask_yx)
    write_png_atomic(folder / "prediction.png", prediction_png)
    misc.write_bytes_atomic(folder / "metrics.json",
                            json.dumps({"round": round_number, "labels": label_source, **metrics}, indent=1).encode())
    return folder
