"""labels_vs_prediction.png says in the image which side is which and what the red box is."""
import numpy as np
import pytest

from finetune.data import Box
from finetune.outputs import labels_vs_prediction


def comparison(shape_yx, held_out):
    labels_yx = np.zeros(shape_yx, np.uint8)
    labels_yx[20:40, 30:80] = 1
    mask_yx = np.zeros(shape_yx, bool)
    mask_yx[10:-10, 10:-10] = True
    probabilities_yx = np.where(mask_yx, 0.25, 0.0)
    return labels_vs_prediction(labels_yx, probabilities_yx, mask_yx, held_out)


def red_pixels(image_bgr):
    return (image_bgr[..., 2] > 150) & (image_bgr[..., 1] < 100) & (image_bgr[..., 0] < 100)


@pytest.mark.parametrize("held_out", [None, Box(10, 118, 120, 160)], ids=["no-band", "held-out-band"])
def test_a_caption_above_the_panels_names_each_side_and_the_red_box(held_out):
    image = comparison((128, 192), held_out)
    gap = 4
    caption_height = image.shape[0] - 128
    assert image.shape[1:] == (2 * 192 + gap, 3) and caption_height > 0
    panels = image[caption_height:]
    # The panels are as before: labels (ink white, papyrus grey) | prediction (probability × 255).
    assert (panels[25, 50] == 255).all() and (panels[100, 20] == 60).all() and (panels[5, 5] == 0).all()
    assert (panels[100, 192 + gap + 20] == 64).all()
    caption = image[:caption_height - gap]  # the last `gap` rows are the white line under the caption
    assert (image[caption_height - gap:caption_height] == 255).all()
    white_yx = caption.min(axis=2) > 200
    assert white_yx[:, :192].sum() > 100 and white_yx[:, 192 + gap:].sum() > 100  # a title above each panel
    assert red_pixels(caption).any() == (held_out is not None)


def test_the_caption_scales_with_the_image_width():
    heights = [image.shape[0] - shape_yx[0] for shape_yx in ((300, 900), (600, 1800))
               for image in [comparison(shape_yx, Box(10, 290, 400, 600))]]
    assert heights[1] > 1.5 * heights[0]
