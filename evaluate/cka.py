"""How similar are two encoders' representations? Linear and RBF CKA across checkpoints.

    python evaluate/cka.py --pretrained_path experiments/spark_demo/epochs/*.pth \
        experiments/vicreg_demo/resnet50_3d_timm_style.pth
    python evaluate/cka.py --pretrained_path a.pth b.pth --stages all --output experiments/cka

Every checkpoint (any kind `pretrain.checkpoint` reads: encoder-only, SparK, VICReg, fine-tuning, Kinetics) goes into
the same encoder and sees one fixed set of tiles of one segment, cut and scaled as the checkpoints record they were
trained (they must agree; `--help` lists the options for files that do not record it); the representation of a stage
is its feature map averaged over (D, H, W) → (N tiles, C). CKA (Kornblith et al. 2019) compares two
such (N, C) matrices X, Y through their centred Gram matrices:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),   HSIC(K, L) = tr(K H L H),  H = I − 11ᵀ/N

with K = XXᵀ (linear) or K_ij = exp(−|x_i − x_j|² / 2σ²) (RBF, σ = `sigma_ratio` × the median distance).
Writes `cka_<kernel>_stage<k>.png` heatmaps and `cka.csv` (one row per pair, kernel and stage).
"""
import argparse
import csv
import io
import pathlib
import sys

import numpy as np
import torch

from evaluate import encoder_input
from pretrain import dist
from pretrain.data.patches import GridTileDataset, InputSettings
from pretrain.data.segment import open_segment
from pretrain.utils.misc import RenamedOption, write_bytes_atomic
from pretrain.utils import errors, ranges


def centred_gram(gram_nn: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/N, written as row and column mean removal."""
    return gram_nn - gram_nn.mean(dim=0, keepdim=True) - gram_nn.mean(dim=1, keepdim=True) + gram_nn.mean()


def rbf_gram(features_nc: torch.Tensor, sigma_ratio: float) -> torch.Tensor:
    # The exact (not matrix-product) distances, and the interpolated median, as numpy takes them.
    squared_distances_nn = torch.cdist(features_nc, features_nc, compute_mode="donot_use_mm_for_euclid_dist").square()
    median_distance = torch.quantile(squared_distances_nn[squared_distances_nn > 0], 0.5).sqrt()
    sigma = sigma_ratio * median_distance
    return torch.exp(-squared_distances_nn / (2 * sigma**2))


def cka(features_a_nc: torch.Tensor, features_b_nc: torch.Tensor, kernel: str = "linear", sigma_ratio: float = 0.5) -> float:
    """CKA between two representations of the same N inputs (float64 for a stable ratio)."""
    features_a_nc, features_b_nc = features_a_nc.double(), features_b_nc.double()
    if kernel == "linear":
        gram_a, gram_b = features_a_nc @ features_a_nc.T, features_b_nc @ features_b_nc.T
    elif kernel == "rbf":
        gram_a, gram_b = rbf_gram(features_a_nc, sigma_ratio), rbf_gram(features_b_nc, sigma_ratio)
    else:
        raise ValueError(f"kernel {kernel!r} is not 'linear' or 'rbf'")
    centred_a, centred_b = centred_gram(gram_a), centred_gram(gram_b)
    hsic_ab = (centred_a * centred_b).sum()  # tr(K H L H) = <HKH, HLH> for symmetric K, L
    return float(hsic_ab / torch.sqrt((centred_a * centred_a).sum() * (centred_b * centred_b).sum()))


@torch.no_grad()
def stage_representations(encoder: torch.nn.Module, tiles_bcdhw: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """Pooled features of every stage: a list of (N, C_k) float32 CPU tensors; runs where the encoder is."""
    encoder.eval()
    device = next(encoder.parameters()).device
    pooled = [[] for _ in encoder.get_feature_map_channels()]
    for start in range(0, len(tiles_bcdhw), batch_size):
        with dist.autocast(device):
            stage_maps = encoder(tiles_bcdhw[start : start + batch_size].to(device), hierarchical=True)
        for stage, feature_bcdhw in enumerate(stage_maps):
            pooled[stage].append(feature_bcdhw.float().mean(dim=(2, 3, 4)).cpu())
    return [torch.cat(stage_features) for stage_features in pooled]


def fixed_tiles(segment_spec: str, settings: InputSettings, count: int, seed: int = 0) -> torch.Tensor:
    """`count` tiles (N, 1, D, T, T) spread over the segment's mask, the same on every call."""
    dataset = GridTileDataset(open_segment(segment_spec), settings, stride=settings.tile_size)
    chosen = np.random.default_rng(seed).permutation(len(dataset))[:count]
    return torch.stack([dataset[int(index)]["volume"] for index in sorted(chosen)])


def heatmap(matrix: np.ndarray, labels: list[str], title: str, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.6 * len(labels)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    for row in range(len(labels)):
        for column in range(len(labels)):
            axes.text(column, row, f"{matrix[row, column]:.2f}", ha="center", va="center",
                      color="white" if matrix[row, column] < 0.6 else "black", fontsize=8)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    write_bytes_atomic(path, image.getvalue())
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = errors.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=encoder_input.HelpFormatter)
    parser.add_argument("--pretrained_path", "--checkpoints", nargs="+", required=True, action=RenamedOption,
                        help="encoder checkpoints to compare (any kind), or 'random' (seed 0); --checkpoints: its "
                             "older name")
    parser.add_argument("--labels", nargs="*", help="names for the checkpoints (default: file names)")
    encoder_input.add_segment_argument(parser, "segment spec (ID, zarr, layer folder, demo[:seed])")
    encoder_input.add_input_arguments(parser)
    parser.add_argument("--tiles", type=ranges.ranged(int, ranges.AT_LEAST_1), default=128,
                        help="number of fixed tiles the representations are taken on")
    parser.add_argument("--stages", default="4", choices=["4", "all"], help="the last stage, or all")
    parser.add_argument("--sigma_ratio", type=ranges.ranged(float, ranges.ABOVE_0), default=0.5,
                        help="RBF width, as a fraction of the median distance")
    parser.add_argument("--output", default="experiments/cka", help="folder for the heatmaps and cka.csv")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    labels = args.labels or [pathlib.Path(path).stem for path in args.pretrained_path]
    if len(labels) != len(args.pretrained_path):
        raise encoder_input.EvaluationError(f"{len(labels)} labels for {len(args.pretrained_path)} checkpoints")

    # The same tiles for every checkpoint, each scaled as its encoder was trained (VICReg's standardised, say).
    settings_by_checkpoint = encoder_input.same_tiles_settings(args.pretrained_path, args)
    device = encoder_input.device()
    tiles_by_settings = {}
    representations = []
    for path, settings in zip(args.pretrained_path, settings_by_checkpoint):
        if settings not in tiles_by_settings:
            tiles_by_settings[settings] = fixed_tiles(args.segment, settings, args.tiles)
        tiles = tiles_by_settings[settings]
        encoder, description = encoder_input.load_encoder(path, settings, device, seed=0)
        print(f"{labels[len(representations)]}: {description}; input {settings.describe()}; on {device}")
        representations.append(stage_representations(encoder, tiles))
    stages = range(len(representations[0])) if args.stages == "all" else [len(representations[0]) - 1]

    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage in stages:
        for kernel in ("linear", "rbf"):
            matrix = np.eye(len(labels))
            for i in range(len(labels)):
                for j in range(i + 1, len(labels)):
                    matrix[i, j] = matrix[j, i] = cka(representations[i][stage], representations[j][stage], kernel,
                                                      args.sigma_ratio)
                    rows.append({"stage": stage + 1, "kernel": kernel, "a": labels[i], "b": labels[j], "cka": matrix[i, j]})
            heatmap(matrix, labels, f"{kernel} CKA, stage {stage + 1} ({len(tiles)} tiles)",
                    output / f"cka_{kernel}_stage{stage + 1}.png")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["stage", "kernel", "a", "b", "cka"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(output / "cka.csv", table.getvalue().encode())
    print(f"wrote {len(rows)} pairs to {output / 'cka.csv'} and heatmaps beside it")
    return 0


if __name__ == "__main__":
    errors.install(__file__)
    sys.exit(main())
