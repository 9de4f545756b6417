"""labels_vs_prediction.png and labels_colour.png say in the image which side is which, what the red box is and
what each colour means, with one colour scheme for labels in both."""
import numpy as np
import pytest

from finetune.data import UNKNOWN, Box
from finetune.outputs import LABEL_BGR, LEGEND, OUTSIDE_MASK_BGR, labels_vs_prediction, labels_with_legend


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
    # labels (ink white, not ink blue, black outside the mask) | prediction (probability × 255).
    assert (panels[25, 50] == 255).all() and (panels[100, 20] == LABEL_BGR[0]).all() and (panels[5, 5] == 0).all()
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


def legend_swatches_found(strip_bgr) -> set[str]:
    """The names of the legend entries whose colour is drawn in `strip_bgr` (white and black: the text and the
    background are those colours too, so only the two coloured swatches can be told apart by colour alone)."""
    return {name for name, colour in LEGEND if colour not in ((255, 255, 255), (0, 0, 0))
            and (strip_bgr == colour).all(axis=-1).sum() > 20}


def test_both_label_images_use_one_colour_scheme_and_draw_its_legend():
    labels_yx = np.zeros((128, 192), np.uint8)
    labels_yx[20:40, 30:80] = 1
    labels_yx[:, 120:] = UNKNOWN
    mask_yx = np.zeros(labels_yx.shape, bool)
    mask_yx[10:-10, 10:-10] = True
    comparison = labels_vs_prediction(labels_yx, np.full(labels_yx.shape, 0.5), mask_yx)
    reading = labels_with_legend(labels_yx, mask_yx)
    comparison_labels = comparison[comparison.shape[0] - 128:, :192]
    reading_labels = reading[reading.shape[0] - 128:]
    assert np.array_equal(comparison_labels, reading_labels)
    for value, colour in LABEL_BGR.items():
        assert (reading_labels[(labels_yx == value) & mask_yx] == colour).all()
    assert (reading_labels[~mask_yx] == OUTSIDE_MASK_BGR).all()
    assert len({tuple(colour) for colour in LABEL_BGR.values()} | {OUTSIDE_MASK_BGR}) == 4  # each told apart
    # The legend above each: the swatches of not ink and unknown, in their own colours.
    assert legend_swatches_found(comparison[:comparison.shape[0] - 128]) == {"not ink", "unknown"}
    assert legend_swatches_found(reading[:reading.shape[0] - 128]) == {"not ink", "unknown"}
    assert reading.shape[1:] == (192, 3)


def test_a_run_on_several_segments_names_the_segment_in_the_caption():
    labels_yx, mask_yx = np.zeros((128, 192), np.uint8), np.ones((128, 192), bool)
    plain = labels_vs_prediction(labels_yx, np.zeros(labels_yx.shape), mask_yx)
    named = labels_vs_prediction(labels_yx, np.zeros(labels_yx.shape), mask_yx, segment="scroll4:20231107190228")
    assert named.shape[0] > plain.shape[0]  # a caption line more, above the titles
    first_line = named[:named.shape[0] - plain.shape[0]]
    assert (first_line[:, :192].min(axis=2) > 200).sum() > 50  # its text
