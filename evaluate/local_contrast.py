"""Ink without labels or learning: a map of the local contrast just under the recto surface, for any segment.

    python evaluate/local_contrast.py --segment_id demo
    python evaluate/local_contrast.py --segment_id 20231111135340 --output experiments/priors

Carbon ink barely changes the brightness of the papyrus under it; it changes its texture (the crackle of the
Kaggle and Grand Prize detectors). So a map with no learning at all already sees the demo's ink: each tile is read
with a depth window that follows the recto surface (`pretrain.data.patches.DepthWindow`), the local contrast of the
`--layers` layers just under the surface (`pretrain.spark.local_contrast`: per layer, the root mean square of the
voxels' detail in 5 × 5 windows) is averaged, the tiles are stitched, smoothed (`--smoothing_px`), and scaled to
0–1 by the map's 0.5th and 99.5th percentiles over the mask. It is a starting point where there are no labels: a
prior for fine-tuning's self-training, or a first map for a labeler to correct.

The segment is read one tile at a time, chunk by chunk: memory holds a tile of voxels and the (Y, X) maps, as in
inference, never the volume. Writes to --output `<segment>_local_contrast.png` (uint8, full resolution, 0 outside
the mask), and where the segment has ink labels, `<segment>_local_contrast.json` with the map's AUC and average
precision over the mask (threshold-free: no pixel chooses a threshold), and F0.5 at the mask's own best threshold,
an oracle, labelled as such.
"""
import argparse
import json
import pathlib
import sys
import re

import cv2
import numpy as np
import torch
import tqdm

from evaluate import encoder_input
from evaluate.ink_map import scale_to_unit
from finetune.metrics import average_precision, ink_metrics
from finetune.outputs import write_png_atomic
from pretrain.data.patches import ANY_PAPYRUS, GridTileDataset, InputSettings
from pretrain.data.segment import Segment, open_segment
from pretrain.spark import local_contrast
from pretrain.utils.misc import write_bytes_atomic
from pretrain.utils import errors, ranges


@torch.no_grad()
def contrast_map(segment: Segment, depth: int = 16, tile_size: int = 64, layers: int = 2, smoothing_px: float = 3.0,
                 progress: bool = False) -> np.ndarray:
    """(Y, X) float32: the mean local contrast of the `layers` layers under the recto surface (input layers
    depth // 2 … of a surface-following window of `depth` layers), per tile of `tile_size`, smoothed by a Gaussian
    of `smoothing_px` (0: none); 0 where no tile touches the mask."""
    tiles = GridTileDataset(segment, InputSettings(depth=depth, tile_size=tile_size, follow_surface=True),
                            stride=tile_size, min_mask_fraction=ANY_PAPYRUS)
    contrast_yx = np.zeros(segment.shape[1:], np.float32)
    for index in tqdm.trange(len(tiles), desc="local contrast", unit="tile", disable=not progress):
        item = tiles[index]
        y, x = item["origin"].tolist()
        surface_layers_b1ltt = item["volume"][None, :, depth // 2 : depth // 2 + layers]  # (1, 1, layers, T, T)
        contrast_yx[y : y + tile_size, x : x + tile_size] = local_contrast(surface_layers_b1ltt)[0, 0].mean(dim=0).numpy()
    return cv2.GaussianBlur(contrast_yx, (0, 0), smoothing_px) if smoothing_px > 0 else contrast_yx


def prior_image(contrast_yx: np.ndarray, mask_yx: np.ndarray) -> np.ndarray:
    """(Y, X) uint8: the map scaled to 0–255 by its 0.5th and 99.5th percentiles over the papyrus it covers (the
    mask's rim and the blur's edge make a few outliers), 0 elsewhere."""
    inside_yx = mask_yx & (contrast_yx > 0)
    image_yx = np.zeros(contrast_yx.shape, np.uint8)
    if inside_yx.any():
        image_yx[inside_yx] = np.round(scale_to_unit(contrast_yx[inside_yx]) * 255).astype(np.uint8)
    return image_yx


def file_stem(segment: Segment) -> str:
    """A file-name-safe form of the segment's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", segment.name).strip("_") or "segment"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = errors.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=encoder_input.HelpFormatter)
    encoder_input.add_segment_argument(parser, "segment spec (ID, zarr, layer folder, demo[:seed])")
    parser.add_argument("--depth", type=ranges.ranged(int, ranges.AT_LEAST_1), default=16,
                        help="layers of the surface-following window searched")
    parser.add_argument("--layers", type=int, default=2, help="layers under the surface whose contrast is averaged")
    parser.add_argument("--tile_size", type=ranges.ranged(int, ranges.AT_LEAST_1), default=64,
                        help="tile side in pixels")
    parser.add_argument("--smoothing_px", type=ranges.ranged(float, ranges.AT_LEAST_0), default=3.0,
                        help="Gaussian smoothing of the map (0: none)")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("experiments/local_contrast"),
                        help="folder for the map and its scores")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= args.depth // 2:
        raise encoder_input.EvaluationError(f"--layers {args.layers} must be between 1 and depth // 2 = {args.depth // 2}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    segment = open_segment(args.segment)
    contrast_yx = contrast_map(segment, args.depth, args.tile_size, args.layers, args.smoothing_px, progress=True)
    image_yx = prior_image(contrast_yx, segment.mask)
    path = args.output / f"{file_stem(segment)}_local_contrast.png"
    write_png_atomic(path, image_yx)
    print(f"wrote {path}")
    if segment.inklabels is not None:
        inside_yx = segment.mask & (contrast_yx > 0)
        probabilities, labels = image_yx[inside_yx] / 255.0, segment.inklabels[inside_yx] > 0
        oracle = ink_metrics(probabilities, labels)
        scores = {"segment": segment.name, "auc": oracle.auc, "average_precision": average_precision(probabilities, labels),
                  "f05_oracle": oracle.f05, "threshold_oracle": oracle.threshold, "ink_fraction": oracle.ink_fraction,
                  "pixels": oracle.pixels, "settings": {key: getattr(args, key) for key in
                                                       ("depth", "layers", "tile_size", "smoothing_px")}}
        write_bytes_atomic(path.with_suffix(".json"), json.dumps(scores, indent=1).encode())
        print(f"over the mask: AUC {scores['auc']:.3f}, average precision {scores['average_precision']:.3f}, F0.5 "
              f"{oracle.f05:.3f} at its own best threshold {oracle.threshold:.2f} (an oracle); ink is "
              f"{oracle.ink_fraction:.1%} of the pixels")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
