"""VICReg on two views of a tile: the second pretraining method (as in the "Vesuvius Pretraining" write-up).

Each view is standardised (zero mean, unit variance), encoded by the same 3D ResNet, average-pooled into an embedding and
expanded by a projector MLP. The loss (Bardes, Ponce & LeCun 2022) on the projector outputs z1, z2 (B, E):

    invariance  = mean((z1 - z2)²)
    variance    = ½ Σ_views mean_e relu(1 - sqrt(var_b(z_e) + ε))
    covariance  = ½ Σ_views Σ_{e≠f} cov(z)_{ef}² / E
    loss        = λ·invariance + μ·variance + ν·covariance       (λ = μ = 25, ν = 1)

Why an own loss rather than `lightly`'s: lightly pulls in torchvision's C++ ops and a dozen packages for
ten lines of arithmetic; tests check these lines against the formulas. Under torchrun, embeddings are
gathered across processes (with gradients) so the variance and covariance see the global batch.

The standardisation runs inside the model, after the augmentations (noise, blur and dropout are defined on
range-scaled voxels), with the tile reader's "zscore" formula: a VICReg run records "zscore" as its input
normalisation, so fine-tuning and evaluation feed its encoder what it was trained on.
"""
import dataclasses

import torch
import torch.distributed.nn
from torch import nn

from pretrain import dist
from pretrain.data.patches import ZSCORE_EPSILON, InputSettings
from pretrain.data.views import TwoViewDataset
from pretrain.methods import Method
from pretrain.models.resnet3d import ResNet3d

VARIANCE_EPSILON = 1e-4


def off_diagonal(matrix_ee: torch.Tensor) -> torch.Tensor:
    """The E·(E-1) off-diagonal entries of a square matrix, flattened."""
    size = matrix_ee.shape[0]
    return matrix_ee.flatten()[:-1].view(size - 1, size + 1)[:, 1:].flatten()


def vicreg_terms(z1_be: torch.Tensor, z2_be: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three VICReg terms (unweighted) for projector outputs of two views, (B, E) each."""
    batch, dims = z1_be.shape
    invariance = nn.functional.mse_loss(z1_be, z2_be)
    variance, covariance = 0.0, 0.0
    for z_be in (z1_be, z2_be):
        centred_be = z_be - z_be.mean(dim=0)
        std_e = torch.sqrt(centred_be.var(dim=0) + VARIANCE_EPSILON)
        variance = variance + torch.relu(1 - std_e).mean() / 2
        covariance_ee = centred_be.T @ centred_be / (batch - 1)
        covariance = covariance + off_diagonal(covariance_ee).pow(2).sum() / dims / 2
    return {"invariance": invariance, "variance": variance, "covariance": covariance}


def standardize(view_bcdhw: torch.Tensor) -> torch.Tensor:
    """Each view (B, 1, D, H, W) to zero mean and unit variance over its voxels: the formula of the tile reader's
    "zscore" normalisation (pretrain.data.patches.normalize_patch), so both give the encoder the same input."""
    mean_b1111 = view_bcdhw.mean(dim=(1, 2, 3, 4), keepdim=True)
    std_b1111 = view_bcdhw.std(dim=(1, 2, 3, 4), keepdim=True, correction=0)
    return (view_bcdhw - mean_b1111) / (std_b1111 + ZSCORE_EPSILON)


def projector(in_features: int, sizes: list[int]) -> nn.Sequential:
    """Expander MLP: Linear-BN-ReLU blocks, then a plain Linear (as VICReg)."""
    layers, width = [], in_features
    for size in sizes[:-1]:
        layers += [nn.Linear(width, size), nn.BatchNorm1d(size), nn.ReLU(inplace=True)]
        width = size
    layers.append(nn.Linear(width, sizes[-1]))
    return nn.Sequential(*layers)


class VICReg(nn.Module):
    def __init__(self, encoder: ResNet3d, projector_sizes: list[int], invariance_weight: float = 25.0,
                 variance_weight: float = 25.0, covariance_weight: float = 1.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector(encoder.get_feature_map_channels()[-1], projector_sizes)
        self.weights = {"invariance": invariance_weight, "variance": variance_weight, "covariance": covariance_weight}

    def embed(self, view_bcdhw: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) → pooled stage-4 embedding (B, C)."""
        stage4_bcdhw = self.encoder(standardize(view_bcdhw), hierarchical=True)[-1]
        return stage4_bcdhw.mean(dim=(2, 3, 4))

    def forward(self, view1_bcdhw: torch.Tensor, view2_bcdhw: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Two views (B, 1, D, H, W) → (loss, {terms, embedding_std}) for logging."""
        embedding1_bc, embedding2_bc = self.embed(view1_bcdhw), self.embed(view2_bcdhw)
        z1_be, z2_be = self.projector(embedding1_bc), self.projector(embedding2_bc)
        if dist.is_distributed():
            z1_be = torch.cat(torch.distributed.nn.all_gather(z1_be))
            z2_be = torch.cat(torch.distributed.nn.all_gather(z2_be))
        terms = vicreg_terms(z1_be, z2_be)
        loss = sum(self.weights[name] * value for name, value in terms.items())
        details = {name: value.detach() for name, value in terms.items()}
        # The collapse monitor: the mean per-dimension standard deviation of the encoder's embeddings.
        details["embedding_std"] = embedding1_bc.detach().std(dim=0).mean()
        return loss, details


class VICRegMethod(Method):
    """Each sample is two augmented views of one crop, (1, D, T, T) each; the model standardises and embeds both."""

    name = "vicreg"
    title = "VICReg pretraining"
    checkpoint_part = "withprojector_vicreg"
    encoder_prefix = "encoder."
    image_tag = "views/view1_view2"
    dataset_class = TwoViewDataset

    def problems(self, args) -> list[str]:
        problems = []
        if args.normalization == "clip":
            problems.append("normalization 'clip' does not fit method 'vicreg': VICReg standardises every view, so "
                            "its encoder would see a scaling no tile reader gives; use 'range' or 'zscore'")
        if args.bs < 2:
            problems.append("VICReg needs bs ≥ 2: its variance and covariance are taken over the batch")
        return problems

    def input_settings(self, reader_settings: InputSettings) -> InputSettings:
        # The encoder sees every view standardised (`standardize`, the reader's "zscore" formula), whatever the
        # reader's scaling. Files written before VICReg recorded this name the reader's "range".
        return dataclasses.replace(reader_settings, normalization="zscore")

    def build_model(self, args, encoder: ResNet3d, sync_batchnorm: bool) -> VICReg:
        if sync_batchnorm:
            encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
        return VICReg(encoder, [int(width) for width in args.projector.split("-")], *args.vicreg_weights)

    def training_step(self, model, batch, device, show):
        view1_bcdhw, view2_bcdhw = (view.to(device, non_blocking=True) for view in batch)
        loss, details = model(view1_bcdhw, view2_bcdhw)
        scalars = {f"vicreg__{name}": float(value) for name, value in details.items()}
        return loss, scalars, [view1_bcdhw, view2_bcdhw] if show else None


METHOD = VICRegMethod()
