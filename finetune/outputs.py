"""What a fine-tuning run leaves for people: PNGs (written atomically), the labels-vs-prediction image,
TensorBoard previews, and the round folders of iterative labeling.

The prediction PNG is uint8 grey at full segment resolution (0 = no ink, 255 = certain ink), so any
image editor opens it; a person paints the refined labels over it and runs again. Each iterative run
records its round in `round_NN/` (the label file used, the prediction, the metrics), so rounds can
be compared side by side.
"""
import json
import os
import pathlib

import cv2
import numpy as np
import torch

from finetune.data import UNKNOWN, Box
from pretrain.utils import misc

PREVIEW_SIDE = 1024  # longest side of TensorBoard images
VALIDATION_BOX_BGR = (0, 0, 255)
CAPTION_BGR = (255, 255, 255)
CAPTION_FONT = cv2.FONT_HERSHEY_SIMPLEX
LABELS_TITLE = "labels (ink white, not ink grey, unknown dark)"
PREDICTION_TITLE = "prediction (ink probability)"
HELD_OUT_NOTE = "red box: held-out validation band"


def write_png_atomic(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode, write to a temp file beside `path`, rename: an editor or a kill never sees half a PNG."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded_ok, encoded = cv2.imencode(".png", image)
    if not encoded_ok:
        raise OSError(f"could not encode {path} as PNG")
    misc.write_bytes_atomic(path, encoded.tobytes())


def probability_image(probabilities_yx: np.ndarray) -> np.ndarray:
    """(Y, X) uint8, probability × 255."""
    return np.clip(np.rint(probabilities_yx * 255.0), 0, 255).astype(np.uint8)


def caption_strip(panel_width: int, gap: int, held_out: bool) -> np.ndarray:
    """(H, 2 * panel_width + gap, 3) uint8 BGR: each panel's title above it and, with a held-out band, what
    the red box is; its last `gap` rows are a white line. The font scales with the panel width, so the caption reads alike at every segment size
    and in TensorBoard's downscaled preview."""
    lines = [[(0, LABELS_TITLE, CAPTION_BGR), (panel_width + gap, PREDICTION_TITLE, CAPTION_BGR)]]
    if held_out:
        lines.append([(0, HELD_OUT_NOTE, VALIDATION_BOX_BGR)])
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
    strip = np.zeros((margin + len(lines) * line_height + gap, 2 * panel_width + gap, 3), np.uint8)
    # The panels' separator runs on through the caption, and one as wide divides the caption from the panels,
    # whose unmasked background is as black as the caption's.
    strip[:, panel_width:panel_width + gap] = 255
    strip[-gap:] = 255
    for index, line in enumerate(lines):
        for x0, text, colour in line:
            cv2.putText(strip, text, (x0 + margin, margin + index * line_height + text_height), CAPTION_FONT, scale,
                        colour, thickness, cv2.LINE_AA)
    return strip


def labels_vs_prediction(labels_yx: np.ndarray, probabilities_yx: np.ndarray, mask_yx: np.ndarray,
                         held_out: Box | None = None) -> np.ndarray:
    """(caption + Y, 2X + gap, 3) uint8 BGR: labels (ink white, not-ink papyrus grey, unknown papyrus dark) |
    prediction, with the validation band outlined in red on both, under a caption that says so (`caption_strip`)."""
    labels_grey = np.select([labels_yx == 1, ~mask_yx, labels_yx == UNKNOWN], [255, 0, 25], 60).astype(np.uint8)
    gap = max(4, labels_yx.shape[1] // 100)
    panels = []
    for grey_yx in (labels_grey, probability_image(probabilities_yx)):
        panel = cv2.cvtColor(grey_yx, cv2.COLOR_GRAY2BGR)
        if held_out is not None:
            thickness = max(2, labels_yx.shape[1] // 400)
            cv2.rectangle(panel, (held_out.x0, held_out.y0), (held_out.x1 - 1, held_out.y1 - 1), VALIDATION_BOX_BGR,
                          thickness)
        panels.append(panel)
    separator = np.full((labels_yx.shape[0], gap, 3), 255, np.uint8)
    caption = caption_strip(labels_yx.shape[1], gap, held_out is not None)
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


def label_colours(labels_yx: np.ndarray, mask_yx: np.ndarray) -> np.ndarray:
    """(Y, X, 3) uint8 BGR of training labels a person can read: ink white, not ink blue, unknown grey, black
    outside the papyrus."""
    colours_bgr = np.array([[170, 80, 20], [255, 255, 255], [120, 120, 120]], np.uint8)  # not ink, ink, unknown
    image = colours_bgr[labels_yx]
    image[~mask_yx] = 0
    return image


def write_round_labels(folder: pathlib.Path, labels_yx: np.ndarray, mask_yx: np.ndarray) -> None:
    """The labels a round trains on, as files that can be repainted and given back: inklabels.png (ink) and, when
    some pixels are unknown, negatives.png (not ink) and labels_colour.png (all three, for reading)."""
    write_png_atomic(folder / "inklabels.png", (labels_yx == 1).astype(np.uint8) * 255)
    if (labels_yx == UNKNOWN).any():
        write_png_atomic(folder / "negatives.png", (labels_yx == 0).astype(np.uint8) * 255)
        write_png_atomic(folder / "labels_colour.png", label_colours(labels_yx, mask_yx))


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
