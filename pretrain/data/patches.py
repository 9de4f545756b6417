"""Patches from segments: how a tile is cut and scaled (`InputSettings`), depth windows, normalisation, tile
grids, and the two datasets built on them.

- `RandomPatchDataset`: random crops for pretraining, from one or several segments, only where the mask
  (and optionally the ink labels) cover enough of the tile. A crop is keyed by (epoch, index), which
  `EpochSampler` hands out in the main process, and drawn from (seed, epoch, index): DataLoader workers,
  persistent or not, draw every epoch's own crops, and a resumed run draws the same ones.
- `GridTileDataset`: tiles on a regular grid with a stride (fine-tuning, inference).

Patches are read from the segment's lazy volume (chunk-aligned, LRU-bounded), so memory does not grow
with the segment. Tile positions are found on the mask at block resolution (a block is gcd(tile,
stride) pixels), so even a 65 × 8192 × 8192 segment needs only a small table of candidates.
"""
import dataclasses
import math

import numpy as np
import scipy.ndimage
import torch

from pretrain.data.segment import Segment, SegmentError

NORMALIZATIONS = ("range", "clip", "zscore")
# "zscore" divides by (standard deviation + ZSCORE_EPSILON); VICReg standardises its views with the same formula
# (pretrain.vicreg.standardize), so its encoders read tiles through "zscore" exactly as they trained.
ZSCORE_EPSILON = 1e-6
# A surface-following window searches this many layers above and below the centred window for the surface.
SURFACE_SEARCH_LAYERS = 8
SURFACE_SMOOTHING_PX = 4.0  # in-plane smoothing of the found surface: noise moves single columns, not the sheet
# How much of a tile the segment's mask must cover (`min_mask_fraction`): three uses, three values on purpose.
MOSTLY_PAPYRUS = 0.5  # tiles to learn from (pretraining crops, fine-tuning tiles): mostly papyrus, not background
# tiles of an unsupervised feature map (evaluate/ink_map.py): its PCA is not spent on tiles of almost only
# background, yet the papyrus' edges are mapped
SOME_PAPYRUS = 0.05
ANY_PAPYRUS = 1e-6  # tiles to predict or score (a held-out band, a contrast map): every tile that touches papyrus


# "clip" normalisation's window, in 8-bit units: the Kaggle detectors' 50–200 (scaled ×257 for uint16 voxels).
CLIP_WINDOW = (50.0, 200.0)


@dataclasses.dataclass(frozen=True)
class InputSettings:
    """How a tile is cut from a segment and scaled: what an encoder was trained on, and so what it must be
    given wherever it is used. Every checkpoint records it (`pretrain.checkpoint`); fine-tuning and the
    evaluation scripts take it from there."""

    model: str = "resnet50_3d"  # the encoder architecture (pretrain.models registry name)
    depth: int = 16  # layers per tile
    depth_offset: int = 0  # shift of the depth window from the middle layer (or from the surface)
    follow_surface: bool = False  # the window follows the recto surface found per tile (DepthWindow)
    normalization: str = "range"  # one of NORMALIZATIONS
    tile_size: int = 96  # tile side in pixels
    # The values of a float volume's voxels that stand for 0 and 1, as 0 and the maximum of a uint8 / uint16 one do:
    # a float volume has no maximum to divide by, so it is refused without this (check_voxel_dtype).
    float_range: tuple[float, float] | None = None
    # The voxel dtype(s) the encoder learnt from ("uint8", "uint16", "float32"; "uint8+uint16" for a mix), as
    # recorded; None in files written before it was. A record, not a reading choice: never compared.
    voxel_dtype: str | None = dataclasses.field(default=None, compare=False)

    def as_dict(self) -> dict:
        float_range = None if self.float_range is None else list(self.float_range)
        return {**dataclasses.asdict(self), "float_range": float_range}

    @classmethod
    def from_dict(cls, values: dict) -> "InputSettings":
        """Settings as `as_dict` wrote them; keys added since (float_range, voxel_dtype) take their defaults. Older
        files record "clip" normalisation's window, which was never settable: always CLIP_WINDOW."""
        float_range = values.get("float_range")
        return cls(**{**{key: value for key, value in values.items() if key != "clip_window"},
                      "float_range": None if float_range is None else tuple(float(value) for value in float_range)})

    def describe(self) -> str:
        window = f"{self.depth} layers" + (f" offset {self.depth_offset:+d}" if self.depth_offset else "")
        window += " along the surface" if self.follow_surface else " centred"
        scale = f"{self.normalization} {CLIP_WINDOW}" if self.normalization == "clip" else self.normalization
        if self.float_range is not None:
            scale += f" (float voxels {self.float_range[0]:g}…{self.float_range[1]:g} as 0…1)"
        return f"{self.model}, {window}, {scale} normalisation, {self.tile_size}² tiles"


@dataclasses.dataclass(frozen=True)
class InputOption:
    """An InputSettings field a person sets: the name of its fine-tuning setting (pretraining's and evaluate/'s
    option is --<field>) and what it means, as every script's --help says it."""

    finetune_name: str
    help: str


# One table for every script's input options, their --help and messages.
INPUT_OPTIONS = {
    "model": InputOption("MODEL", "the 3D encoder, a name in pretrain/models (resnet50_3d_narrow: resnet50_3d at a "
                                  "quarter of its width)"),
    "depth": InputOption("DEPTH", "layers per tile, a multiple of the encoder's depth downsample 8 (16 layers give "
                                  "2 cells in depth)"),
    "depth_offset": InputOption("DEPTH_OFFSET", "shift of the depth window from the middle layer (or from the "
                                                "surface)"),
    "follow_surface": InputOption("FOLLOW_SURFACE", "the depth window follows the recto surface found in each tile"),
    "normalization": InputOption("NORMALIZATION", '"range" (÷ dtype max), "clip" (Kaggle 50–200 window) or '
                                                  '"zscore" (per tile)'),
    "tile_size": InputOption("TILE_SIZE", "tile side in pixels, a multiple of 32 (96 gives 3 × 3 cells of 32)"),
}
FINETUNE_NAMES = {field: option.finetune_name for field, option in INPUT_OPTIONS.items()}
OPTION_NAMES = {field: f"--{field}" for field in INPUT_OPTIONS}
# The input without a checkpoint that records it (training from scratch, a random encoder, a bare state dict,
# Kinetics weights), in fine-tuning and in every evaluate/ script alike: every `random` arm of evaluate/ is a
# fine-tuning run. The narrow model: full width makes fine-tuning steps many times slower on a CPU (notes/finetune.md,
# "Choices, and why").
NO_CHECKPOINT_INPUT = InputSettings(model="resnet50_3d_narrow", depth=16, depth_offset=0, follow_surface=False,
                                    normalization="range", tile_size=64)


def finetune_options(settings: InputSettings) -> list[str]:
    """finetune/train.py's command-line settings that make a run read tiles as `settings` say."""
    return [item for field, name in FINETUNE_NAMES.items() for item in (f"--{name}", str(getattr(settings, field)))]


def evaluate_options(settings: InputSettings) -> list[str]:
    """The evaluate/ scripts' input options that make them read tiles as `settings` say."""
    return [item for field, name in OPTION_NAMES.items() for item in (name, str(getattr(settings, field)))]


def voxel_dtypes(segments: list[Segment]) -> str:
    """The segments' voxel dtypes as InputSettings.voxel_dtype records them: "uint8", or "uint8+uint16" for a mix."""
    return "+".join(sorted({segment.dtype.name for segment in segments}))


def check_voxel_dtype(segment: Segment, settings: InputSettings) -> None:
    """A float segment needs `settings.float_range` (uint8 and uint16 scale by their maximum; open_segment has
    refused every other dtype): one error naming the segment and its dtype."""
    if segment.dtype.kind != "f":
        return
    if settings.float_range is None:
        raise SegmentError(f"segment {segment.name} holds {segment.dtype.name} voxels: a float volume is read only "
                           "with the voxel values that stand for 0 and 1 stated (input setting float_range; "
                           "pretraining: --float_range LOW HIGH), which these settings lack")
    low, high = settings.float_range
    if not low < high:
        raise SegmentError(f"float_range {settings.float_range} of segment {segment.name}: LOW must be below HIGH")


def depth_window(num_layers: int, depth: int, offset: int = 0) -> slice:
    """The `depth` layers centred on the middle layer, shifted by `offset`; error if outside the volume."""
    start = num_layers // 2 - depth // 2 + offset
    if depth < 1 or start < 0 or start + depth > num_layers:
        raise SegmentError(
            f"depth window of {depth} layers with offset {offset} spans layers {start}..{start + depth - 1}, "
            f"outside the volume's 0..{num_layers - 1}"
        )
    return slice(start, start + depth)


def normalize_patch(patch: np.ndarray, mode: str = "range", float_range: tuple[float, float] | None = None) -> np.ndarray:
    """float32 patch from uint8/uint16 voxels, or float voxels with their `float_range` (low, high) stated.

    "range": divide by the dtype's maximum → [0, 1] (a float patch: low → 0, high → 1).
    "clip": clip to CLIP_WINDOW, given in 8-bit units (scaled ×257 for uint16) → [0, 1].
    "zscore": range-scaled, then zero mean and unit variance over the patch.
    """
    if patch.dtype.kind == "f":
        if float_range is None:
            raise ValueError(f"a {patch.dtype.name} patch needs float_range: a float dtype has no maximum to scale by")
        # Shifted so that low is 0: the span then plays the dtype maximum's part below.
        patch, maximum = patch.astype(np.float32) - np.float32(float_range[0]), float(float_range[1] - float_range[0])
    elif patch.dtype.kind == "u" and patch.dtype.itemsize <= 2:
        maximum = float(np.iinfo(patch.dtype).max)
    else:  # int8 would map to [-1, 1] and uint32 to a sliver near 0: refused, not scaled wrongly
        raise ValueError(f"{patch.dtype.name} voxels cannot be normalised: uint8, uint16 or float only")
    if mode == "range":
        return patch.astype(np.float32) / maximum
    if mode == "clip":
        scale = maximum / 255.0
        low, high = CLIP_WINDOW[0] * scale, CLIP_WINDOW[1] * scale
        return ((np.clip(patch.astype(np.float32), low, high) - low) / (high - low)).astype(np.float32)
    if mode == "zscore":
        values = patch.astype(np.float32) / maximum
        return (values - values.mean()) / (values.std() + ZSCORE_EPSILON)
    raise ValueError(f"normalization {mode!r} is not one of {NORMALIZATIONS}")


def surface_depth(slab_dtt: np.ndarray) -> np.ndarray:
    """(T, T) float32: per pixel, the fractional layer of `slab_dtt` where the recto surface lies, i.e.
    where the (lightly smoothed) intensity first rises, going down from layer 0, above the midpoint
    between the slab's air and papyrus levels (its 5th and 95th percentiles).

    Columns without such a rise (air or papyrus throughout) take the median of the others, and the map
    is smoothed in-plane. A slab without contrast gives its middle layer everywhere.
    """
    layers = slab_dtt.shape[0]
    smoothed = scipy.ndimage.gaussian_filter(slab_dtt.astype(np.float32), (0.7, 2.0, 2.0))
    air, papyrus = np.percentile(smoothed, [5, 95])
    if papyrus - air < 1e-3 * max(abs(papyrus), 1e-6):
        return np.full(slab_dtt.shape[1:], (layers - 1) / 2, np.float32)
    midpoint = (air + papyrus) / 2
    above = smoothed > midpoint  # (D, T, T)
    first = above.argmax(axis=0)  # (T, T): the first layer above the midpoint, 0 where none is
    found = above.any(axis=0) & (first > 0)  # a column bright from layer 0 on shows no rise from air
    before = np.take_along_axis(smoothed, np.maximum(first - 1, 0)[None], 0)[0]
    after = np.take_along_axis(smoothed, first[None], 0)[0]
    # Where between the two layers the midpoint is crossed (linear interpolation).
    depth_tt = first - 1 + (midpoint - before) / np.maximum(after - before, 1e-6)
    fill = float(np.median(depth_tt[found])) if found.any() else (layers - 1) / 2
    depth_tt = np.where(found, depth_tt, fill).astype(np.float32)
    return scipy.ndimage.gaussian_filter(depth_tt, SURFACE_SMOOTHING_PX, mode="nearest")


def resample_along_surface(slab_dtt: np.ndarray, surface_tt: np.ndarray, first_layer: int, count: int) -> np.ndarray:
    """(count, T, T): layers `surface + first_layer + k` (k = 0 … count - 1) of the slab, linearly
    interpolated in depth; positions beyond the slab repeat its first or last layer."""
    positions = surface_tt[None] + first_layer + np.arange(count, dtype=np.float32)[:, None, None]  # (count, T, T)
    positions = np.clip(positions, 0, slab_dtt.shape[0] - 1)
    below = np.floor(positions).astype(np.int64)
    above = np.minimum(below + 1, slab_dtt.shape[0] - 1)
    weight = (positions - below).astype(np.float32)
    return ((1 - weight) * np.take_along_axis(slab_dtt, below, 0) + weight * np.take_along_axis(slab_dtt, above, 0))


class DepthWindow:
    """The layers a tile's input takes: `depth` layers centred on the middle layer (shifted by `offset`),
    or, with `follow_surface`, `depth` layers that follow the recto surface, which then lies at input
    layer `depth // 2 - offset` everywhere, as it does in the centred window of a perfectly flat segment.

    Segments are flattened along a fitted surface, but not perfectly: the demo's surface wanders ±5
    layers, real ones a few. Ink touches only the first layer or two below the surface, so a fixed
    window puts it at a different input layer in every place; following the surface keeps it at one.
    The surface is found per tile (`surface_depth`) in the window widened by SURFACE_SEARCH_LAYERS
    on each side (as far as the volume allows).
    """

    def __init__(self, num_layers: int, settings: InputSettings) -> None:
        self.settings = settings
        self.depth = settings.depth
        self.layers = depth_window(num_layers, settings.depth, settings.depth_offset)  # checks the window fits
        if settings.follow_surface:
            self.layers = slice(max(self.layers.start - SURFACE_SEARCH_LAYERS, 0),
                                min(self.layers.stop + SURFACE_SEARCH_LAYERS, num_layers))

    def read(self, segment: Segment, y: int, x: int, tile_size: int, extra_layers: int = 0) -> np.ndarray:
        """(depth + extra_layers, tile, tile) float32, normalised; the extra layers continue below the window."""
        settings = self.settings
        if not settings.follow_surface:
            layers = slice(self.layers.start, self.layers.stop + extra_layers)
            return normalize_patch(read_patch(segment, layers, y, x, tile_size), settings.normalization,
                                   settings.float_range)
        # "zscore" takes its statistics over the output window, as it does without surface following (and as
        # VICReg standardises its views), not over the searched slab, whose extra air and papyrus layers would
        # set another scale; the surface is found on the range-scaled slab (surface_depth is affine-invariant).
        zscore = settings.normalization == "zscore"
        slab_scaling = "range" if zscore else settings.normalization
        slab = normalize_patch(read_patch(segment, self.layers, y, x, tile_size), slab_scaling, settings.float_range)
        window = resample_along_surface(slab, surface_depth(slab), settings.depth_offset - settings.depth // 2,
                                        settings.depth + extra_layers)
        return (window - window.mean()) / (window.std() + ZSCORE_EPSILON) if zscore else window


def _block_fractions(image_yx: np.ndarray, block: int) -> np.ndarray:
    """Fraction of set pixels in each block × block cell (partial edge blocks count as unset)."""
    height, width = image_yx.shape[0] // block, image_yx.shape[1] // block
    trimmed = image_yx[: height * block, : width * block] > 0
    return trimmed.reshape(height, block, width, block).mean(axis=(1, 3), dtype=np.float64)


def _window_means(fractions_by_block: np.ndarray, window_blocks: int, step_blocks: int) -> np.ndarray:
    """Mean of every window_blocks² window at step_blocks, via an integral image. → (rows, cols)."""
    integral = np.pad(fractions_by_block, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    starts_y = np.arange(0, fractions_by_block.shape[0] - window_blocks + 1, step_blocks)
    starts_x = np.arange(0, fractions_by_block.shape[1] - window_blocks + 1, step_blocks)
    y0, x0 = np.meshgrid(starts_y, starts_x, indexing="ij")
    y1, x1 = y0 + window_blocks, x0 + window_blocks
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return sums / window_blocks**2


def tile_origins(
    segment: Segment,
    tile_size: int,
    stride: int,
    min_mask_fraction: float = MOSTLY_PAPYRUS,
    min_ink_fraction: float = 0.0,
    region_yx: np.ndarray | None = None,
    chooser_yx: np.ndarray | None = None,
) -> np.ndarray:
    """(N, 2) int64 (y, x) top-left corners of grid tiles that the mask covers enough. Errors if none.

    `region_yx` (Y, X) bool, optional, further restricts tiles to where it is set (e.g. a training area).
    `chooser_yx` (Y, X), optional: the pixels whose fraction `min_ink_fraction` counts, in place of the segment's
    ink labels (fine-tuning's labelled or painted pixels).
    """
    height, width = segment.shape[1:]
    if tile_size > min(height, width):
        raise SegmentError(f"tile size {tile_size} is larger than segment {segment.name}'s (Y, X) = {(height, width)}")
    block = math.gcd(tile_size, stride)
    coverage = segment.mask if region_yx is None else segment.mask & region_yx
    keep = _window_means(_block_fractions(coverage, block), tile_size // block, stride // block) >= min_mask_fraction
    if min_ink_fraction > 0:
        chooser_yx = segment.inklabels if chooser_yx is None else chooser_yx
        if chooser_yx is None:
            raise SegmentError(f"segment {segment.name} has no ink labels, but min_ink_fraction={min_ink_fraction}")
        ink = _window_means(_block_fractions(chooser_yx, block), tile_size // block, stride // block)
        keep &= ink >= min_ink_fraction
    rows, cols = np.nonzero(keep)
    if len(rows) == 0:
        raise SegmentError(
            f"no {tile_size}×{tile_size} tile of segment {segment.name} has mask coverage ≥ {min_mask_fraction}"
            + (f" and ink ≥ {min_ink_fraction}" if min_ink_fraction > 0 else "")
        )
    return np.stack([rows * stride, cols * stride], axis=1).astype(np.int64)


def read_patch(segment: Segment, layers: slice, y: int, x: int, tile_size: int) -> np.ndarray:
    """(D, tile, tile) raw voxels. A float volume's NaN or inf would poison training silently: refused here."""
    patch = segment.volume[layers, y : y + tile_size, x : x + tile_size]
    if patch.dtype.kind == "f" and not np.isfinite(patch).all():
        raise SegmentError(f"segment {segment.name} has non-finite voxels (NaN or inf) in layers "
                           f"{layers.start}..{layers.stop - 1} of the tile at y={y}, x={x}")
    return patch


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys of this process's share of an epoch: indices rank, rank + world_size, … of
    0 … length − 1, as many for every process (the remainder is dropped, as DistributedSampler does).

    The epoch travels with each key because a sampler runs in the main process: a dataset that read its
    epoch from an attribute would keep epoch 0 in persistent DataLoader workers, which copied it once.
    Call `set_epoch` before each epoch, as with DistributedSampler.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.world_size

    def __iter__(self):
        return iter([(self.epoch, index) for index in range(self.rank, len(self) * self.world_size, self.world_size)])


class RandomPatchDataset(torch.utils.data.Dataset):
    """Random (1, D, tile, tile) float32 crops from one or more segments, for pretraining, keyed by
    (epoch, index) (see EpochSampler): `dataset[epoch, index]`.

    A crop starts at a random grid tile that passes the coverage test, jittered by up to one grid step,
    so positions are continuous while coverage stays guaranteed to within a step. Segments are drawn
    in proportion to their number of usable tiles. `samples_per_epoch` sets the epoch length.
    """

    def __init__(
        self,
        segments: list[Segment],
        settings: InputSettings,
        samples_per_epoch: int,
        min_mask_fraction: float = MOSTLY_PAPYRUS,
        min_ink_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.segments = list(segments)
        self.settings = settings
        self.tile_size = settings.tile_size
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.jitter = max(1, self.tile_size // 4)
        for segment in self.segments:
            check_voxel_dtype(segment, settings)
        self.windows = [DepthWindow(segment.shape[0], settings) for segment in self.segments]
        self.origins = [
            tile_origins(segment, self.tile_size, self.jitter, min_mask_fraction, min_ink_fraction)
            for segment in self.segments
        ]
        counts = np.array([len(origins) for origins in self.origins], dtype=np.float64)
        self.segment_probabilities = counts / counts.sum()

    def __len__(self) -> int:
        return self.samples_per_epoch

    def sample_position(self, epoch: int, index: int) -> tuple[int, int, int]:
        """(segment index, y, x) of sample `index` of `epoch`."""
        rng = np.random.default_rng((self.seed, epoch, index))
        segment_index = int(rng.choice(len(self.segments), p=self.segment_probabilities))
        y, x = self.origins[segment_index][rng.integers(len(self.origins[segment_index]))]
        height, width = self.segments[segment_index].shape[1:]
        y = min(int(y) + int(rng.integers(self.jitter)), height - self.tile_size)
        x = min(int(x) + int(rng.integers(self.jitter)), width - self.tile_size)
        return segment_index, y, x

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        segment_index, y, x = self.sample_position(epoch, index)
        patch = self.windows[segment_index].read(self.segments[segment_index], y, x, self.tile_size)
        return torch.from_numpy(patch).unsqueeze(0)  # (1, D, T, T)


class GridTileDataset(torch.utils.data.Dataset):
    """Tiles on a stride grid of one segment: dicts of `volume` (1, D, T, T) float32, `origin` (y, x)
    and, when there are labels, `label` (T, T) float32. `transform(volume_dtt, label_tt)`, if
    given, receives numpy arrays (after normalisation) and returns them transformed (augmentation).
    `origins` (N, 2), if given, is the exact tile list to use instead of the grid (e.g. a train/val split).
    `labels_yx` (Y, X), if given, are the labels the tiles carry in place of the segment's own ink labels
    (fine-tuning's training labels, which may hold an unknown value besides 0 and 1).
    """

    def __init__(
        self,
        segment: Segment,
        settings: InputSettings,
        stride: int,
        min_mask_fraction: float = MOSTLY_PAPYRUS,
        min_ink_fraction: float = 0.0,
        region_yx: np.ndarray | None = None,
        transform=None,
        origins: np.ndarray | None = None,
        labels_yx: np.ndarray | None = None,
    ) -> None:
        self.segment = segment
        self.labels_yx = segment.inklabels if labels_yx is None else labels_yx
        self.tile_size = settings.tile_size
        check_voxel_dtype(segment, settings)
        self.window = DepthWindow(segment.shape[0], settings)
        if origins is None:
            origins = tile_origins(segment, self.tile_size, stride, min_mask_fraction, min_ink_fraction, region_yx)
        self.origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, index: int) -> dict:
        y, x = (int(value) for value in self.origins[index])
        volume = self.window.read(self.segment, y, x, self.tile_size)
        label = None
        if self.labels_yx is not None:
            label = self.labels_yx[y : y + self.tile_size, x : x + self.tile_size].astype(np.float32)
        if self.transform is not None:
            volume, label = self.transform(volume, label)
        item = {"volume": torch.from_numpy(np.ascontiguousarray(volume)).unsqueeze(0), "origin": torch.tensor([y, x])}
        if label is not None:
            item["label"] = torch.from_numpy(np.ascontiguousarray(label))
        return item
