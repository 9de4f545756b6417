"""Measuring a model against labels: the held-out band every epoch, and the whole-segment prediction.

Each set of labels is scored only where it is fair: the held-out band (scheme "validation"); in scheme
"iterative", the tiles trained on (how well the labels are fitted) and, when the segment has full labels
of its own, everywhere training saw no label (how well it found the letters nobody labelled).

A run on several segments scores each held-out region alone and all of them pooled: the pooled F0.5 and AUC
are those of every held-out pixel of every segment together, not a mean of the segments' scores, and the pooled
calibrated F0.5 is at the threshold best on the labelled tiles trained on of every segment together.
"""
import dataclasses

import numpy as np
import torch

from pretrain import dist
from finetune.data import UNKNOWN, Box, tiles_region
from finetune.metrics import (all_ink_f05, average_precision, best_threshold_of, f05_at, ink_metrics,
                             threshold_counts)


@dataclasses.dataclass
class HeldOutScores:
    """What the validation of one segment's held-out region scored, kept so that several segments can be pooled."""

    loss_sum: float  # over its tiles
    tile_count: int
    probabilities: np.ndarray  # (P,) float32 of the scored pixels
    is_ink: np.ndarray  # (P,) bool


def pooled_metrics(parts: list[HeldOutScores]) -> dict:
    """Loss per tile, and F0.5 / AUC / IoU over every scored pixel of `parts` together."""
    loss = sum(part.loss_sum for part in parts) / max(1, sum(part.tile_count for part in parts))
    pixel_metrics = ink_metrics(np.concatenate([part.probabilities for part in parts]),
                                np.concatenate([part.is_ink for part in parts]))
    return {"loss": loss, **pixel_metrics.as_dict()}


@torch.no_grad()
def validate(model, loader, loss_function, device: torch.device, labels_yx: np.ndarray, mask_yx: np.ndarray,
             box: Box) -> tuple[HeldOutScores, np.ndarray]:
    """The held-out tiles' loss and scored papyrus pixels (`pooled_metrics([scores])` gives their metrics), and
    the band's (h, w) probability map. Held-out tiles do not overlap, so each pixel is predicted and counted once."""
    model.eval()
    loss_sum, tile_count, tiles = 0.0, 0, []
    for batch in loader:
        volume_b1dhw = batch["volume"].to(device, non_blocking=True)
        labels_b1hw = batch["label"].to(device, non_blocking=True).unsqueeze(1)
        with dist.autocast(device):
            logits_b1hw = model(volume_b1dhw).float()
        loss_sum += loss_function(logits_b1hw, labels_b1hw).item() * len(volume_b1dhw)
        tile_count += len(volume_b1dhw)
        tiles += zip(batch["origin"].tolist(), torch.sigmoid(logits_b1hw[:, 0]).cpu().numpy())
    gathered = dist.all_gather_object((loss_sum, tile_count, tiles))
    band_probabilities_hw = np.zeros((box.y1 - box.y0, box.x1 - box.x0), np.float32)
    covered_hw = np.zeros(band_probabilities_hw.shape, bool)
    for _, _, process_tiles in gathered:
        for (y, x), probabilities_tt in process_tiles:
            rows = slice(y - box.y0, y - box.y0 + probabilities_tt.shape[0])
            columns = slice(x - box.x0, x - box.x0 + probabilities_tt.shape[1])
            band_probabilities_hw[rows, columns] = probabilities_tt
            covered_hw[rows, columns] = True
    band_labels_hw = labels_yx[box.y0:box.y1, box.x0:box.x1]
    scored_hw = covered_hw & mask_yx[box.y0:box.y1, box.x0:box.x1] & (band_labels_hw != UNKNOWN)
    scores = HeldOutScores(sum(item[0] for item in gathered), sum(item[1] for item in gathered),
                           band_probabilities_hw[scored_hw], band_labels_hw[scored_hw] == 1)
    return scores, band_probabilities_hw


def prediction_metrics(probabilities_yx: np.ndarray, labels_yx: np.ndarray, region_yx: np.ndarray,
                       held_out: Box | None, train_origins: np.ndarray, tile_size: int,
                       full_labels_yx: np.ndarray | None) -> dict:
    """Metrics of a whole-segment prediction, prefixed by where they were measured (see the module doc); pixels
    whose label is UNKNOWN are not scored. With a held-out band, also its average precision and its F0.5 at the
    threshold that is best on the labelled tiles trained on (`validation_calibrated_f05`), not on the band itself.
    `full_labels_yx`: the segment's own labels when training used others (None otherwise). `train_origins`: the
    tiles the human labels chose (so self-training rounds stay comparable)."""
    if held_out is not None:
        band_yx = held_out_pixels(labels_yx, region_yx, held_out)
        calibration_yx = calibration_pixels(labels_yx, region_yx, held_out, train_origins, tile_size)
        return validation_metrics(probabilities_yx[band_yx], labels_yx[band_yx] == 1,
                                  threshold_counts(probabilities_yx[calibration_yx], labels_yx[calibration_yx] == 1))
    known_yx = labels_yx != UNKNOWN
    seen_yx = tiles_region(train_origins, tile_size, labels_yx.shape) & region_yx
    report = {}
    if (seen_yx & known_yx).any():  # a run from a prior alone has no labelled tiles
        report = ink_metrics(probabilities_yx[seen_yx & known_yx], labels_yx[seen_yx & known_yx] == 1).as_dict("labelled_tiles_")
    if full_labels_yx is not None:
        unseen_yx = region_yx & ~seen_yx
        report.update(ink_metrics(probabilities_yx[unseen_yx], full_labels_yx[unseen_yx]).as_dict("unlabelled_area_"))
    return report


def calibration_pixels(labels_yx: np.ndarray, region_yx: np.ndarray, held_out: Box | None, train_origins: np.ndarray,
                       tile_size: int) -> np.ndarray:
    """(Y, X) bool: where a threshold is chosen blind, the labelled pixels of the tiles trained on (never the
    held-out region's)."""
    calibration_yx = tiles_region(train_origins, tile_size, labels_yx.shape) & region_yx & (labels_yx != UNKNOWN)
    return calibration_yx & ~held_out.region_yx(labels_yx.shape) if held_out is not None else calibration_yx


def held_out_pixels(labels_yx: np.ndarray, region_yx: np.ndarray, held_out: Box) -> np.ndarray:
    """(Y, X) bool: the pixels a prediction is scored on in the held-out region (known labels, in the region)."""
    return held_out.region_yx(labels_yx.shape) & region_yx & (labels_yx != UNKNOWN)


def validation_metrics(probabilities: np.ndarray, is_ink: np.ndarray,
                       calibration_counts: np.ndarray | None = None) -> dict:
    """The `validation_` metrics of a prediction's held-out pixels, one segment's or several pooled (P,) each; with
    the (4, T) threshold_counts of calibration pixels that hold both classes, also the held-out F0.5 at the threshold
    best on them (`validation_calibrated_f05`), not on the held-out pixels themselves."""
    report = ink_metrics(probabilities, is_ink).as_dict("validation_")
    report["validation_average_precision"] = average_precision(probabilities, is_ink)
    if calibration_counts is None:
        return report
    true_positives, false_positives, false_negatives, true_negatives = calibration_counts[:, 0]
    if true_positives + false_negatives and false_positives + true_negatives:  # ink and not ink to choose between
        threshold = best_threshold_of(calibration_counts)
        report.update(validation_calibrated_threshold=threshold,
                      validation_calibrated_f05=f05_at(probabilities, is_ink, threshold))
    return report


def describe(metrics: dict, held_out: str = "held-out band ") -> str:
    """F0.5 (its threshold, and chance: calling every pixel ink) and AUC of metrics as `pooled_metrics` or
    `prediction_metrics` return them, for a person: an F0.5 means nothing without the chance level of its pixels.
    `held_out` names the `validation_` pixels (a validation segment is held out whole, not as a band)."""
    groups = {"": "", "validation_": held_out, "labelled_tiles_": "labelled tiles ",
              "unlabelled_area_": "where nothing was labelled "}
    parts = [f"{label}F0.5 {metrics[prefix + 'f05']:.3f} (threshold {metrics[prefix + 'threshold']:.2f}; chance "
             f"{all_ink_f05(metrics[prefix + 'ink_fraction']):.3f}), AUC {metrics[prefix + 'auc']:.3f}"
             for prefix, label in groups.items() if prefix + "f05" in metrics]
    return "; ".join(parts)
