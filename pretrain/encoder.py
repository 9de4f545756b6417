"""Sparse 3D layers and the dense → sparse converter behind SparK-3D's encoder.

As in SparK, the CNN runs densely on the masked volume, and every conv and pool output is
multiplied by the active mask upsampled to that layer's resolution, so masked voxels stay exactly
zero all the way down; sparse BatchNorm normalises with statistics of the active voxels only. The
result equals running the CNN on the visible voxels alone, without a sparse-convolution library.

The active mask is not a module-level global (SparK's `_cur_active`): a `MaskContext` owned by the
`SparseEncoder` is shared by reference with every sparse layer, and the encoder sets it only for the
duration of its forward.
"""
import contextlib
from typing import Optional

import torch
from torch import nn

from pretrain.models.resnet3d import ResNet3d


def upsample_active(active_b1dhw: torch.Tensor, size_dhw: tuple[int, int, int]) -> torch.Tensor:
    """Repeat each coarse mask cell to fill `size_dhw`; factors differ in depth and in space.

    (B, 1, d, h, w) bool → (B, 1, D, H, W) bool, with D = d·k_d etc.
    """
    grid_dhw = active_b1dhw.shape[2:]
    for axis, (size, cells) in enumerate(zip(size_dhw, grid_dhw)):
        if size % cells != 0:
            raise ValueError(
                f"feature map size {tuple(size_dhw)} is not a whole multiple of the mask grid {tuple(grid_dhw)}"
            )
        active_b1dhw = active_b1dhw.repeat_interleave(size // cells, dim=2 + axis)
    return active_b1dhw


class MaskContext:
    """The active mask (B, 1, d, h, w) of the forward pass in progress, shared by sparse layers."""

    def __init__(self):
        self.active_b1dhw: Optional[torch.Tensor] = None

    @contextlib.contextmanager
    def use(self, active_b1dhw: torch.Tensor):
        """Set the mask for a `with` block and clear it afterwards, even on error, so a stale mask
        can never be applied to a later batch."""
        self.active_b1dhw = active_b1dhw
        try:
            yield
        finally:
            self.active_b1dhw = None

    def active_like(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        """The mask upsampled to the size of `x_bcdhw`: (B, 1, D, H, W) bool."""
        if self.active_b1dhw is None:
            raise RuntimeError("a sparse layer ran with no active mask: call it through SparseEncoder.forward")
        return upsample_active(self.active_b1dhw, x_bcdhw.shape[2:])


class SparseConv3d(nn.Conv3d):
    """Conv3d whose output is zero at masked positions."""

    mask_context: MaskContext

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        out_bcdhw = super().forward(x_bcdhw)
        # In place is safe: the conv's backward needs its input and weight, not its output.
        return out_bcdhw.mul_(self.mask_context.active_like(out_bcdhw))


class SparseMaxPool3d(nn.MaxPool3d):
    """MaxPool3d whose output is zero at masked positions."""

    mask_context: MaskContext

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        out_bcdhw = super().forward(x_bcdhw)
        # In place is safe: max-pool's backward needs its input and the argmax indices only.
        return out_bcdhw.mul_(self.mask_context.active_like(out_bcdhw))


class SparseBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d over active voxels only.

    The same statistics as gathering the active voxels (as SparseSyncBatchNorm3d does), computed as
    masked sums: mean = Σx / n and var = Σx² / n − mean² over active voxels, then one affine map times
    the mask. Gathering into a channels-last copy and scattering back cost 1.5–4.7× more on CPU.
    Statistics are taken in float32 so that bf16 autocast cannot spoil the variance.
    """

    mask_context: MaskContext

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        active_b1dhw = self.mask_context.active_like(x_bcdhw).to(x_bcdhw.dtype)
        x_bcdhw = x_bcdhw * active_b1dhw  # whatever masked voxels hold must not reach the statistics
        if self.training or not self.track_running_stats:
            reduce_dims = (0, 2, 3, 4)
            x_float = x_bcdhw.float()
            count = active_b1dhw.float().sum()  # active voxels over the batch (the same for every channel)
            mean_c = x_float.sum(reduce_dims) / count
            variance_c = (x_float.square().sum(reduce_dims) / count - mean_c.square()).clamp(min=0)
            if self.training and self.track_running_stats:
                self._update_running_statistics(mean_c.detach(), variance_c.detach(), count)
        else:
            mean_c, variance_c = self.running_mean, self.running_var
        scale_c = torch.rsqrt(variance_c + self.eps)
        if self.affine:
            scale_c = scale_c * self.weight
        shift_c = -mean_c * scale_c + (self.bias if self.affine else 0)
        out_bcdhw = x_bcdhw * scale_c.to(x_bcdhw.dtype)[None, :, None, None, None] + shift_c.to(x_bcdhw.dtype)[
            None, :, None, None, None]
        return out_bcdhw * active_b1dhw

    @torch.no_grad()
    def _update_running_statistics(self, mean_c: torch.Tensor, variance_c: torch.Tensor, count: torch.Tensor) -> None:
        """As torch's BatchNorm: momentum (or a cumulative average when momentum is None), unbiased variance."""
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased_variance_c = variance_c * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(mean_c.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_variance_c.to(self.running_var.dtype), alpha=momentum)


class SparseSyncBatchNorm3d(nn.SyncBatchNorm):
    """SyncBatchNorm over active voxels only (statistics all-reduced across processes).

    Active voxels are gathered into (N, C) and passed through SyncBatchNorm's own forward as
    (N, C, 1, 1, 1), so its all-reduce, momentum and eval mode behave exactly as in torch, but over
    active voxels only.
    """

    mask_context: MaskContext

    def forward(self, x_bcdhw: torch.Tensor) -> torch.Tensor:
        active_bdhw = self.mask_context.active_like(x_bcdhw)[:, 0]
        x_bdhwc = x_bcdhw.permute(0, 2, 3, 4, 1)
        active_nc = x_bdhwc[active_bdhw]  # (N, C), N = active voxels over the batch
        normalised_nc = super().forward(active_nc[:, :, None, None, None]).flatten(1)
        out_bdhwc = torch.zeros_like(x_bdhwc)
        out_bdhwc[active_bdhw] = normalised_nc
        return out_bdhwc.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W)


def _factory_kwargs(module: nn.Module) -> dict:
    tensor = next(iter(module.state_dict().values()), None)
    if tensor is None:
        return {}
    return {"device": tensor.device, "dtype": tensor.dtype if tensor.is_floating_point() else None}


def _sparse_twin(module: nn.Module, mask_context: MaskContext, sync_batchnorm: bool) -> Optional[nn.Module]:
    """The sparse layer that replaces `module`, or None if `module` needs no replacement."""
    if isinstance(module, (SparseConv3d, SparseMaxPool3d, SparseBatchNorm3d, SparseSyncBatchNorm3d)):
        raise TypeError(f"{type(module).__name__} is already sparse: convert a dense model once")
    if isinstance(module, nn.Conv3d):
        sparse = SparseConv3d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode, **_factory_kwargs(module),
        )
    elif isinstance(module, nn.MaxPool3d):
        sparse = SparseMaxPool3d(
            module.kernel_size, module.stride, module.padding, module.dilation, module.return_indices,
            module.ceil_mode,
        )
    elif isinstance(module, (nn.BatchNorm3d, nn.SyncBatchNorm)):
        batchnorm_class = SparseSyncBatchNorm3d if sync_batchnorm else SparseBatchNorm3d
        sparse = batchnorm_class(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            **_factory_kwargs(module),
        )
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.modules.pooling._AvgPoolNd,
                             nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)):
        # Left dense, such a layer would write non-zero values (a BN bias, a border) into masked
        # voxels and leak them to the visible ones: refuse rather than pretrain on a leak.
        raise TypeError(f"no sparse version of {type(module).__name__}; the sparse encoder supports "
                        "Conv3d, MaxPool3d and BatchNorm3d/SyncBatchNorm")
    else:
        return None
    sparse.load_state_dict(module.state_dict())
    for sparse_parameter, dense_parameter in zip(sparse.parameters(), module.parameters()):
        sparse_parameter.requires_grad_(dense_parameter.requires_grad)
    sparse.train(module.training)
    sparse.mask_context = mask_context
    return sparse


def dense_model_to_sparse(module: nn.Module, mask_context: MaskContext, sync_batchnorm: bool = False) -> nn.Module:
    """Swap every Conv3d, MaxPool3d and BatchNorm3d in `module` for its sparse twin, recursively and
    in place, keeping module names and copying weights and buffers, so the state_dict keys of the
    result are exactly those of the dense model. Returns the converted module (`module` itself
    unless `module` is a single layer)."""
    sparse = _sparse_twin(module, mask_context, sync_batchnorm)
    if sparse is not None:
        return sparse
    for name, child in module.named_children():
        setattr(module, name, dense_model_to_sparse(child, mask_context, sync_batchnorm))
    return module


class SparseEncoder(nn.Module):
    """A dense `ResNet3d` converted in place to run on the active voxels only.

    `self.encoder` keeps the dense model's module names: its `state_dict()` loads strictly into a
    fresh dense `ResNet3d`, which is how the encoder-only checkpoint is written.
    """

    def __init__(self, dense_encoder: ResNet3d, sync_batchnorm: bool = False):
        super().__init__()
        if getattr(dense_encoder, "fc", None) is not None:
            # The head would get no gradient (DDP fails on unused parameters) and its pooling
            # has no sparse version.
            raise ValueError("SparseEncoder needs a headless encoder (num_classes=0); this one has an fc layer")
        self.sync_batchnorm = sync_batchnorm
        self.mask_context = MaskContext()
        self.encoder = dense_model_to_sparse(dense_encoder, self.mask_context, sync_batchnorm)

    def get_downsample_ratio(self) -> tuple[int, int, int]:
        return self.encoder.get_downsample_ratio()

    def get_feature_map_channels(self) -> list[int]:
        return self.encoder.get_feature_map_channels()

    def forward(self, x_bcdhw: torch.Tensor, active_b1dhw: torch.Tensor) -> list[torch.Tensor]:
        """x (B, C, D, H, W); active (B, 1, d, h, w) bool on the layer4 grid (d = D / ratio_D, ...).

        Returns the 4 stage maps, each exactly zero outside the active region. Values of `x` at
        masked voxels are ignored: the input is masked here too, so the stem conv cannot read them.
        """
        x_bcdhw = x_bcdhw * upsample_active(active_b1dhw, x_bcdhw.shape[2:])
        with self.mask_context.use(active_b1dhw):
            return self.encoder(x_bcdhw, hierarchical=True)
