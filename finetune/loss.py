"""The ink loss: 0.5 · BCE with smoothed targets + 0.5 · Dice, as ScrollMAE and the Grand Prize winner, over the
known pixels only.

Labels are 1 (ink), 0 (not ink) or UNKNOWN (`finetune.data`): an unknown pixel adds nothing to either term, so a
letter nobody has labelled yet is not taught as background. Where every pixel is known, both terms equal
segmentation_models_pytorch's SoftBCEWithLogitsLoss(smooth_factor) and DiceLoss("binary") (the tests compare them):
the BCE is the mean over the pixels, and the Dice is taken over the whole batch, counting as 0 for a batch that
holds no ink.
"""
import torch
import torch.nn.functional

from finetune.data import UNKNOWN

DICE_EPSILON = 1e-7  # smp's


def ink_loss(logits_b1hw: torch.Tensor, labels_b1hw: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The loss of (B, 1, H, W) logits against (B, 1, H, W) labels in {0, 1, UNKNOWN}."""
    known_b1hw = (labels_b1hw != UNKNOWN).to(logits_b1hw.dtype)
    ink_b1hw = (labels_b1hw == 1).to(logits_b1hw.dtype)
    targets_b1hw = ink_b1hw * (1 - label_smoothing) + (1 - ink_b1hw) * label_smoothing
    bce_b1hw = torch.nn.functional.binary_cross_entropy_with_logits(logits_b1hw, targets_b1hw, reduction="none")
    bce = (bce_b1hw * known_b1hw).sum() / known_b1hw.sum().clamp_min(1)
    probabilities_b1hw = torch.sigmoid(logits_b1hw) * known_b1hw
    intersection = (probabilities_b1hw * ink_b1hw).sum()
    cardinality = (probabilities_b1hw + ink_b1hw).sum()
    dice = (1 - 2 * intersection / cardinality.clamp_min(DICE_EPSILON)) * (ink_b1hw.sum() > 0)
    return 0.5 * bce + 0.5 * dice
