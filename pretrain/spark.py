"""SparK-3D: 3D cell masking, densify, masked-cell reconstruction loss, visualisation tensors.

A cell is one voxel of the encoder's coarsest map: (D/d) × (H/h) × (W/w) input voxels, i.e. the
encoder's downsample ratio (8 × 32 × 32 for ResNet3d). Masking picks cells; the sparse encoder sees
only the visible ones; per stage, the densify step fills masked positions with a learnable mask
token and projects to the decoder's width; the decoder reconstructs the whole volume; the loss is
MSE against per-cell-normalised voxels, over masked cells only.
"""
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from pretrain.decoder import LightDecoder3d
from pretrain.encoder import MaskContext, SparseBatchNorm3d, SparseEncoder, SparseSyncBatchNorm3d, upsample_active
from pretrain.methods import Method

MASK_MODES = ("cell", "column")
DENSIFY_NORMS = ("bn", "none")
TARGETS = ("pixels", "texture")
CELL_NORM_EPS = 1e-6
TEXTURE_WINDOW = 5  # pixels; in-plane window of the texture energy (larger than the crackle, smaller than a stroke)


class ReconstructionVisuals(NamedTuple):
    """Tensors for TensorBoard, all (B, C, D, H, W) at input scale, detached."""

    target_bcdhw: torch.Tensor  # what masked cells reconstruct: the input, or its local contrast
    masked_bcdhw: torch.Tensor
    # Reconstruction in masked cells (de-normalised with each cell's target mean/std), target elsewhere.
    reconstruction_bcdhw: torch.Tensor


def split_into_cells(volume_bcdhw: torch.Tensor, cell_size: Sequence[int]) -> torch.Tensor:
    """(B, C, D, H, W) → (B, L, N): L = d·h·w cells in (d, h, w) order, N = C·cell voxels."""
    batch, channels, depth, height, width = volume_bcdhw.shape
    cell_d, cell_h, cell_w = cell_size
    grid_d, grid_h, grid_w = depth // cell_d, height // cell_h, width // cell_w
    cells = volume_bcdhw.reshape(batch, channels, grid_d, cell_d, grid_h, cell_h, grid_w, cell_w)
    cells = cells.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, d, h, w, C, cd, ch, cw)
    return cells.reshape(batch, grid_d * grid_h * grid_w, channels * cell_d * cell_h * cell_w)


def merge_cells(cells_bln: torch.Tensor, grid: Sequence[int], cell_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of `split_into_cells`: (B, L, N) → (B, C, D, H, W)."""
    grid_d, grid_h, grid_w = grid
    cell_d, cell_h, cell_w = cell_size
    batch = cells_bln.shape[0]
    cells = cells_bln.reshape(batch, grid_d, grid_h, grid_w, channels, cell_d, cell_h, cell_w)
    volume = cells.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, d, cd, h, ch, w, cw)
    return volume.reshape(batch, channels, grid_d * cell_d, grid_h * cell_h, grid_w * cell_w)


def cell_statistics(cells_bln: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell mean and std (population variance + eps under the root), each (B, L, 1)."""
    mean = cells_bln.mean(dim=-1, keepdim=True)
    variance = cells_bln.var(dim=-1, keepdim=True, correction=0)
    return mean, (variance + CELL_NORM_EPS).sqrt()


def local_contrast(volume_bcdhw: torch.Tensor, window: int = TEXTURE_WINDOW) -> torch.Tensor:
    """Local in-plane texture contrast, (B, C, D, H, W): per layer, the root mean square of
    (voxel − its window's mean) over a window × window neighbourhood.

    A hand-made texture descriptor as the reconstruction target, in the spirit of MaskFeat's HOG. On
    the demo segment, ink is 0.16% of the per-cell-normalised variance of the voxels but 3.0% of this
    map's (benchmarks/ink_signal.py): ink's crackle weighs more in it than in the voxels.
    """
    kernel, padding = (1, window, window), (0, window // 2, window // 2)
    local_mean = nn.functional.avg_pool3d(volume_bcdhw, kernel, stride=1, padding=padding, count_include_pad=False)
    squared_detail = (volume_bcdhw - local_mean).pow(2)
    local_energy = nn.functional.avg_pool3d(squared_detail, kernel, stride=1, padding=padding, count_include_pad=False)
    return local_energy.sqrt()


def masked_cell_loss(
    reconstruction_bcdhw: torch.Tensor,
    target_bcdhw: torch.Tensor,
    active_b1dhw: torch.Tensor,
    cell_size: Sequence[int],
) -> torch.Tensor:
    """MSE between the reconstruction and the per-cell-normalised target, averaged over masked cells.

    Visible cells do not enter the loss at all: the encoder saw them, so reconstructing them
    teaches nothing (SparK, MAE).
    """
    expected_grid = tuple(size // cell for size, cell in zip(target_bcdhw.shape[2:], cell_size))
    if tuple(active_b1dhw.shape[2:]) != expected_grid:
        raise ValueError(f"mask grid {tuple(active_b1dhw.shape[2:])} does not match target {tuple(target_bcdhw.shape)} "
                         f"in cells of {tuple(cell_size)}")
    target_cells = split_into_cells(target_bcdhw, cell_size)  # (B, L, N)
    mean, std = cell_statistics(target_cells)
    normalised_target = (target_cells - mean) / std
    reconstruction_cells = split_into_cells(reconstruction_bcdhw, cell_size)
    error_per_cell = (reconstruction_cells - normalised_target).pow(2).mean(dim=-1)  # (B, L)
    masked_bl = (~active_b1dhw).flatten(1).to(error_per_cell.dtype)
    return (error_per_cell * masked_bl).sum() / masked_bl.sum().clamp(min=1)


class SparK3d(nn.Module):
    """Sparse masked autoencoder on (B, C, depth, input_size, input_size) volumes."""

    def __init__(
        self,
        sparse_encoder: SparseEncoder,
        decoder: LightDecoder3d,
        input_size: int,
        depth: int,
        mask_ratio: float = 0.6,
        mask_mode: str = "cell",
        densify_norm: str = "bn",
        target: str = "pixels",
    ):
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if densify_norm not in DENSIFY_NORMS:
            raise ValueError(f"densify_norm must be one of {DENSIFY_NORMS}, got {densify_norm!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        ratio_d, ratio_h, ratio_w = sparse_encoder.get_downsample_ratio()
        if depth % ratio_d != 0 or input_size % ratio_h != 0 or input_size % ratio_w != 0:
            raise ValueError(f"depth={depth} and input_size={input_size} must be multiples of the encoder's "
                             f"downsample ratio (D, H, W) = {(ratio_d, ratio_h, ratio_w)}")
        self.grid = (depth // ratio_d, input_size // ratio_h, input_size // ratio_w)
        self.cell_size = (ratio_d, ratio_h, ratio_w)
        self.input_size, self.depth = input_size, depth
        self.mask_ratio, self.mask_mode = mask_ratio, mask_mode
        self.target = target
        self.num_keep = self._check_grid()

        if tuple(decoder.downsample_ratio) != self.cell_size:
            raise ValueError(f"decoder upsamples by {decoder.downsample_ratio}, "
                             f"encoder downsamples by {self.cell_size}")
        if decoder.in_channels != sparse_encoder.encoder.in_channels:
            raise ValueError(f"decoder reconstructs {decoder.in_channels} channels, encoder reads "
                             f"{sparse_encoder.encoder.in_channels}")
        encoder_channels = sparse_encoder.get_feature_map_channels()[::-1]  # coarsest first, as the decoder
        if len(encoder_channels) != len(decoder.skip_channels):
            raise ValueError(f"encoder has {len(encoder_channels)} stages, decoder takes {len(decoder.skip_channels)}")
        self.sparse_encoder = sparse_encoder
        self.decoder = decoder

        # Densify runs after the encoder's forward, so it has its own mask context.
        self.densify_mask_context = MaskContext()
        batchnorm_class = SparseSyncBatchNorm3d if sparse_encoder.sync_batchnorm else SparseBatchNorm3d
        self.densify_norms = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        self.densify_projections = nn.ModuleList()
        for stage, (encoder_width, decoder_width) in enumerate(zip(encoder_channels, decoder.skip_channels)):
            if densify_norm == "bn":
                norm = batchnorm_class(encoder_width)
                norm.mask_context = self.densify_mask_context
            else:
                norm = nn.Identity()
            self.densify_norms.append(norm)
            mask_token = nn.Parameter(torch.zeros(1, encoder_width, 1, 1, 1))
            nn.init.trunc_normal_(mask_token, std=0.02)
            self.mask_tokens.append(mask_token)
            # 1×1×1 at the coarsest map (as SparK); 3×3×3 elsewhere so the finer maps' mask tokens
            # are blended with their visible neighbours before the decoder sees them.
            kernel_size = 1 if stage == 0 else 3
            self.densify_projections.append(
                nn.Conv3d(encoder_width, decoder_width, kernel_size=kernel_size, padding=kernel_size // 2)
            )

    def _check_grid(self) -> int:
        """Number of cells (or columns) kept per sample; raises if the grid is too small to mask."""
        grid_d, grid_h, grid_w = self.grid
        if self.mask_mode == "cell":
            num_units = grid_d * grid_h * grid_w
            too_small = grid_d < 2 or grid_h < 2 or grid_w < 2
            need = "at least 2 cells in depth and 2×2 spatially"
        else:
            num_units = grid_h * grid_w
            too_small = grid_h < 2 or grid_w < 2
            need = "at least 2×2 cells spatially"
        num_keep = round(num_units * (1 - self.mask_ratio))
        if too_small or not 0 < num_keep < num_units:
            raise ValueError(
                f"depth={self.depth}, input_size={self.input_size} give a mask grid (d, h, w) = {self.grid} of "
                f"cells {self.cell_size}; '{self.mask_mode}' masking needs {need} and at least one visible and "
                f"one masked {'cell' if self.mask_mode == 'cell' else 'column'} at mask_ratio={self.mask_ratio} "
                f"(keeps {num_keep} of {num_units})"
            )
        return num_keep

    def mask(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Random active mask (B, 1, d, h, w) bool, True = visible. 'cell' keeps `num_keep` 3D cells
        per sample; 'column' (ScrollMAE) keeps `num_keep` (h, w) cells through all depth cells."""
        grid_d, grid_h, grid_w = self.grid
        num_units = grid_d * grid_h * grid_w if self.mask_mode == "cell" else grid_h * grid_w
        random_device = generator.device if generator is not None else device
        scores = torch.rand(batch_size, num_units, generator=generator, device=random_device)
        keep_indices = scores.argsort(dim=1)[:, : self.num_keep]
        active = torch.zeros(batch_size, num_units, dtype=torch.bool, device=random_device)
        active.scatter_(1, keep_indices, True)
        if self.mask_mode == "cell":
            active_b1dhw = active.reshape(batch_size, 1, grid_d, grid_h, grid_w)
        else:
            active_b1dhw = active.reshape(batch_size, 1, 1, grid_h, grid_w).repeat(1, 1, grid_d, 1, 1)
        return active_b1dhw.to(device)

    def densify(
        self, feature_maps_coarsest_first: Sequence[torch.Tensor], active_b1dhw: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per stage: sparse norm → mask token at masked positions → projection to the decoder width."""
        decoder_inputs = []
        with self.densify_mask_context.use(active_b1dhw):
            for stage, feature_bcdhw in enumerate(feature_maps_coarsest_first):
                feature_bcdhw = self.densify_norms[stage](feature_bcdhw)
                active_here = upsample_active(active_b1dhw, feature_bcdhw.shape[2:])  # (B, 1, d_i, h_i, w_i)
                mask_token = self.mask_tokens[stage].expand_as(feature_bcdhw)
                feature_bcdhw = torch.where(active_here, feature_bcdhw, mask_token)
                decoder_inputs.append(self.densify_projections[stage](feature_bcdhw))
        return decoder_inputs

    def forward(
        self,
        inp_bcdhw: torch.Tensor,
        active_b1dhw: Optional[torch.Tensor] = None,
        return_visuals: bool = False,
    ):
        """inp (B, C, depth, input_size, input_size) → loss (scalar), plus ReconstructionVisuals when
        `return_visuals`. `active_b1dhw` defaults to a fresh random mask."""
        expected = (self.depth, self.input_size, self.input_size)
        if tuple(inp_bcdhw.shape[2:]) != expected:
            raise ValueError(f"SparK3d was built for (D, H, W) = {expected}, got input {tuple(inp_bcdhw.shape)}")
        if active_b1dhw is None:
            active_b1dhw = self.mask(inp_bcdhw.shape[0], inp_bcdhw.device)
        active_full = upsample_active(active_b1dhw, inp_bcdhw.shape[2:])  # (B, 1, D, H, W)
        masked_bcdhw = inp_bcdhw * active_full

        feature_maps = self.sparse_encoder(masked_bcdhw, active_b1dhw)  # finest first
        decoder_inputs = self.densify(feature_maps[::-1], active_b1dhw)
        reconstruction_bcdhw = self.decoder(decoder_inputs)  # (B, C, D, H, W), per-cell-normalised scale
        target_bcdhw = inp_bcdhw if self.target == "pixels" else local_contrast(inp_bcdhw)
        loss = masked_cell_loss(reconstruction_bcdhw, target_bcdhw, active_b1dhw, self.cell_size)
        if not return_visuals:
            return loss

        with torch.no_grad():
            mean, std = cell_statistics(split_into_cells(target_bcdhw, self.cell_size))
            reconstruction_cells = split_into_cells(reconstruction_bcdhw, self.cell_size) * std + mean
            denormalised = merge_cells(reconstruction_cells, self.grid, self.cell_size, inp_bcdhw.shape[1])
            visuals = ReconstructionVisuals(
                target_bcdhw=target_bcdhw.detach(),
                masked_bcdhw=masked_bcdhw.detach(),
                reconstruction_bcdhw=torch.where(active_full, target_bcdhw, denormalised),
            )
        return loss, visuals


class SparKMethod(Method):
    """Each sample is one crop (1, D, T, T); the model masks it and reconstructs the masked cells."""

    name = "spark"
    title = "SparK pretraining"
    checkpoint_part = "withdecoder_spark"
    encoder_prefix = "sparse_encoder.encoder."
    image_tag = "reconstruction/input_masked_reconstruction"

    def build_model(self, args, encoder: nn.Module, sync_batchnorm: bool) -> SparK3d:
        sparse_encoder = SparseEncoder(encoder, sync_batchnorm=sync_batchnorm)
        decoder = LightDecoder3d(args.decoder_width, sparse_encoder.get_downsample_ratio(), sync_batchnorm=sync_batchnorm)
        return SparK3d(sparse_encoder, decoder, input_size=args.tile_size, depth=args.depth, mask_ratio=args.mask,
                       mask_mode=args.mask_mode, target=args.target)

    def training_step(self, model, batch, device, show):
        inp_bcdhw = batch.to(device, non_blocking=True)  # (B, 1, D, H, W)
        if not show:
            return model(inp_bcdhw), {}, None
        loss, visuals = model(inp_bcdhw, return_visuals=True)
        return loss, {}, list(visuals)

    def summary(self, model: SparK3d) -> str:
        return f"; grid {model.grid} cells"


METHOD = SparKMethod()
