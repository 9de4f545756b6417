"""Whole-segment ink prediction: a sliding window with Gaussian-weighted blending and optional TTA.

Tiles stream from the segment reader through a DataLoader; only two (Y, X) float32 accumulators
(weighted probabilities and weights) live in memory, never the volume. The tile grid is the stride
grid from 0 plus one edge-aligned row and column, so the right and bottom edges are always covered.
Tiles are weighted by a Gaussian that peaks at their centre (as the Grand Prize inference), because
a fully convolutional network sees least context, and so is least reliable, near a tile's border.
Under torchrun each process predicts every world_size-th tile and the accumulators are summed.
"""
import numpy as np
import torch

from pretrain import dist
from pretrain.data.segment import Segment
from finetune.data import tile_dataset

GAUSSIAN_SIGMA_FRACTION = 0.125  # of the tile side, as nnU-Net; flat enough that overlaps blend smoothly
MIN_WEIGHT = 1e-3  # of the centre weight: a pixel that only a tile's border covers still gets predicted


def grid_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Tile starts 0, stride, 2·stride, ... and, if those stop short of the end, one ending exactly there."""
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def covering_origins(region_yx: np.ndarray, tile_size: int, stride: int) -> np.ndarray:
    """(N, 2) (y, x) origins of the tiles that hold at least one pixel of the region, edges included."""
    height, width = region_yx.shape
    integral = np.pad(region_yx.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # (Y + 1, X + 1)
    y0, x0 = np.meshgrid(grid_starts(height, tile_size, stride), grid_starts(width, tile_size, stride), indexing="ij")
    y1, x1 = y0 + tile_size, x0 + tile_size
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    keep = inside > 0
    return np.stack([y0[keep], x0[keep]], axis=1).astype(np.int64)


def gaussian_weights(tile_size: int) -> np.ndarray:
    """(T, T) float32 blending weights, 1 at the centre."""
    coordinates = np.arange(tile_size, dtype=np.float64) - (tile_size - 1) / 2
    profile = np.exp(-0.5 * (coordinates / (GAUSSIAN_SIGMA_FRACTION * tile_size)) ** 2)
    return np.maximum(np.outer(profile, profile), MIN_WEIGHT).astype(np.float32)


def tta_probabilities(model: torch.nn.Module, volume_b1dhw: torch.Tensor, tta: bool) -> torch.Tensor:
    """(B, H, W) ink probabilities, averaged over flips and a rot90 when `tta`; each view is undone
    on the output before averaging."""
    if not tta:
        return torch.sigmoid(model(volume_b1dhw).float())[:, 0]
    views = [  # (forward on (..., H, W), inverse on (..., H, W))
        (lambda t: t, lambda t: t),
        (lambda t: t.flip(-1), lambda t: t.flip(-1)),
        (lambda t: t.flip(-2), lambda t: t.flip(-2)),
        (lambda t: t.rot90(1, dims=(-2, -1)), lambda t: t.rot90(-1, dims=(-2, -1))),
    ]
    total = 0.0
    for forward, inverse in views:
        total = total + inverse(torch.sigmoid(model(forward(volume_b1dhw)).float()))[:, 0]
    return total / len(views)


@torch.no_grad()
def predict_segment(model: torch.nn.Module, segment: Segment, region_yx: np.ndarray, depth: int, depth_offset: int,
                    tile_size: int, stride: int, normalization: str, batch_size: int, device: torch.device,
                    tta: bool = False, num_workers: int = 0) -> np.ndarray:
    """(Y, X) float32 ink probability over the region (zero elsewhere) of the whole segment."""
    model.eval()
    origins = covering_origins(region_yx, tile_size, stride)[dist.rank()::dist.world_size()]
    dataset = tile_dataset(segment, origins, depth, depth_offset, tile_size, normalization)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    weights_tt = gaussian_weights(tile_size)
    weighted_sum_yx = np.zeros(region_yx.shape, np.float32)
    weight_sum_yx = np.zeros(region_yx.shape, np.float32)
    use_autocast = device.type == "cuda"  # bf16 is many times slower than fp32 on CPU
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            probabilities_btt = tta_probabilities(model, batch["volume"].to(device, non_blocking=True), tta)
        for (y, x), probabilities_tt in zip(batch["origin"].tolist(), probabilities_btt.cpu().numpy()):
            weighted_sum_yx[y:y + tile_size, x:x + tile_size] += weights_tt * probabilities_tt
            weight_sum_yx[y:y + tile_size, x:x + tile_size] += weights_tt
    if dist.is_distributed():
        for accumulator in (weighted_sum_yx, weight_sum_yx):
            tensor = torch.from_numpy(accumulator).to(device)
            torch.distributed.all_reduce(tensor)
            accumulator[:] = tensor.cpu().numpy()
    # In place: a real segment's (Y, X) maps are hundreds of MB each. Uncovered pixels stay 0.
    probabilities_yx = np.divide(weighted_sum_yx, weight_sum_yx, out=weighted_sum_yx, where=weight_sum_yx > 0)
    probabilities_yx[~region_yx] = 0.0
    return probabilities_yx
