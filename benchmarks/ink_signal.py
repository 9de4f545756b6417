"""How much of what SparK reconstructs is ink? The ink's share of the masked-cell loss's target.

    python benchmarks/ink_signal.py                  # 400 pretraining crops of the demo segment (about a minute)
    python benchmarks/ink_signal.py --samples 1000

The demo generator is deterministic, so the demo segment built with contrast 1 and with contrast 0 (no
ink at all) differ only by the ink. The same pretraining crops (`RandomPatchDataset`, default settings) are
read from both, each target (SparK's voxels, or their local contrast) is split into SparK's cells and
normalised with the inked crop's per-cell mean and std, as the loss does; the ink's share is the mean
square of the normalised difference, i.e. the part of a perfect reconstruction's target variance that
ink accounts for. Reported over all papyrus cells and over the cells that hold ink; for the centred
depth window and the surface-following one. Writes benchmarks/results/ink_signal.json and prints a
Markdown table.

For scale, it also scores a hand-made ink map, no learning at all: the local contrast of the two layers
under the surface (surface-following window), smoothed, taken as the ink probability over the whole mask.
"""
import argparse
import json
import pathlib
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

import torch

from evaluate.ink_map import FINE_THRESHOLDS, scale_to_unit
from evaluate.local_contrast import contrast_map
from finetune.metrics import ink_metrics
from pretrain.data.demo import build_demo_segment
from pretrain.data.patches import InputSettings, RandomPatchDataset
from pretrain.data.segment import open_segment
from pretrain.spark import cell_statistics, local_contrast, split_into_cells
from pretrain.utils import errors

CELL_SIZE = (8, 32, 32)  # the 3D ResNet's downsample ratio: one SparK cell
INK_VOXEL_DIFFERENCE = 1.0 / 255  # a cell "holds ink" where some voxel moved by more than one grey level
PAPYRUS_CELL_STD = 4.0 / 255  # cells flatter than this are outside the mask (black)


def ink_shares(inked_segment, plain_segment, follow_surface: bool, samples: int, seed: int) -> dict:
    settings = InputSettings(depth=16, tile_size=96, follow_surface=follow_surface)
    crops = {name: RandomPatchDataset([segment], settings, samples_per_epoch=samples, seed=seed)
             for name, segment in (("inked", inked_segment), ("plain", plain_segment))}
    totals = {target: {"all": [], "ink": []} for target in ("pixels", "texture")}
    for index in range(samples):
        inked_bcdhw, plain_bcdhw = crops["inked"][0, index][None], crops["plain"][0, index][None]  # (1, 1, 16, 96, 96)
        voxel_cells = split_into_cells(inked_bcdhw, CELL_SIZE)[0]  # (L, N)
        papyrus = voxel_cells.std(dim=-1) > PAPYRUS_CELL_STD  # (L,)
        holds_ink = (split_into_cells(inked_bcdhw - plain_bcdhw, CELL_SIZE)[0].abs().amax(dim=-1)
                     > INK_VOXEL_DIFFERENCE)
        for target, transform in (("pixels", lambda volume: volume), ("texture", local_contrast)):
            inked_cells = split_into_cells(transform(inked_bcdhw), CELL_SIZE)[0]
            plain_cells = split_into_cells(transform(plain_bcdhw), CELL_SIZE)[0]
            _, std = cell_statistics(inked_cells)
            difference = inked_cells - plain_cells
            # The per-cell mean is removed by the normalisation, so only the rest of the ink's change counts.
            share_per_cell = ((difference - difference.mean(dim=-1, keepdim=True)) / std).pow(2).mean(dim=-1)
            totals[target]["all"].append(share_per_cell[papyrus])
            totals[target]["ink"].append(share_per_cell[papyrus & holds_ink])
    return {target: {cells: float(torch.cat(values).mean()) for cells, values in groups.items()}
            for target, groups in totals.items()}


def surface_contrast_map(segment) -> dict:
    """F0.5 and AUC over the mask of the hand-made map (evaluate/local_contrast.py's): mean local contrast of the
    two layers under the surface, smoothed."""
    contrast_yx = contrast_map(segment)
    inside = segment.mask & (contrast_yx > 0)
    # Scaled by percentiles: the mask's rim and the blur's edge make a few outliers.
    metrics = ink_metrics(scale_to_unit(contrast_yx[inside]), segment.inklabels[inside] > 0, FINE_THRESHOLDS)
    return {"f05": metrics.f05, "auc": metrics.auc}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0, help="the demo segment's seed (and the crops')")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        segments = {}
        for contrast in (1.0, 0.0):
            path = pathlib.Path(folder) / f"demo_contrast{contrast:g}.zarr"
            print(f"building the demo segment (seed {args.seed}) with ink contrast {contrast:g} …", flush=True)
            build_demo_segment(path, seed=args.seed, contrast=contrast)
            segments[contrast] = open_segment(str(path))
        results = {window: ink_shares(segments[1.0], segments[0.0], window == "surface", args.samples, args.seed)
                   for window in ("centred", "surface")}
        hand_made = surface_contrast_map(segments[1.0])
    rows = ["| depth window | target | ink's share, all papyrus cells | ink's share, cells holding ink |",
            "|---|---|---|---|"]
    for window, targets in results.items():
        for target, shares in targets.items():
            rows.append(f"| {window} | {target} | {shares['all']:.2%} | {shares['ink']:.2%} |")
    print("\n".join(rows))
    print(f"\nhand-made map (local contrast under the surface, smoothed): F0.5 {hand_made['f05']:.3f}, "
          f"AUC {hand_made['auc']:.3f} over the whole mask")
    output = REPO_ROOT / "benchmarks" / "results" / "ink_signal.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps({"samples": args.samples, "seed": args.seed, "cell_size": CELL_SIZE, "shares": results,
                                  "hand_made_map": hand_made}, indent=1))
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
