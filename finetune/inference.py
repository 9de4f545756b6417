"""Whole-segment ink prediction: a sliding window with Gaussian-weighted blending and optional TTA.

Tiles stream from the segment reader through a DataLoader in row-major order, and only the band of rows
the current row of tiles covers is accumulated: two (tile_size, X) float32 sums. Finished rows go to the
output array, which may be a zarr array on disk, so neither the volume nor the map need be in RAM. The tile
grid is the stride grid from 0 plus one edge-aligned row and column, so the right and bottom edges are
always covered. Tiles are weighted by a Gaussian that peaks at their centre (as the Grand Prize inference),
because a fully convolutional network sees least context, and so is least reliable, near a tile's border.
Under torchrun each process predicts every world_size-th tile and each finished band is summed over them.
"""
import numpy as np
import torch

from finetune.data import tile_dataset
from pretrain import dist
from pretrain.data.patches import InputSettings
from pretrain.data.segment import Segment

GAUSSIAN_SIGMA_FRACTION = 0.125  # of the tile side, as nnU-Net; flat enough that overlaps blend smoothly
MIN_WEIGHT = 1e-3  # of the centre weight: a pixel that only a tile's border covers still gets predicted


def grid_starts(length: int, tile_size: int, stride: int) -> list[int]:
    """Tile starts 0, stride, 2·stride, ... and, if those stop short of the end, one ending exactly there."""
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] + tile_size < length:
        starts.append(length - tile_size)
    return starts


def covering_origins(region_yx: np.ndarray, tile_size: int, stride: int) -> np.ndarray:
    """(N, 2) (y, x) origins of the tiles that hold at least one pixel of the region, edges included, row-major.

    One row of tiles at a time: a whole-segment integral image would take 8 bytes per pixel (1 GiB at 8192²)."""
    x_starts = np.array(grid_starts(region_yx.shape[1], tile_size, stride))
    origins = []
    for y in grid_starts(region_yx.shape[0], tile_size, stride):
        columns_x = region_yx[y:y + tile_size].any(axis=0)  # (X,): does the tile row hold region in this column
        counts = np.concatenate([[0], np.cumsum(columns_x)])  # (X + 1,)
        inside = counts[x_starts + tile_size] > counts[x_starts]
        origins += [(y, x) for x in x_starts[inside]]
    return np.array(origins, np.int64).reshape(-1, 2)


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


class RowBand:
    """The rows the current row of tiles covers: (tile_size, X) float32 weighted-probability and weight sums.

    Tiles arrive in row-major order, so once the tiles move down to row `next_top`, the rows above it get no
    more contributions: they are final and go to the output. Everything else is never held, so memory is
    2 × tile_size × X floats however tall the segment."""

    def __init__(self, region_yx: np.ndarray, output_yx, tile_size: int, device: torch.device):
        self.region_yx, self.output_yx, self.tile_size, self.device = region_yx, output_yx, tile_size, device
        self.top = 0  # segment row of the band's first row
        self.weighted_sum_tx = np.zeros((tile_size, region_yx.shape[1]), np.float32)
        self.weight_sum_tx = np.zeros_like(self.weighted_sum_tx)

    def add(self, y: int, x: int, weighted_tt: np.ndarray, weights_tt: np.ndarray) -> None:
        rows = slice(y - self.top, y - self.top + self.tile_size)
        self.weighted_sum_tx[rows, x:x + self.tile_size] += weighted_tt
        self.weight_sum_tx[rows, x:x + self.tile_size] += weights_tt

    def move_to(self, next_top: int) -> None:
        """Write rows top … next_top − 1 to the output (summed over processes first) and start the band at next_top."""
        finished = min(next_top, self.region_yx.shape[0]) - self.top
        covered = min(finished, self.tile_size)  # rows below the band, if any, no tile touches
        weighted_sum, weight_sum = self.weighted_sum_tx[:covered], self.weight_sum_tx[:covered]
        if dist.is_distributed():  # every process calls this for the same rows in the same order
            for accumulator in (weighted_sum, weight_sum):
                tensor = torch.from_numpy(np.ascontiguousarray(accumulator)).to(self.device)
                torch.distributed.all_reduce(tensor)
                accumulator[:] = tensor.cpu().numpy()
        rows_yx = np.zeros((finished, self.region_yx.shape[1]), np.float32)  # uncovered pixels stay 0
        np.divide(weighted_sum, weight_sum, out=rows_yx[:covered], where=weight_sum > 0)
        rows_yx[~self.region_yx[self.top:self.top + finished]] = 0.0
        self.output_yx[self.top:self.top + finished] = rows_yx
        kept = max(self.tile_size - finished, 0)  # rows the next row of tiles also covers
        for accumulator in (self.weighted_sum_tx, self.weight_sum_tx):
            accumulator[:kept] = accumulator[self.tile_size - kept:]
            accumulator[kept:] = 0.0
        self.top = next_top


@torch.no_grad()
def predict_segment(model: torch.nn.Module, segment: Segment, region_yx: np.ndarray, settings: InputSettings,
                    stride: int, batch_size: int, device: torch.device, tta: bool = False, num_workers: int = 0,
                    output_yx=None):
    """(Y, X) float32 ink probability over the region (zero elsewhere) of the whole segment, from tiles cut and
    scaled as `settings` says.

    Written row band by row band into `output_yx`: any (Y, X) array that takes slice assignment, such as a
    zarr array on disk for a segment whose map should not be held in RAM; by default a new numpy array.
    Returns `output_yx`."""
    tile_size = settings.tile_size
    if stride > tile_size:
        raise ValueError(f"stride {stride} is larger than the tile side {tile_size}: the pixels between tiles would "
                         "stay unpredicted")
    model.eval()
    if output_yx is None:
        output_yx = np.zeros(region_yx.shape, np.float32)
    all_origins = covering_origins(region_yx, tile_size, stride)  # (N, 2), row-major
    origins = all_origins[dist.rank()::dist.world_size()]
    dataset = tile_dataset(segment, origins, settings)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    # Every process walks the same tile rows, even those where it has no tile, so the sums stay in step.
    tile_rows = iter([*np.unique(all_origins[:, 0]).tolist(), region_yx.shape[0]])
    band = RowBand(region_yx, output_yx, tile_size, device)
    band.move_to(next(tile_rows))  # rows above the first tile
    weights_tt = gaussian_weights(tile_size)
    for batch in loader:
        with dist.autocast(device):
            probabilities_btt = tta_probabilities(model, batch["volume"].to(device, non_blocking=True), tta)
        for (y, x), probabilities_tt in zip(batch["origin"].tolist(), probabilities_btt.cpu().numpy()):
            while band.top < y:
                band.move_to(next(tile_rows))
            band.add(y, x, weights_tt * probabilities_tt, weights_tt)
    for next_top in tile_rows:
        band.move_to(next_top)
    return output_yx
