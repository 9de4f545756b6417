"""Two augmented views of one tile, for VICReg.

As the VICReg write-up for scroll segments does: each view is taken with its own z-translation (a depth
offset drawn from {0, 1, 1, 2} layers) and a small pixel offset (from {0, 0, 0, 5, 10} in y and in x), then
Kaggle-style 2D augmentations run independently per view. They are applied to the layer stack as channels,
so every layer of a view gets the same flip, rotation and warp.
"""
import albumentations
import numpy as np
import torch

from pretrain.data.patches import RandomPatchDataset

DEPTH_OFFSETS = (0, 1, 1, 2)
PIXEL_OFFSETS = (0, 0, 0, 5, 10)


def view_augmentations() -> albumentations.Compose:
    return albumentations.Compose([
        albumentations.HorizontalFlip(),
        albumentations.VerticalFlip(),
        albumentations.RandomRotate90(),
        albumentations.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), rotate=(-45, 45), p=0.75),
        albumentations.OneOf([
            albumentations.GaussNoise(std_range=(0.02, 0.08)),
            albumentations.GaussianBlur(blur_limit=(3, 5)),
            albumentations.MotionBlur(),
        ], p=0.4),
        albumentations.GridDistortion(p=0.3),
        albumentations.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.1, 0.25),
                                     hole_width_range=(0.1, 0.25), p=0.5),
    ])


class TwoViewDataset(RandomPatchDataset):
    """Pairs of (1, depth, tile, tile) float32 views of the same random tile, keyed by (epoch, index) as
    RandomPatchDataset.

    Both views are cut from one block: the usual window with `max(DEPTH_OFFSETS)` more layers below it (the
    segment must have them), so each view's window starts 0 to `max(DEPTH_OFFSETS)` layers below the usual one;
    `augment=False` leaves only the z and pixel offsets (for checking them).
    """

    def __init__(self, *args, augment: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augment = view_augmentations() if augment else None
        self.max_depth_offset = max(DEPTH_OFFSETS)
        self.max_pixel_offset = max(PIXEL_OFFSETS)
        for segment, window in zip(self.segments, self.windows):
            if min(segment.shape[1:]) < self.tile_size + self.max_pixel_offset:
                raise ValueError(f"segment {segment.name} (Y, X) = {segment.shape[1:]} is too small for tiles of "
                                 f"{self.tile_size} plus pixel offsets of up to {self.max_pixel_offset}")
            layers = window.layers
            if not window.settings.follow_surface and layers.stop + self.max_depth_offset > segment.shape[0]:
                raise ValueError(f"the depth window {layers.start}..{layers.stop - 1} leaves no room for z-offsets of up "
                                 f"to {self.max_depth_offset} layers in segment {segment.name} ({segment.shape[0]} layers)")

    def view_offsets(self, epoch: int, index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(dz, dy, dx) of each view relative to the tile's base window, for sample `index` of `epoch`."""
        rng = np.random.default_rng((self.seed, epoch, index, 1))
        return tuple(
            (int(rng.choice(DEPTH_OFFSETS)), int(rng.choice(PIXEL_OFFSETS)), int(rng.choice(PIXEL_OFFSETS)))
            for _ in range(2)
        )

    def base_position(self, epoch: int, index: int) -> tuple[int, int, int]:
        """(segment index, y, x) of the block both views are cut from."""
        segment_index, y, x = self.sample_position(epoch, index)
        height, width = self.segments[segment_index].shape[1:]
        y = min(y, height - self.tile_size - self.max_pixel_offset)
        x = min(x, width - self.tile_size - self.max_pixel_offset)
        return segment_index, max(y, 0), max(x, 0)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        segment_index, y, x = self.base_position(epoch, index)
        window = self.windows[segment_index]
        block = window.read(self.segments[segment_index], y, x, self.tile_size + self.max_pixel_offset,
                            extra_layers=self.max_depth_offset)  # (D + 2, T + 10, T + 10)
        views = []
        for view_number, (dz, dy, dx) in enumerate(self.view_offsets(epoch, index)):
            view_dhw = block[dz : dz + window.depth, dy : dy + self.tile_size, dx : dx + self.tile_size]
            if self.augment is not None:
                seed = np.random.default_rng((self.seed, epoch, index, 2 + view_number)).integers(2**32)
                self.augment.set_random_seed(int(seed))  # the same views after a resume or with other workers
                view_dhw = self.augment(image=np.ascontiguousarray(view_dhw.transpose(1, 2, 0)))["image"].transpose(2, 0, 1)
            views.append(torch.from_numpy(np.ascontiguousarray(view_dhw)).unsqueeze(0))
        return views[0], views[1]
