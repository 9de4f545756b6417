"""Contracts of the dense 3D ResNet, its registry, and the sparse encoder built from it."""
import copy

import pytest
import torch
from torch import nn

from pretrain.encoder import (
    MaskContext,
    SparseBatchNorm3d,
    SparseConv3d,
    SparseEncoder,
    SparseMaxPool3d,
    upsample_active,
)
from pretrain.models import ENCODER_NAMES, build_encoder

TINY = "resnet18_3d_tiny"


def random_active(batch_size, grid, generator, keep_probability=0.5):
    """Random (B, 1, d, h, w) mask with at least one active cell per sample."""
    active = torch.rand(batch_size, 1, *grid, generator=generator) < keep_probability
    active[:, :, 0, 0, 0] = True
    return active


def test_stage_shapes_follow_the_ratio_and_channel_contract():
    torch.manual_seed(0)
    encoder = build_encoder(TINY)
    x_bcdhw = torch.randn(2, 1, 16, 64, 64)
    feature_maps = encoder(x_bcdhw)
    assert encoder.get_downsample_ratio() == (8, 32, 32)
    assert len(feature_maps) == 4
    ratio_d, ratio_h, ratio_w = encoder.get_downsample_ratio()
    for stage, (feature_map, channels) in enumerate(zip(feature_maps, encoder.get_feature_map_channels())):
        # Each stage halves D, H, W from the last one; layer1 is the stem's (1, 4, 4).
        scale = 2 ** (3 - stage)
        assert feature_map.shape == (2, channels, 16 // ratio_d * scale, 64 // ratio_h * scale, 64 // ratio_w * scale)
    assert encoder(x_bcdhw, hierarchical=False).shape == feature_maps[-1].shape


@pytest.mark.parametrize(
    "name, channels",
    [
        ("resnet18_3d", [64, 128, 256, 512]),
        ("resnet34_3d", [64, 128, 256, 512]),
        ("resnet50_3d", [256, 512, 1024, 2048]),
        ("resnet50_3d_narrow", [64, 128, 256, 512]),
        ("resnet18_3d_tiny", [8, 16, 32, 64]),
    ],
)
def test_registry_channel_counts(name, channels):
    with torch.device("meta"):  # shapes only: no memory, no init cost for the big nets
        encoder = build_encoder(name)
    assert encoder.get_feature_map_channels() == channels
    assert encoder.get_downsample_ratio() == (8, 32, 32)


def test_registry_lists_every_name_and_rejects_unknown():
    assert set(ENCODER_NAMES) == {"resnet18_3d", "resnet34_3d", "resnet50_3d", "resnet50_3d_narrow", TINY}
    with pytest.raises(ValueError, match="resnet50_3d"):
        build_encoder("resnet51_3d")


def test_backward_reaches_the_stem():
    encoder = build_encoder(TINY)
    sum(feature_map.mean() for feature_map in encoder(torch.randn(2, 1, 16, 64, 64))).backward()
    assert encoder.conv1.weight.grad is not None and encoder.conv1.weight.grad.abs().sum() > 0


def test_module_names_match_hara_checkpoints():
    with torch.device("meta"):
        encoder = build_encoder("resnet50_3d")
    names = dict(encoder.named_modules())
    for name in ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv3", "layer1.0.bn3",
                 "layer1.0.downsample.0", "layer1.0.downsample.1", "layer4.2.conv2"]:
        assert name in names
    assert isinstance(names["layer1.0.downsample.0"], nn.Conv3d) and names["layer1.0.downsample.0"].bias is None
    assert encoder.conv1.kernel_size == (7, 7, 7) and encoder.conv1.stride == (1, 2, 2)
    assert not any(name.startswith("fc") for name in names)
    assert not any(key.startswith("fc") for key in encoder.state_dict())


@pytest.mark.parametrize("train_mode", [True, False])
def test_all_active_sparse_encoder_equals_dense(train_mode):
    torch.manual_seed(0)
    dense = build_encoder(TINY)
    with torch.no_grad():  # non-trivial running stats, so eval mode is really checked
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    sparse = SparseEncoder(copy.deepcopy(dense))
    dense.train(train_mode)
    sparse.train(train_mode)
    x_bcdhw = torch.randn(2, 1, 16, 64, 64)
    active_b1dhw = torch.ones(2, 1, 2, 2, 2, dtype=torch.bool)
    for dense_map, sparse_map in zip(dense(x_bcdhw), sparse(x_bcdhw, active_b1dhw)):
        torch.testing.assert_close(sparse_map, dense_map, rtol=1e-4, atol=1e-4)
    for key, dense_value in dense.state_dict().items():  # running stats updated alike
        torch.testing.assert_close(sparse.encoder.state_dict()[key], dense_value, rtol=1e-4, atol=1e-5)


def test_masked_positions_are_exactly_zero_and_masked_input_is_ignored():
    generator = torch.Generator().manual_seed(1)
    sparse = SparseEncoder(build_encoder(TINY))
    x_bcdhw = torch.randn(2, 1, 16, 64, 64, generator=generator)
    active_b1dhw = random_active(2, (2, 2, 2), generator)
    feature_maps = sparse(x_bcdhw, active_b1dhw)
    for feature_map in feature_maps:
        masked = ~upsample_active(active_b1dhw, feature_map.shape[2:])
        assert torch.all(feature_map.masked_select(masked) == 0)
        assert feature_map.abs().sum() > 0

    # Garbage in masked input voxels must not reach any output (eval mode: BN stats are fixed).
    sparse.eval()
    clean_maps = sparse(x_bcdhw, active_b1dhw)
    garbage = torch.where(upsample_active(active_b1dhw, x_bcdhw.shape[2:]), x_bcdhw, 1e3 * torch.randn_like(x_bcdhw))
    for clean_map, garbage_map in zip(clean_maps, sparse(garbage, active_b1dhw)):
        torch.testing.assert_close(garbage_map, clean_map)


def test_sparse_conv_and_pool_zero_their_own_masked_outputs():
    # In a ResNet the BN after each conv would hide a conv that forgot to mask: test layers alone.
    generator = torch.Generator().manual_seed(3)
    context = MaskContext()
    conv = SparseConv3d(2, 3, kernel_size=3, stride=(1, 2, 2), padding=1)
    pool = SparseMaxPool3d(kernel_size=3, stride=(1, 2, 2), padding=1)
    for layer in (conv, pool):
        layer.mask_context = context
    x_bcdhw = torch.randn(2, 2, 4, 16, 16, generator=generator)
    active_b1dhw = random_active(2, (2, 2, 2), generator)
    with context.use(active_b1dhw):
        outputs = [conv(x_bcdhw), pool(x_bcdhw)]
    assert context.active_b1dhw is None
    for out_bcdhw in outputs:
        assert out_bcdhw.shape[2:] == (4, 8, 8)
        assert torch.all(out_bcdhw.masked_select(~upsample_active(active_b1dhw, out_bcdhw.shape[2:])) == 0)
        assert out_bcdhw.abs().sum() > 0


def test_sparse_batchnorm_uses_active_voxels_only():
    generator = torch.Generator().manual_seed(2)
    channels = 4
    x_bcdhw = torch.randn(2, channels, 4, 8, 8, generator=generator) * 3 + 1
    active_b1dhw = random_active(2, (2, 2, 2), generator)
    active_bdhw = upsample_active(active_b1dhw, x_bcdhw.shape[2:])[:, 0]
    # Garbage in masked voxels: a dense BN would see it, the sparse one must not.
    x_bcdhw = torch.where(active_bdhw[:, None], x_bcdhw, torch.full_like(x_bcdhw, 50.0))

    context = MaskContext()
    sparse_bn = SparseBatchNorm3d(channels)
    sparse_bn.mask_context = context
    reference_bn = nn.BatchNorm1d(channels)
    dense_bn = nn.BatchNorm3d(channels)
    for module in (sparse_bn, reference_bn, dense_bn):
        nn.init.uniform_(module.weight, 0.5, 1.5)
        nn.init.uniform_(module.bias, -0.5, 0.5)
    reference_bn.load_state_dict(sparse_bn.state_dict())
    dense_bn.load_state_dict(sparse_bn.state_dict())

    with context.use(active_b1dhw):
        out_bcdhw = sparse_bn(x_bcdhw)
    active_nc = x_bcdhw.permute(0, 2, 3, 4, 1)[active_bdhw]
    expected_nc = reference_bn(active_nc)
    torch.testing.assert_close(out_bcdhw.permute(0, 2, 3, 4, 1)[active_bdhw], expected_nc)
    assert torch.all(out_bcdhw.permute(0, 2, 3, 4, 1)[~active_bdhw] == 0)
    torch.testing.assert_close(sparse_bn.running_mean, reference_bn.running_mean)
    torch.testing.assert_close(sparse_bn.running_var, reference_bn.running_var)
    assert sparse_bn.num_batches_tracked.item() == 1

    dense_bn(x_bcdhw)
    assert not torch.allclose(dense_bn.running_mean, sparse_bn.running_mean)

    sparse_bn.eval()
    reference_bn.eval()
    with context.use(active_b1dhw):
        out_bcdhw = sparse_bn(x_bcdhw)
    torch.testing.assert_close(out_bcdhw.permute(0, 2, 3, 4, 1)[active_bdhw], reference_bn(active_nc))


def test_sparse_batchnorm_gradients_match_batchnorm_on_gathered_active_voxels():
    generator = torch.Generator().manual_seed(3)
    x_bcdhw = torch.randn(2, 3, 4, 8, 8, generator=generator)
    active_b1dhw = random_active(2, (2, 2, 2), generator)
    active_bdhw = upsample_active(active_b1dhw, x_bcdhw.shape[2:])[:, 0]
    upstream_bcdhw = torch.randn(x_bcdhw.shape, generator=generator)

    sparse_bn, reference_bn = SparseBatchNorm3d(3), nn.BatchNorm1d(3)
    sparse_bn.mask_context = MaskContext()
    sparse_input = x_bcdhw.clone().requires_grad_()
    with sparse_bn.mask_context.use(active_b1dhw):
        (sparse_bn(sparse_input) * upstream_bcdhw).sum().backward()
    reference_input = x_bcdhw.clone().requires_grad_()
    active_nc = reference_input.permute(0, 2, 3, 4, 1)[active_bdhw]
    (reference_bn(active_nc) * upstream_bcdhw.permute(0, 2, 3, 4, 1)[active_bdhw]).sum().backward()

    torch.testing.assert_close(sparse_input.grad, reference_input.grad)
    torch.testing.assert_close(sparse_bn.weight.grad, reference_bn.weight.grad)
    torch.testing.assert_close(sparse_bn.bias.grad, reference_bn.bias.grad)


def test_sparse_layer_outside_the_encoder_forward_fails_clearly():
    sparse = SparseEncoder(build_encoder(TINY))
    with pytest.raises(RuntimeError, match="no active mask"):
        sparse.encoder(torch.randn(1, 1, 16, 64, 64))


def test_sparse_state_dict_loads_strictly_into_a_dense_encoder():
    dense = build_encoder(TINY)
    dense_keys = list(dense.state_dict())
    sparse = SparseEncoder(dense)
    sparse(torch.randn(2, 1, 16, 64, 64), torch.ones(2, 1, 2, 2, 2, dtype=torch.bool))  # move BN stats
    assert list(sparse.encoder.state_dict()) == dense_keys
    fresh = build_encoder(TINY)
    fresh.load_state_dict(sparse.encoder.state_dict(), strict=True)
    for key, value in sparse.encoder.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_sparse_encoder_rejects_a_model_with_a_head():
    from pretrain.models.resnet3d import BasicBlock3d, ResNet3d

    with pytest.raises(ValueError, match="headless"):
        SparseEncoder(ResNet3d(BasicBlock3d, (1, 1, 1, 1), width=0.125, num_classes=3))
