"""Ink without labels: PCA and k-means maps of a frozen encoder's features over a whole segment.

    python evaluate/ink_map.py --pretrained_path experiments/spark_demo/resnet50_3d_timm_style.pth
    python evaluate/ink_map.py --pretrained_path random --model resnet50_3d_narrow --output experiments/ink_map/random

The encoder reads tiles as its checkpoint records it was trained (model, depth window, normalisation, tile size);
`--help` lists the options that override them. It runs on the GPU where there is one.

Tiles cover the segment's mask without overlap and stream from the segment reader. One stage's features
(`--stage`, 1 = stride 4) are max-pooled over depth, so every pixel of that stage's grid gets a C-vector.
PCA is fitted on a sample of mask pixels; k-means runs on the leading components. Neither sees a label.
Only afterwards are the maps scored against the ink labels, at the feature grid's resolution:
- for each principal component, both signs, F0.5 (best threshold) and AUC;
- for each k-means cluster, taken as "ink", F0.5 and AUC.
The best of each is reported: how far "ink without labels" has come for this encoder.
For comparison it also fits a linear probe (logistic regression on the same features, one per pixel) on
the papyrus outside the fine-tuning probe's held-out band and scores it inside: a few labels, read
linearly, in seconds instead of a probe's minutes.
Writes `pca_rgb.png` (components 1–3 as colours), `pca_best.png`, `kmeans.png` and `ink_map.json`.
"""
import argparse
import dataclasses
import json
import pathlib
import sys

import cv2
import numpy as np
import sklearn.cluster
import sklearn.decomposition
import sklearn.linear_model
import torch
import tqdm

from evaluate import encoder_input
from finetune.data import choose_validation_box
from finetune.metrics import ink_metrics
from finetune.outputs import write_png_atomic
from pretrain import dist
from pretrain.data.patches import SOME_PAPYRUS, GridTileDataset, InputSettings
from pretrain.data.segment import SegmentError, open_segment
from pretrain.utils.misc import RenamedOption, write_bytes_atomic
from pretrain.utils import errors, ranges

FINE_THRESHOLDS = tuple(np.round(np.linspace(0.01, 0.99, 99), 2))
PCA_FIT_PIXELS = 200_000
PROBE_FIT_PIXELS = 60_000


def stage_stride(encoder: torch.nn.Module, stage: int) -> int:
    """Pixels per feature of `stage` (1 … number of stages), from the encoder's contract."""
    stages = len(encoder.get_feature_map_channels())
    return encoder.get_downsample_ratio()[1] // 2 ** (stages - stage)


@torch.no_grad()
def feature_grid(encoder, segment, stage: int, settings: InputSettings, device: torch.device, batch_size: int = 4):
    """Depth-max-pooled features of `stage` on its grid: (C, Y/f, X/f) float32, the grid's mask, and f.

    Features near a tile's border see the zero padding and differ from those inside (PCA then draws the
    tile grid), so tiles overlap by half and each contributes only its central half.
    """
    tile_size, factor = settings.tile_size, stage_stride(encoder, stage)
    dataset = GridTileDataset(segment, settings, stride=tile_size // 2, min_mask_fraction=SOME_PAPYRUS)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    height, width = segment.shape[1] // factor, segment.shape[2] // factor
    features = None
    margin = tile_size // factor // 4
    for batch in tqdm.tqdm(loader, desc="encoding tiles", unit="batch"):
        with dist.autocast(device):
            stage_bcdhw = encoder(batch["volume"].to(device), hierarchical=True)[stage - 1]
        pooled_bchw = stage_bcdhw.amax(dim=2).float().cpu()  # depth collapsed as the fine-tuning UNet does
        if features is None:
            features = np.zeros((pooled_bchw.shape[1], height, width), np.float32)
        for tile_features, (y, x) in zip(pooled_bchw.numpy(), batch["origin"].tolist()):
            grid_y, grid_x = y // factor + margin, x // factor + margin
            centre = tile_features[:, margin:-margin, margin:-margin]
            features[:, grid_y : grid_y + centre.shape[1], grid_x : grid_x + centre.shape[2]] = centre
    grid_mask = cv2.resize(segment.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_AREA) > 0
    covered = np.abs(features).sum(axis=0) > 0
    return features, grid_mask & covered, factor


def linear_probe(features_chw: np.ndarray, labels_hw: np.ndarray, grid_mask_hw: np.ndarray, held_out_hw: np.ndarray,
                 seed: int) -> dict:
    """Logistic regression from each grid pixel's features to its label, fitted outside `held_out_hw`
    and scored (F0.5 at the best threshold, AUC) inside it."""
    pixels_nc = features_chw.reshape(len(features_chw), -1).T  # (H·W, C)
    train = np.flatnonzero((grid_mask_hw & ~held_out_hw).ravel())
    held_out = np.flatnonzero((grid_mask_hw & held_out_hw).ravel())
    train = np.random.default_rng(seed).choice(train, min(len(train), PROBE_FIT_PIXELS), replace=False)
    mean, std = pixels_nc[train].mean(axis=0), pixels_nc[train].std(axis=0) + 1e-6
    labels_n = labels_hw.ravel().astype(np.uint8)
    probe = sklearn.linear_model.LogisticRegression(C=0.1, max_iter=500)
    probe.fit((pixels_nc[train] - mean) / std, labels_n[train])
    probabilities = probe.predict_proba((pixels_nc[held_out] - mean) / std)[:, 1]
    metrics = ink_metrics(probabilities, labels_n[held_out], FINE_THRESHOLDS)
    return {"f05": metrics.f05, "auc": metrics.auc, "threshold": metrics.threshold,
            "fit_pixels": len(train), "held_out_pixels": len(held_out)}


def scale_to_unit(values: np.ndarray) -> np.ndarray:
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / (high - low + 1e-12), 0, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = errors.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=encoder_input.HelpFormatter)
    parser.add_argument("--pretrained_path", "--checkpoint", required=True, action=RenamedOption,
                        help="encoder checkpoint (any kind), or 'random' (--checkpoint: its older name)")
    encoder_input.add_segment_argument(parser, "segment spec (ID, zarr, layer folder, demo[:seed])")
    encoder_input.add_input_arguments(parser)
    parser.add_argument("--stage", type=int, default=1, choices=[1, 2, 3, 4], help="1: stride 4 … 4: stride 32")
    parser.add_argument("--components", type=ranges.ranged(int, ranges.AT_LEAST_1), default=8,
                        help="principal components scored (k-means uses them)")
    parser.add_argument("--clusters", type=ranges.ranged(int, ranges.AT_LEAST_1), default=4, help="k of k-means")
    parser.add_argument("--seed", type=ranges.ranged(int, ranges.AT_LEAST_0), default=0,
                        help="random encoder, PCA, k-means and probe sampling")
    parser.add_argument("--probe_tile_size", type=ranges.ranged(int, ranges.AT_LEAST_1), default=64,
                        help="with --probe_fraction, the held-out band as finetune/train.py chooses it (its TILE_SIZE)")
    parser.add_argument("--probe_fraction", type=ranges.ranged(float, ranges.FRACTION_INSIDE), default=0.2,
                        help="finetune/train.py's VALIDATION_FRACTION")
    parser.add_argument("--output", default="experiments/ink_map", help="folder for the maps and ink_map.json")
    return parser.parse_args(argv)


def unsupervised_maps(pixels_nc: np.ndarray, labels_n: np.ndarray, components: int, clusters: int, seed: int) -> dict:
    """PCA of the features and k-means on its components, fitted without labels, then scored against them:
    every component (both signs) and every cluster taken as "ink"."""
    rng = np.random.default_rng(seed)
    fit_rows = rng.choice(len(pixels_nc), min(len(pixels_nc), PCA_FIT_PIXELS), replace=False)
    pca = sklearn.decomposition.PCA(n_components=components, random_state=seed).fit(pixels_nc[fit_rows])
    components_nk = pca.transform(pixels_nc)
    component_scores = []
    for component in range(components):
        for sign in (1, -1):
            metrics = ink_metrics(scale_to_unit(sign * components_nk[:, component]), labels_n, FINE_THRESHOLDS)
            component_scores.append({"component": component + 1, "sign": sign, "f05": metrics.f05, "auc": metrics.auc,
                                     "threshold": metrics.threshold})
    clusters_n = sklearn.cluster.KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit_predict(components_nk)
    cluster_scores = []
    for cluster in range(clusters):
        members = (clusters_n == cluster).astype(np.float32)
        metrics = ink_metrics(members, labels_n, (0.5,))
        cluster_scores.append({"cluster": cluster, "fraction": float(members.mean()), "f05": metrics.f05, "auc": metrics.auc})
    return {"components_nk": components_nk, "clusters_n": clusters_n,
            "explained_variance": pca.explained_variance_ratio_.tolist(), "components": component_scores,
            "clusters": cluster_scores, "best_component": max(component_scores, key=lambda score: score["f05"]),
            "best_cluster": max(cluster_scores, key=lambda score: score["f05"])}


def write_maps(output: pathlib.Path, maps: dict, grid_mask_hw: np.ndarray, factor: int) -> None:
    """pca_rgb.png (components 1-3 as colours), pca_best.png and kmeans.png, at the segment's resolution."""
    height, width = grid_mask_hw.shape
    components_nk = maps["components_nk"]

    def grid_image(values_n: np.ndarray, channels: int = 1) -> np.ndarray:
        image = np.zeros((height, width, channels), np.uint8)
        image[grid_mask_hw] = (values_n.reshape(len(values_n), channels) * 255).astype(np.uint8)
        return cv2.resize(image, (width * factor, height * factor), interpolation=cv2.INTER_NEAREST)

    rgb = np.stack([scale_to_unit(components_nk[:, index]) for index in range(min(3, components_nk.shape[1]))], axis=1)
    write_png_atomic(output / "pca_rgb.png", grid_image(rgb, rgb.shape[1])[..., ::-1])
    best = maps["best_component"]
    write_png_atomic(output / "pca_best.png", grid_image(scale_to_unit(best["sign"] * components_nk[:, best["component"] - 1])))
    palette = np.array([[230, 159, 0], [86, 180, 233], [0, 158, 115], [240, 228, 66], [0, 114, 178], [213, 94, 0],
                        [204, 121, 167], [128, 128, 128]], np.float32) / 255
    write_png_atomic(output / "kmeans.png", grid_image(palette[maps["clusters_n"] % len(palette)], 3)[..., ::-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = encoder_input.common_settings([args.pretrained_path], args)
    device = encoder_input.device()
    encoder, description = encoder_input.load_encoder(args.pretrained_path, settings, device, args.seed)
    stride = stage_stride(encoder, args.stage)
    if settings.tile_size // stride < 4:
        raise encoder_input.EvaluationError(
            f"--stage {args.stage} has one feature per {stride} pixels: a {settings.tile_size}-pixel tile gives too few "
            f"to keep the central half of each; use --tile_size {4 * stride} or more, or a finer stage")
    segment = open_segment(args.segment)
    if segment.inklabels is None:
        raise SegmentError(f"segment {segment.name} has no ink labels to score the maps against")
    print(f"encoder: {description}; input {settings.describe()}; on {device}")
    features_chw, grid_mask_hw, factor = feature_grid(encoder, segment, args.stage, settings, device)
    height, width = grid_mask_hw.shape
    labels_hw = cv2.resize(segment.inklabels.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) >= 0.5
    labels_n = labels_hw[grid_mask_hw].astype(np.uint8)
    maps = unsupervised_maps(features_chw[:, grid_mask_hw].T, labels_n, args.components, args.clusters, args.seed)

    box = choose_validation_box(segment.mask, segment.inklabels, args.probe_tile_size, args.probe_fraction)
    held_out_hw = np.zeros_like(grid_mask_hw)
    held_out_hw[box.y0 // factor : box.y1 // factor, box.x0 // factor : box.x1 // factor] = True
    probe = linear_probe(features_chw, labels_hw, grid_mask_hw, held_out_hw, args.seed)

    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_maps(output, maps, grid_mask_hw, factor)
    best_component, best_cluster = maps["best_component"], maps["best_cluster"]
    result = {"pretrained_path": args.pretrained_path, "encoder": description, "input": settings.as_dict(),
              "stage": args.stage, "segment": segment.name, "grid_factor": factor, "ink_fraction": float(labels_n.mean()),
              **{key: maps[key] for key in ("explained_variance", "best_component", "best_cluster", "components", "clusters")},
              "linear_probe": {**probe, "held_out_box": dataclasses.asdict(box)}}
    write_bytes_atomic(output / "ink_map.json", json.dumps(result, indent=1).encode())
    print(f"best principal component {best_component['component']} (sign {best_component['sign']:+d}): "
          f"F0.5 {best_component['f05']:.3f}, AUC {best_component['auc']:.3f}; best k-means cluster "
          f"{best_cluster['cluster']}: F0.5 {best_cluster['f05']:.3f}, AUC {best_cluster['auc']:.3f}; "
          f"linear probe on the held-out band: F0.5 {probe['f05']:.3f}, AUC {probe['auc']:.3f}; "
          f"ink is {labels_n.mean():.1%} of mask pixels. Maps in {output}")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
