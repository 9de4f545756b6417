"""How similar are two encoders' representations? Linear and RBF CKA across checkpoints.

    python evaluate/cka.py --checkpoints experiments/spark_demo/epochs/*.pth experiments/vicreg_demo/resnet50_3d_timm_style.pth
    python evaluate/cka.py --checkpoints a.pth b.pth --stages all --output notes/cka

Every checkpoint (any kind `pretrain.models.weights` reads: encoder-only, SparK, VICReg, Kinetics) goes into
the same encoder (`--model`) and sees one fixed set of tiles of one segment; the representation of a stage
is its feature map averaged over (D, H, W) → (N tiles, C). CKA (Kornblith et al. 2019) compares two
such (N, C) matrices X, Y through their centred Gram matrices:

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),   HSIC(K, L) = tr(K H L H),  H = I − 11ᵀ/N

with K = XXᵀ (linear) or K_ij = exp(−|x_i − x_j|² / 2σ²) (RBF, σ = `sigma_ratio` × the median distance).
Writes `cka_<kernel>_stage<k>.png` heatmaps and `cka.csv` (one row per pair, kernel and stage).
"""
import argparse
import csv
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluate.ink_map import load_encoder  # noqa: E402
from pretrain.data.patches import GridTileDataset  # noqa: E402
from pretrain.data.segment import SegmentError, open_segment  # noqa: E402
from pretrain.utils.misc import CheckpointError  # noqa: E402


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
    """Pooled features of every stage: a list of (N, C_k) tensors."""
    encoder.eval()
    pooled = [[] for _ in encoder.get_feature_map_channels()]
    for start in range(0, len(tiles_bcdhw), batch_size):
        for stage, feature_bcdhw in enumerate(encoder(tiles_bcdhw[start : start + batch_size], hierarchical=True)):
            pooled[stage].append(feature_bcdhw.mean(dim=(2, 3, 4)))
    return [torch.cat(stage_features) for stage_features in pooled]


def fixed_tiles(segment_spec: str, depth: int, tile_size: int, count: int, seed: int = 0,
                follow_surface: bool = False) -> torch.Tensor:
    """`count` tiles (N, 1, D, T, T) spread over the segment's mask, the same on every call."""
    dataset = GridTileDataset(open_segment(segment_spec), depth=depth, tile_size=tile_size, stride=tile_size,
                              follow_surface=follow_surface)
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
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True,
                        help="encoder checkpoints to compare (any kind), or 'random' (seed 0)")
    parser.add_argument("--labels", nargs="*", help="names for the checkpoints (default: file names)")
    parser.add_argument("--model", default="resnet50_3d")
    parser.add_argument("--segment", default="demo")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--tile_size", type=int, default=96)
    parser.add_argument("--follow_surface", action="store_true", help="depth window along the recto surface (as pretraining)")
    parser.add_argument("--tiles", type=int, default=128, help="number of fixed tiles the representations are taken on")
    parser.add_argument("--stages", default="4", help="'4' (last stage) or 'all'")
    parser.add_argument("--sigma_ratio", type=float, default=0.5)
    parser.add_argument("--output", default="notes/cka")
    args = parser.parse_args(argv)
    labels = args.labels or [pathlib.Path(path).stem for path in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        raise SegmentError(f"{len(labels)} labels for {len(args.checkpoints)} checkpoints")

    tiles = fixed_tiles(args.segment, args.depth, args.tile_size, args.tiles, follow_surface=args.follow_surface)
    representations = []
    for path in args.checkpoints:
        encoder, description = load_encoder(args.model, path, seed=0)
        print(f"{labels[len(representations)]}: {description}")
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
    with open(output / "cka.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["stage", "kernel", "a", "b", "cka"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} pairs to {output / 'cka.csv'} and heatmaps beside it")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SegmentError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
