"""Fine-tuning data: label files, the train / validation split, tile datasets and augmentation.

Tiles come from the segment reader through `pretrain.data.patches.GridTileDataset`; this module only
decides *which* tiles (the split) and *what happens to them* (augmentation).

The split. Scheme "validation" holds out one contiguous band of the segment that holds both ink
and no-ink, and no training tile touches it: ScrollMAE's early evaluation leaked because its
validation crops overlapped training crops. Scheme "iterative" trains on every tile that holds
labelled ink and has no held-out set: its test is a person looking at the prediction.

Several segments. Their training tiles form one dataset (`TrainingTiles`), and `SegmentMixSampler` draws each
epoch from it so that each segment gives its share of the tiles: in proportion to its labelled area, or equally.
"""
import dataclasses
import math
import pathlib
import random

import albumentations
import cv2
import numpy as np
import torch

from pretrain.data.images import decode_image, image_header
from pretrain.data.patches import ANY_PAPYRUS, MOSTLY_PAPYRUS, GridTileDataset, InputSettings, depth_window, tile_origins
from pretrain.data.segment import Segment, SegmentError, read_label_image

# Training labels are (Y, X) uint8: 1 ink, 0 not ink, UNKNOWN neither (no loss, no metric). Without a negatives
# image every pixel that is not ink is "not ink", as label sets have always been read; with one, only painted
# pixels are known.
UNKNOWN = 2
MAX_Z_SHIFT = 2  # layers; the surface of a real segment is flattened to within a layer or two
MAX_DROPPED_LAYERS = 2  # slice dropout, as the Kaggle 4th place and the Grand Prize winner


# ---------------------------------------------------------------- label files


def resolve_label_path(path: str, segment: Segment, setting: str) -> pathlib.Path:
    """`path` as given, or a bare file name looked up in the segment's folder (`inklabels_two_letters.png`)."""
    given = pathlib.Path(path).expanduser()
    if given.is_file():
        return given
    candidates = []
    if given.name == path and segment.source in ("zarr", "demo", "layers"):
        location = pathlib.Path(segment.location)
        candidates = [location / path, location.parent / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = f" (nor in {', '.join(str(candidate.parent) for candidate in candidates)})" if candidates else ""
    raise SegmentError(f"{setting} {path} does not exist{looked}")


def training_labels(inklabels_yx: np.ndarray, negatives_yx: np.ndarray | None) -> np.ndarray:
    """(Y, X) uint8 training labels from ink labels and, if there are any, negatives (see UNKNOWN)."""
    if negatives_yx is None:
        return (inklabels_yx > 0).astype(np.uint8)
    labels_yx = np.full(inklabels_yx.shape, UNKNOWN, np.uint8)
    labels_yx[negatives_yx > 0] = 0
    labels_yx[inklabels_yx > 0] = 1
    return labels_yx


def pseudo_labels(probabilities_yx: np.ndarray, region_yx: np.ndarray, human_ink_yx: np.ndarray,
                  human_negatives_yx: np.ndarray | None, ink_threshold: float, not_ink_threshold: float,
                  min_ink_pixels: int = 0) -> np.ndarray:
    """(Y, X) uint8 training labels for a self-training round: in the region, ink where the prediction is at least
    `ink_threshold` (in specks of at least `min_ink_pixels`), not ink where it is at most `not_ink_threshold`,
    unknown in between and outside; the human labels (ink, and painted negatives if any) win over the prediction
    wherever they say something."""
    labels_yx = np.full(probabilities_yx.shape, UNKNOWN, np.uint8)
    labels_yx[region_yx & (probabilities_yx <= not_ink_threshold)] = 0
    labels_yx[region_yx & (probabilities_yx >= ink_threshold)] = 1
    return with_human_labels(without_specks(labels_yx, min_ink_pixels), human_ink_yx, human_negatives_yx)


def read_prior(path: pathlib.Path, segment: Segment) -> np.ndarray:
    """(Y, X) float32 in [0, 1]: a prior map of the segment, a greyscale PNG or TIFF (8 or 16 bits) exactly the
    segment's size, as `finetune/predict.py`, `evaluate/ink_map.py` and `evaluate/local_contrast.py` write them.
    A colour image whose channels differ, or any other size, is an error naming the problem."""
    description = f"PRIOR_PATH {path}"
    try:
        header = image_header(path)
    except (OSError, ValueError) as error:
        raise SegmentError(f"{description} {error}") from error
    if header.shape_yx != tuple(segment.shape[1:]):
        raise SegmentError(f"{description} is {header.shape_yx[0]} × {header.shape_yx[1]} pixels, not the segment's "
                           f"{segment.shape[1]} × {segment.shape[2]} (Y × X): a prior must be a map of this segment")
    try:
        pixels = decode_image(path, header.shape_yx)
    except (OSError, ValueError) as error:
        raise SegmentError(f"{description} {error}") from error
    if pixels.ndim == 3:
        colours = pixels[..., :3]
        if (colours != colours[..., :1]).any():
            raise SegmentError(f"{description} is a colour image: a prior is one greyscale channel of ink probability")
        pixels = colours[..., 0]
    if pixels.dtype not in (np.uint8, np.uint16):
        raise SegmentError(f"{description} holds {pixels.dtype} pixels: a prior is 8- or 16-bit greyscale")
    return pixels.astype(np.float32) / np.iinfo(pixels.dtype).max


def prior_labels(prior_yx: np.ndarray, region_yx: np.ndarray, ink_fraction: float, not_ink_fraction: float,
                 min_ink_pixels: int) -> np.ndarray:
    """(Y, X) uint8 training labels from a prior map, by rank in the region: the `ink_fraction` of its pixels the
    prior ranks highest are ink, the `not_ink_fraction` it ranks lowest not ink, the rest and everything outside
    unknown. Ranks, not values, so an uncalibrated prior (a contrast map, an encoder's feature) works as well as a
    probability. Ink specks under `min_ink_pixels` pixels (8-connected) become unknown (`without_specks`)."""
    values = prior_yx[region_yx]
    labels_yx = np.full(prior_yx.shape, UNKNOWN, np.uint8)
    if values.size == 0:
        return labels_yx
    ink_at, not_ink_at = np.quantile(values, [1 - ink_fraction, not_ink_fraction])
    labels_yx[region_yx & (prior_yx <= not_ink_at)] = 0
    labels_yx[region_yx & (prior_yx >= ink_at) & (prior_yx > not_ink_at)] = 1  # ties at a flat prior: not ink wins
    return without_specks(labels_yx, min_ink_pixels)


def without_specks(labels_yx: np.ndarray, min_ink_pixels: int) -> np.ndarray:
    """`labels_yx` with every 8-connected ink component under `min_ink_pixels` pixels made unknown: a stroke of a
    letter covers hundreds of pixels, an isolated confident speck is more likely noise than ink."""
    if min_ink_pixels <= 1:
        return labels_yx
    count, components_yx, statistics, _ = cv2.connectedComponentsWithStats((labels_yx == 1).astype(np.uint8), connectivity=8)
    small = np.flatnonzero(statistics[:, cv2.CC_STAT_AREA] < min_ink_pixels)
    small = small[small > 0]  # component 0 is the background
    cleaned = labels_yx.copy()
    cleaned[np.isin(components_yx, small)] = UNKNOWN
    return cleaned


def with_human_labels(labels_yx: np.ndarray, human_ink_yx: np.ndarray, human_negatives_yx: np.ndarray | None) -> np.ndarray:
    """`labels_yx` (from a prior or a prediction) with the human labels winning wherever they say something."""
    merged = labels_yx.copy()
    if human_negatives_yx is not None:
        merged[human_negatives_yx > 0] = 0
    merged[human_ink_yx > 0] = 1
    return merged


def read_label_file(path: pathlib.Path, segment: Segment, setting: str) -> np.ndarray:
    """(Y, X) uint8 in {0, 1}. Bottom/right padding to whole tiles is cropped, a slightly smaller image padded
    (each with a warning); any other size than the segment's is an error naming both (`read_label_image`)."""
    return read_label_image(path.read_bytes(), f"{setting} {path}", segment.shape[1:])


# ---------------------------------------------------------------- the split


@dataclasses.dataclass(frozen=True)
class Box:
    """A (y0, y1) × (x0, x1) rectangle of the segment, ends excluded."""

    y0: int
    y1: int
    x0: int
    x1: int

    def region_yx(self, shape_yx: tuple[int, int]) -> np.ndarray:
        region = np.zeros(shape_yx, bool)
        region[self.y0:self.y1, self.x0:self.x1] = True
        return region


def choose_validation_box(mask_yx: np.ndarray, labels_yx: np.ndarray, tile_size: int, fraction: float) -> Box:
    """A band across the segment's longer side, `fraction` of it wide (whole tiles), holding both ink and
    no-ink; of the candidate bands, the one whose ink fraction is closest to the whole segment's."""
    height, width = mask_yx.shape
    across_x = width >= height  # a band of columns cuts a wide segment into two parts, not two slivers
    papyrus = (mask_yx if across_x else mask_yx.T).astype(bool)
    ink = papyrus & ((labels_yx if across_x else labels_yx.T) == 1)
    extent = papyrus.shape[1]
    band = max(tile_size, int(round(fraction * extent / tile_size)) * tile_size)
    papyrus_before = np.concatenate([[0], np.cumsum(papyrus.sum(axis=0))])  # (extent + 1,) pixels left of each column
    ink_before = np.concatenate([[0], np.cumsum(ink.sum(axis=0))])
    overall_ink_fraction = ink_before[-1] / max(1, papyrus_before[-1])
    best, best_gap = None, np.inf
    for start in range(0, extent - band + 1, tile_size):
        band_papyrus = papyrus_before[start + band] - papyrus_before[start]
        band_ink = ink_before[start + band] - ink_before[start]
        # Bands on the ragged edge of the papyrus hold too little to measure anything.
        if band_ink == 0 or band_ink == band_papyrus or band_papyrus < 0.5 * fraction * papyrus_before[-1]:
            continue
        gap = abs(band_ink / band_papyrus - overall_ink_fraction)
        if gap < best_gap:
            best, best_gap = start, gap
    if best is None:
        raise SegmentError(
            f"no band of {band} pixels across the segment holds both ink and no-ink over enough papyrus; "
            "label more of the segment or use scheme = 'iterative'")
    if across_x:
        return Box(0, height, best, best + band)
    return Box(best, best + band, 0, width)


def drop_tiles_touching(origins: np.ndarray, tile_size: int, box: Box) -> np.ndarray:
    """The (N, 2) (y, x) tile origins whose tile does not overlap `box` by even one pixel."""
    y, x = origins[:, 0], origins[:, 1]
    overlaps = (y < box.y1) & (y + tile_size > box.y0) & (x < box.x1) & (x + tile_size > box.x0)
    return origins[~overlaps]


def tiles_region(origins: np.ndarray, tile_size: int, shape_yx: tuple[int, int]) -> np.ndarray:
    """(Y, X) bool: the pixels that any of the tiles covers."""
    region = np.zeros(shape_yx, bool)
    for y, x in origins:
        region[y:y + tile_size, x:x + tile_size] = True
    return region


# ---------------------------------------------------------------- datasets


def depth_margin(num_layers: int, settings: InputSettings) -> int:
    """Extra layers (up to MAX_Z_SHIFT) readable on each side of the depth window, for the z-shift."""
    for margin in range(MAX_Z_SHIFT, 0, -1):
        try:
            depth_window(num_layers, settings.depth + 2 * margin, settings.depth_offset)
            return margin
        except SegmentError:
            continue
    return 0


def tile_dataset(segment: Segment, origins: np.ndarray, settings: InputSettings, labels_yx: np.ndarray | None = None,
                 transform=None, margin: int = 0) -> GridTileDataset:
    """GridTileDataset over exactly the given (N, 2) origins, reading `margin` more layers on each side; its tiles
    carry `labels_yx` (training labels, see UNKNOWN), or without them the segment's own ink labels."""
    widened = dataclasses.replace(settings, depth=settings.depth + 2 * margin)
    return GridTileDataset(segment, widened, stride=settings.tile_size, transform=transform, origins=origins,
                           labels_yx=labels_yx)


def training_origins(segment: Segment, tile_size: int, stride: int, held_out: Box | None,
                     min_labelled_fraction: float, labelled_yx: np.ndarray | None = None) -> np.ndarray:
    """Training tiles: mostly papyrus, touching no held-out pixel, and with `min_labelled_fraction` > 0 holding at
    least that fraction of `labelled_yx` (the pixels whose labels choose tiles: ink, or whatever was painted)."""
    region = None if held_out is None else ~held_out.region_yx(segment.shape[1:])
    origins = tile_origins(segment, tile_size, stride, min_mask_fraction=MOSTLY_PAPYRUS, min_ink_fraction=min_labelled_fraction,
                           region_yx=region, chooser_yx=labelled_yx)
    if held_out is not None:
        origins = drop_tiles_touching(origins, tile_size, held_out)
        if len(origins) == 0:
            raise SegmentError(f"no training tile of {tile_size} pixels fits outside the validation band {held_out}")
    return origins


def validation_origins(segment: Segment, tile_size: int, box: Box) -> np.ndarray:
    """Non-overlapping tiles on the box wherever it holds papyrus. The box starts and ends on the tile
    grid, so every held-out pixel is counted once (up to a segment edge that is not a whole tile)."""
    return tile_origins(segment, tile_size, tile_size, min_mask_fraction=ANY_PAPYRUS, region_yx=box.region_yx(segment.shape[1:]))


class TrainingTiles(torch.utils.data.ConcatDataset):
    """The training tiles of every training segment, one segment's after another's, with the augmentation they
    share (`reseed_worker` reseeds it in each DataLoader worker)."""

    def __init__(self, datasets: list[GridTileDataset], transform) -> None:
        super().__init__(datasets)
        self.transform = transform


def segment_shares(labelled_pixels: list[int], equal: bool) -> list[float]:
    """Each training segment's share of an epoch's tiles: in proportion to its labelled pixels, or equal."""
    total = sum(labelled_pixels)
    if equal or total == 0:
        return [1 / len(labelled_pixels)] * len(labelled_pixels)
    return [pixels / total for pixels in labelled_pixels]


class SegmentMixSampler(torch.utils.data.Sampler):
    """This process's indices into `TrainingTiles` for one epoch, reshuffled per (seed, epoch).

    An epoch holds the tiles of every segment, repeated as a whole until it holds at least `min_tiles`; of those
    draws each segment takes its share (`segment_shares`): all of its tiles as often as the share allows, and the
    rest a random subset of them, drawn anew each epoch. The draws are then shuffled and dealt to the processes as
    DistributedSampler (drop_last) deals them, so that with one segment an epoch is exactly DistributedSampler's
    over the tiles repeated up to `min_tiles`."""

    def __init__(self, tile_counts: list[int], shares: list[float], min_tiles: int, seed: int, rank: int,
                 world_size: int) -> None:
        total = sum(tile_counts)
        self.length = max(1, math.ceil(min_tiles / total)) * total  # draws per epoch, all processes together
        self.tile_counts, self.seed, self.rank, self.world_size = tile_counts, seed, rank, world_size
        # Largest remainder: the draws add up to exactly `length` however the shares round.
        wanted = [share * self.length for share in shares]
        self.draws = [int(value) for value in wanted]
        by_remainder = sorted(range(len(wanted)), key=lambda index: self.draws[index] - wanted[index])
        for index in by_remainder[:self.length - sum(self.draws)]:
            self.draws[index] += 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.world_size

    def __iter__(self):
        drawn, offset = [], 0
        for index, (tiles, draws) in enumerate(zip(self.tile_counts, self.draws)):
            whole, rest = divmod(draws, tiles)
            picked = np.tile(np.arange(tiles), whole)
            if rest:
                subset = np.random.default_rng([self.seed, self.epoch, index]).permutation(tiles)[:rest]
                picked = np.concatenate([picked, subset])
            drawn.append(offset + picked)
            offset += tiles
        drawn = np.concatenate(drawn)  # (length,) indices, segment by segment
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)  # DistributedSampler's shuffle
        shuffled = drawn[torch.randperm(self.length, generator=generator).numpy()]
        return iter(shuffled[self.rank:len(self) * self.world_size:self.world_size].tolist())


# ---------------------------------------------------------------- augmentation


class TileAugmentation:
    """Random augmentation of a (D + 2·margin, T, T) layer stack and its (T, T) label, as the Kaggle and
    Grand Prize ink detectors: 2D transforms applied alike to every layer (layers as channels) and to
    the label, then a random z-shift (a D-layer window within the margin) and slice dropout.

    With `enabled` False it only takes the centre D layers. Randomness is seeded per (seed, epoch,
    rank, worker) through `reseed`, so DataLoader workers differ and a resumed run repeats itself.
    """

    def __init__(self, depth: int, margin: int, enabled: bool, seed: int) -> None:
        self.depth = depth
        self.margin = margin
        self.enabled = enabled
        self.seed = seed
        self.epoch = 0
        self.rank = 0
        # Kaggle / Grand Prize strengths. On the demo any augmentation delays the onset of learning (notes/finetune.md).
        self.spatial_and_intensity = albumentations.Compose([
            albumentations.HorizontalFlip(p=0.5),
            albumentations.VerticalFlip(p=0.5),
            albumentations.RandomRotate90(p=0.5),
            albumentations.Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-45, 45),
                                  border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            albumentations.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
            albumentations.OneOf([albumentations.GaussNoise(std_range=(0.01, 0.03)),
                                  albumentations.GaussianBlur(blur_limit=(3, 3)),
                                  albumentations.MotionBlur(blur_limit=3)], p=0.3),
            albumentations.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                                         hole_width_range=(0.1, 0.25), fill=0, p=0.3),
        ])
        self.reseed(0)

    def set_epoch(self, epoch: int, rank: int) -> None:
        self.epoch, self.rank = epoch, rank
        self.reseed(0)

    def reseed(self, worker: int) -> None:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, self.rank, worker]).generate_state(1)[0])
        self.spatial_and_intensity.set_random_seed(seed)
        self.random = random.Random(seed)

    def __call__(self, volume_dhw: np.ndarray, label_hw: np.ndarray | None):
        if not self.enabled:
            return volume_dhw[self.margin:self.margin + self.depth], label_hw
        augmented = self.spatial_and_intensity(image=volume_dhw.transpose(1, 2, 0), mask=label_hw)
        volume_dhw = augmented["image"].transpose(2, 0, 1)  # (D + 2·margin, T, T)
        start = self.random.randint(0, 2 * self.margin)
        volume_dhw = np.array(volume_dhw[start:start + self.depth])  # (D, T, T), a copy we may write into
        for layer in self.random.sample(range(self.depth), self.random.randint(0, MAX_DROPPED_LAYERS)):
            volume_dhw[layer] = 0.0
        return volume_dhw, augmented["mask"]


def reseed_worker(worker: int) -> None:
    """DataLoader worker_init_fn: forked workers would otherwise share the augmentation's random state."""
    transform = torch.utils.data.get_worker_info().dataset.transform
    if isinstance(transform, TileAugmentation):
        transform.reseed(worker + 1)
