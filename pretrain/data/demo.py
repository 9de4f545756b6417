"""A synthetic scroll segment with hidden ink, for demos and tests that need no download.

Geometry along the layer axis z (65 layers by default), per pixel (y, x):

    z < surface - gap_before         the previous sheet, entering the first layers in places
    z < surface                      air
    surface <= z < surface + ~12     the papyrus sheet: its recto (ink side) faces low z at
                                     `surface`, with horizontal fibres in the recto half and
                                     vertical fibres in the verso half
    surface + ~12 <= z               air, then the next sheet entering the last layers in places

`surface(y, x)` is a smooth warp of about +-5 layers around the middle layer. Carbon ink changes
only the first voxel or two of the recto (a slight density increase plus a crackle texture), so no
single layer shows it: the warp moves the surface across layers, and a slow gain/offset drift and
CT-like noise hide the small density change. A 3D model that follows the surface and reads the
texture can find it. `contrast` scales the ink signal (1.0 is the calibrated difficulty).

The same seed gives the same bytes on every machine, so that scores measured on a CPU and on a GPU box can be
compared and pooled: every field is computed in float64 with numpy and scipy (elementwise arithmetic and fixed-order
filters, whose rounding differences between builds and instruction sets stay far below the rounding to uint8),
OpenCV only rasterises the letters (integer arithmetic), and a segment whose digest is recorded in REFERENCE_SHA256
is checked against it at build: a machine that builds another demo says so instead of scoring on it.
"""
import hashlib
import pathlib
from typing import NamedTuple

import cv2
import numpy as np
import scipy.ndimage
import zarr

from pretrain.utils.errors import OneLineError

# Bump when the generated data changes for a given seed, so cached demo segments get rebuilt.
GENERATOR_VERSION = 2
DEFAULT_SHAPE = (65, 1024, 1536)  # (Z, Y, X)
# `demo_digest` of the segments every recorded number comes from (default shape and contrast), by seed.
REFERENCE_SHA256 = {0: "9ba7f00294aa9d9827fa90f5b7d4758f8ae1c7e91246aece5229476a3db7e028",
                    1: "d346c8fa6f72e3ccfe998bd10f01305bcaaa15f29809348d8f5bef2a0f4cf00e"}

CHUNKS_ZYX = (16, 128, 128)  # small chunks: a 16-layer depth window decodes little beyond itself
SHEET_THICKNESS = 12.0  # layers
EDGE_WIDTH = 0.6  # layers; partial-volume blur of every air/papyrus boundary

# Intensities on the 0..255 scale, before the slow drift.
AIR_LEVEL = 40.0
PAPYRUS_LEVEL = 140.0
FIBRE_AMPLITUDE = 14.0
NOISE_STD = 10.0

# Ink at contrast 1.0: a density step and a crackle texture, in a Gaussian depth profile centred
# just inside the recto surface.
INK_DENSITY_STEP = 6.0
INK_CRACKLE_AMPLITUDE = 12.0
INK_DEPTH = 0.5  # layers below the surface
INK_DEPTH_WIDTH = 0.6  # layers (standard deviation)

# Letters that look alike in Latin and Greek capitals; C stands for the lunate sigma of papyri.
ALPHABET = "ABCEHIKMNOPTXYZ"


class DemoDigestError(OneLineError, RuntimeError):
    """This machine built a demo segment other than the reference one: its scores would not be comparable."""


class _Letter(NamedTuple):
    line: int
    origin_xy: tuple  # bottom-left corner of the text, as cv2.putText takes it
    character: str
    box_yyxx: tuple  # (y0, y1, x0, x1) with room for the stroke thickness


def _smooth_noise(rng: np.random.Generator, shape_yx: tuple, sigma_yx: tuple) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation, (Y, X) float64.

    Large sigmas are filtered on a coarser grid and upsampled: a kernel hundreds of pixels wide on
    the full grid is slow, for a field that has no fine detail anyway.
    """
    factor = max(1, int(min(sigma_yx) // 4))
    coarse_shape = (-(-shape_yx[0] // factor) + 1, -(-shape_yx[1] // factor) + 1)
    noise_yx = rng.standard_normal(coarse_shape, dtype=np.float32).astype(np.float64)
    noise_yx = scipy.ndimage.gaussian_filter(noise_yx, (sigma_yx[0] / factor, sigma_yx[1] / factor), mode="reflect")
    if factor > 1:  # linear, sampling at pixel centres
        noise_yx = scipy.ndimage.zoom(noise_yx, factor, order=1, mode="nearest", grid_mode=True)
    noise_yx = noise_yx[:shape_yx[0], :shape_yx[1]]
    return (noise_yx - noise_yx.mean()) / noise_yx.std()


def _sigmoid(value: np.ndarray) -> np.ndarray:
    # The tanh form never overflows, unlike 1 / (1 + exp(-value)).
    return 0.5 + 0.5 * np.tanh(0.5 * value)


def _segment_mask(rng: np.random.Generator, shape_yx: tuple) -> np.ndarray:
    """One blobby region covering about 72-82% of the image, without holes, (Y, X) bool."""
    height, width = shape_yx
    y_yx, x_yx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    # A centred bump plus smooth noise: the noise makes the outline irregular, the bump keeps the
    # region in one piece and away from the corners.
    field_yx = 1.0 - (y_yx ** 2 + x_yx ** 2) + 0.4 * _smooth_noise(rng, shape_yx, (height / 10, height / 10))
    target_fraction = rng.uniform(0.72, 0.82)
    mask_yx = field_yx > np.quantile(field_yx, 1.0 - target_fraction)
    labels_yx, _ = scipy.ndimage.label(mask_yx)
    largest = np.argmax(np.bincount(labels_yx.ravel())[1:]) + 1
    return scipy.ndimage.binary_fill_holes(labels_yx == largest)


def _ink_labels(rng: np.random.Generator, mask_yx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lines of capital letters inside the mask: (all ink, two adjacent letters), (Y, X) uint8 each."""
    height, width = mask_yx.shape
    font = cv2.FONT_HERSHEY_SIMPLEX
    # Letters scale with the shorter side, so small or narrow segments still hold several lines.
    letter_height = max(8, min(height, width) // 16)
    thickness = max(2, letter_height // 8)
    font_scale = cv2.getFontScaleFromHeight(font, letter_height, thickness)
    margin = thickness + 2
    # Letters must end well inside the papyrus: the segment edge is not written on.
    inner_mask_yx = cv2.erode(mask_yx.astype(np.uint8), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)) > 0

    rows, columns = np.nonzero(mask_yx)
    letters = []
    baseline = rows.min() + letter_height + 2 * margin
    line_index = 0
    while baseline < rows.max() - margin:
        x = columns.min() + margin + int(rng.integers(0, 2 * letter_height))
        line_end = columns.max() - margin - int(rng.integers(0, 4 * letter_height))
        while True:
            character = str(rng.choice(list(ALPHABET)))
            (letter_width, _), _ = cv2.getTextSize(character, font, font_scale, thickness)
            if x + letter_width > line_end:
                break
            origin_xy = (x, baseline + int(rng.integers(-2, 3)))  # a scribe's baseline wanders
            box_yyxx = (origin_xy[1] - letter_height - margin, origin_xy[1] + margin,
                        x - margin, x + letter_width + margin)
            letters.append(_Letter(line_index, origin_xy, character, box_yyxx))
            x += letter_width + int(letter_height * rng.uniform(0.2, 0.45))
        baseline += int(letter_height * rng.uniform(1.7, 1.9))
        line_index += 1

    def draw(selected_letters) -> np.ndarray:
        image_yx = np.zeros((height, width), np.uint8)
        for letter in selected_letters:
            cv2.putText(image_yx, letter.character, letter.origin_xy, font, font_scale, 255, thickness, cv2.LINE_8)
        return np.where(inner_mask_yx, image_yx, 0).astype(np.uint8)

    def fully_inside(letter: _Letter) -> bool:
        y0, y1, x0, x1 = letter.box_yyxx
        return y0 >= 0 and x0 >= 0 and bool(inner_mask_yx[y0:y1, x0:x1].all())

    pairs = [(first, second) for first, second in zip(letters, letters[1:])
             if first.line == second.line and fully_inside(first) and fully_inside(second)]
    if not pairs:
        raise ValueError(f"segment of shape {mask_yx.shape} too small to hold two whole letters")
    pair = pairs[int(rng.integers(len(pairs)))]
    return draw(letters), draw(pair)


def demo_digest(volume_zyx: np.ndarray, *images_yx: np.ndarray) -> str:
    """sha256 of a segment's arrays (not of its files, whose encoding may vary between library versions)."""
    digest = hashlib.sha256()
    for array in (volume_zyx, *images_yx):
        digest.update(str(array.shape).encode() + np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def build_demo_segment(directory: pathlib.Path, seed: int = 0, shape: tuple[int, int, int] = DEFAULT_SHAPE,
                       contrast: float = 1.0) -> None:
    """Write a synthetic segment into the new folder `directory`.

    Writes the zarr v3 group (array "0", uint8 (Z, Y, X), chunks CHUNKS_ZYX), mask.png,
    inklabels.png (all ink) and inklabels_two_letters.png (two adjacent letters), all (Y, X) uint8
    in {0, 255}. The same seed, shape and contrast always give the same arrays; with the default shape and
    contrast, a seed in REFERENCE_SHA256 that does not (another build of numpy or scipy) is a DemoDigestError.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True)  # fails, before any work, if the folder exists
    layer_count, height, width = shape
    shape_yx = (height, width)
    rng = np.random.default_rng(seed)

    mask_yx = _segment_mask(rng, shape_yx)
    inklabels_yx, two_letters_yx = _ink_labels(rng, mask_yx)

    # Sheet geometry, all (Y, X) float64 in layers. The surface bends broadly and has smaller bumps.
    surface_yx = layer_count // 2 + 3.0 * _smooth_noise(rng, shape_yx, (180, 180)) \
        + 1.0 * _smooth_noise(rng, shape_yx, (60, 60))
    thickness_yx = SHEET_THICKNESS + 0.7 * _smooth_noise(rng, shape_yx, (100, 100))
    # Neighbouring sheets keep at least a few layers of air from this one and reach only into the
    # outer layers, over part of the area.
    gap_after_yx = np.maximum(4.0, 18.0 + 6.0 * _smooth_noise(rng, shape_yx, (150, 150)))
    gap_before_yx = np.maximum(4.0, 30.0 + 6.0 * _smooth_noise(rng, shape_yx, (150, 150)))
    next_sheet_start_yx = surface_yx + thickness_yx + gap_after_yx
    previous_sheet_end_yx = surface_yx - gap_before_yx

    # Textures, (Y, X) float64. Fibres are noise stretched along x (recto) or y (verso).
    recto_fibres_yx = _smooth_noise(rng, shape_yx, (1.2, 18.0))
    verso_fibres_yx = _smooth_noise(rng, shape_yx, (18.0, 1.2))
    neighbour_texture_yx = _smooth_noise(rng, shape_yx, (3.0, 3.0))
    papyrus_yx = PAPYRUS_LEVEL + 8.0 * _smooth_noise(rng, shape_yx, (40, 40))
    # Crackle: thin dark cracks along the zero lines of fine noise, bright plates between them,
    # and grain on top.
    cracks_yx = np.abs(_smooth_noise(rng, shape_yx, (2.5, 2.5))) < 0.3
    grain_yx = rng.standard_normal(shape_yx, dtype=np.float32).astype(np.float64)
    crackle_yx = np.where(cracks_yx, -2.0, 0.6) + 0.5 * grain_yx
    crackle_yx = (crackle_yx - crackle_yx.mean()) / crackle_yx.std()
    # Ink edges are soft: the label is where a person would draw, the carbon thins out around it.
    ink_amount_yx = scipy.ndimage.gaussian_filter(inklabels_yx / 255.0, 1.0, mode="mirror")
    ink_signal_yx = contrast * ink_amount_yx * (INK_DENSITY_STEP + INK_CRACKLE_AMPLITUDE * crackle_yx)

    # Slow scanner drift over the segment.
    gain_yx = 1.0 + 0.1 * _smooth_noise(rng, shape_yx, (250, 250))
    offset_yx = 8.0 * _smooth_noise(rng, shape_yx, (300, 300))

    volume_zyx = np.empty(shape, np.uint8)
    for z in range(layer_count):
        depth_in_sheet_yx = z - surface_yx
        sheet_yx = _sigmoid(depth_in_sheet_yx / EDGE_WIDTH) * _sigmoid((thickness_yx - depth_in_sheet_yx) / EDGE_WIDTH)
        verso_weight_yx = _sigmoid(depth_in_sheet_yx - thickness_yx / 2)
        fibres_yx = recto_fibres_yx + verso_weight_yx * (verso_fibres_yx - recto_fibres_yx)
        neighbours_yx = (_sigmoid((z - next_sheet_start_yx) / EDGE_WIDTH)
                         + _sigmoid((previous_sheet_end_yx - z) / EDGE_WIDTH))
        ink_weight_yx = np.exp(-0.5 * ((depth_in_sheet_yx - INK_DEPTH) / INK_DEPTH_WIDTH) ** 2)
        density_yx = (AIR_LEVEL
                      + sheet_yx * (papyrus_yx + FIBRE_AMPLITUDE * fibres_yx - AIR_LEVEL)
                      + neighbours_yx * (papyrus_yx + FIBRE_AMPLITUDE * neighbour_texture_yx - AIR_LEVEL)
                      + ink_weight_yx * ink_signal_yx)
        noise_yx = rng.standard_normal(shape_yx, dtype=np.float32).astype(np.float64)
        layer_yx = offset_yx + gain_yx * density_yx + NOISE_STD * noise_yx
        # Outside the segment there is no surface to render: real segments are black there.
        volume_zyx[z] = np.where(mask_yx, np.clip(np.rint(layer_yx), 0, 255), 0)

    mask_image_yx = mask_yx.astype(np.uint8) * 255
    digest = demo_digest(volume_zyx, mask_image_yx, inklabels_yx, two_letters_yx)
    reference = REFERENCE_SHA256.get(seed) if (tuple(shape), contrast) == (DEFAULT_SHAPE, 1.0) else None
    if reference is not None and digest != reference:
        raise DemoDigestError(
            f"this machine built a different demo:{seed} (sha256 {digest[:12]}…, the reference is {reference[:12]}…; "
            f"numpy {np.__version__}, scipy {scipy.__version__}, OpenCV {cv2.__version__}): scores on it would not be "
            "comparable with any recorded one; please report it with these versions")
    group = zarr.open_group(directory, mode="w")
    group.attrs.update({"generator": "pretrain.data.demo", "generator_version": GENERATOR_VERSION,
                        "seed": int(seed), "contrast": float(contrast), "shape": [int(size) for size in shape],
                        "sha256": digest})
    array = group.create_array("0", shape=shape, chunks=CHUNKS_ZYX, dtype=np.uint8)
    array[:] = volume_zyx
    cv2.imwrite(str(directory / "mask.png"), mask_image_yx)
    cv2.imwrite(str(directory / "inklabels.png"), inklabels_yx)
    cv2.imwrite(str(directory / "inklabels_two_letters.png"), two_letters_yx)


def best_single_layer_threshold_f05(volume_zyx: np.ndarray, inklabels_yx: np.ndarray,
                                    mask_yx: np.ndarray) -> tuple[float, int, float]:
    """Best F0.5 of "ink = one layer above (or below) one global threshold", inside the mask.

    Tries every layer, every threshold and both polarities. Returns (F0.5, layer, threshold);
    thresholds fall halfway between integers, so they say which values count as ink either way.
    Each layer becomes two 256-bin histograms (not ink, ink) whose cumulative sums give the
    confusion counts for all thresholds at once. `volume_zyx` may be a zarr array: it is read one
    layer at a time.
    """
    if volume_zyx.dtype != np.uint8:
        raise ValueError(f"best_single_layer_threshold_f05 needs a uint8 volume, got {volume_zyx.dtype}")
    inside_yx = mask_yx > 0
    is_ink = inklabels_yx[inside_yx] > 0  # (N,)
    total_ink = is_ink.sum()
    best = (0.0, 0, 0.0)
    for z in range(volume_zyx.shape[0]):
        values = volume_zyx[z][inside_yx].astype(np.int64)  # (N,)
        histograms = np.bincount(values + 256 * is_ink, minlength=512).reshape(2, 256)  # (not ink / ink, value)
        at_or_below = np.cumsum(histograms, axis=1)  # (2, 256): pixels with value <= v
        at_or_above = np.cumsum(histograms[:, ::-1], axis=1)[:, ::-1]  # (2, 256): pixels with value >= v
        for counts, threshold_offset in ((at_or_above, -0.5), (at_or_below, 0.5)):
            false_positives, true_positives = counts  # (256,) each
            false_negatives = total_ink - true_positives
            # F0.5 = 1.25 P R / (0.25 P + R), written in counts so that empty predictions give 0.
            denominator = 1.25 * true_positives + 0.25 * false_negatives + false_positives
            f05 = np.divide(1.25 * true_positives, denominator, out=np.zeros(256), where=denominator > 0)
            value = int(np.argmax(f05))
            if f05[value] > best[0]:
                best = (float(f05[value]), z, value + threshold_offset)
    return best
