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

from finetune.data import Box
from pretrain.utils import misc

PREVIEW_SIDE = 1024  # longest side of TensorBoard images
VALIDATION_BOX_BGR = (0, 0, 255)


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


def labels_vs_prediction(labels_yx: np.ndarray, probabilities_yx: np.ndarray, mask_yx: np.ndarray,
                         held_out: Box | None = None) -> np.ndarray:
    """(Y, 2X + gap, 3) uint8 BGR: labels (ink white, papyrus grey) | prediction, with the validation
    band outlined in red on both."""
    labels_grey = np.where(labels_yx > 0, 255, np.where(mask_yx, 60, 0)).astype(np.uint8)
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
    return np.concatenate([panels[0], separator, panels[1]], axis=1)


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


def record_round(experiment_dir: pathlib.Path, round_number: int, labels_yx: np.ndarray, label_source: str,
                 prediction_png: np.ndarray, metrics: dict) -> pathlib.Path:
    """round_NN/: inklabels.png (the labels trained on), prediction.png, metrics.json."""
    folder = experiment_dir / f"round_{round_number:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    write_png_atomic(folder / "inklabels.png", (labels_yx > 0).astype(np.uint8) * 255)
    write_png_atomic(folder / "prediction.png", prediction_png)
    misc.write_bytes_atomic(folder / "metrics.json",
                            json.dumps({"round": round_number, "labels": label_source, **metrics}, indent=1).encode())
    return folder
