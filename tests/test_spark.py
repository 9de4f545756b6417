"""Contracts of SparK-3D: masking, the masked-cell loss, forward/backward, visuals."""
import pytest
import torch

from pretrain.decoder import LightDecoder3d
from pretrain.encoder import SparseEncoder
from pretrain.models import build_encoder
from pretrain.spark import SparK3d, cell_statistics, local_contrast, masked_cell_loss, merge_cells, split_into_cells

TINY = "resnet18_3d_tiny"
CELL_SIZE = (8, 32, 32)


def build_spark(input_size=64, depth=16, mask_ratio=0.6, mask_mode="cell", target="pixels"):
    sparse_encoder = SparseEncoder(build_encoder(TINY))
    decoder = LightDecoder3d(width=32, downsample_ratio=sparse_encoder.get_downsample_ratio())
    return SparK3d(sparse_encoder, decoder, input_size, depth, mask_ratio=mask_ratio, mask_mode=mask_mode, target=target)


def test_cell_mask_keeps_the_intended_count_and_varies_across_depth():
    spark = build_spark(input_size=128, depth=32)  # grid (4, 4, 4)
    active_b1dhw = spark.mask(16, "cpu", torch.Generator().manual_seed(0))
    assert active_b1dhw.shape == (16, 1, 4, 4, 4) and active_b1dhw.dtype == torch.bool
    assert torch.all(active_b1dhw.flatten(1).sum(1) == round(64 * (1 - 0.6)))
    assert not torch.all(active_b1dhw == active_b1dhw[:, :, :1])  # not columns
    assert not torch.all(active_b1dhw == active_b1dhw[:1])  # not the same for every sample


def test_column_mask_is_constant_along_depth():
    spark = build_spark(input_size=128, depth=32, mask_mode="column")
    active_b1dhw = spark.mask(16, "cpu", torch.Generator().manual_seed(0))
    assert active_b1dhw.shape == (16, 1, 4, 4, 4)
    assert torch.all(active_b1dhw == active_b1dhw[:, :, :1])
    assert torch.all(active_b1dhw[:, :, 0].flatten(1).sum(1) == round(16 * (1 - 0.6)))


def test_mask_is_reproducible_with_a_generator():
    spark = build_spark()
    first = spark.mask(4, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(first, spark.mask(4, "cpu", torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    "input_size, depth, mask_mode, message",
    [
        (64, 8, "cell", "depth=8"),  # one cell in depth
        (32, 16, "cell", "input_size=32"),  # one cell spatially
        (32, 16, "column", "input_size=32"),
        (64, 12, "cell", "multiples"),  # not divisible by the depth ratio 8
    ],
)
def test_too_small_or_misaligned_grid_is_refused(input_size, depth, mask_mode, message):
    with pytest.raises(ValueError, match=message):
        build_spark(input_size=input_size, depth=depth, mask_mode=mask_mode)


def test_column_mode_accepts_a_single_depth_cell():
    assert build_spark(depth=8, mask_mode="column").grid == (1, 2, 2)


def test_split_and_merge_cells_are_inverse():
    volume = torch.randn(2, 1, 16, 64, 64)
    cells = split_into_cells(volume, CELL_SIZE)
    assert cells.shape == (2, 8, 8 * 32 * 32)
    # Cell 1 is (depth cell 0, row 0, column 1).
    assert torch.equal(cells[:, 1], volume[:, :, :8, :32, 32:].flatten(1))
    assert torch.equal(merge_cells(cells, (2, 2, 2), CELL_SIZE, 1), volume)


def make_loss_inputs():
    generator = torch.Generator().manual_seed(4)
    reconstruction = torch.randn(2, 1, 16, 64, 64, generator=generator)
    target = torch.randn(2, 1, 16, 64, 64, generator=generator) * 5 + 2
    active_b1dhw = torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool)
    active_b1dhw[:, :, 0, 0, 0] = True
    active_b1dhw[1, :, 1, 1, 1] = True
    return reconstruction, target, active_b1dhw


def test_loss_ignores_visible_cells_of_the_target():
    reconstruction, target, active_b1dhw = make_loss_inputs()
    loss = masked_cell_loss(reconstruction, target, active_b1dhw, CELL_SIZE)
    changed = target.clone()
    changed[:, :, :8, :32, :32] += 10 * torch.randn_like(changed[:, :, :8, :32, :32])  # visible in both samples
    torch.testing.assert_close(masked_cell_loss(reconstruction, changed, active_b1dhw, CELL_SIZE), loss)
    changed[:, :, 8:, 32:, :32] += 10 * torch.randn_like(changed[:, :, 8:, 32:, :32])  # masked in both
    assert not torch.allclose(masked_cell_loss(reconstruction, changed, active_b1dhw, CELL_SIZE), loss)


def test_loss_is_zero_for_the_normalised_target_on_masked_cells():
    _, target, active_b1dhw = make_loss_inputs()
    mean, std = cell_statistics(split_into_cells(target, CELL_SIZE))
    normalised = merge_cells((split_into_cells(target, CELL_SIZE) - mean) / std, (2, 2, 2), CELL_SIZE, 1)
    # Visible cells carry garbage: they must not count.
    visible = active_b1dhw.repeat_interleave(8, 2).repeat_interleave(32, 3).repeat_interleave(32, 4)
    reconstruction = torch.where(visible, torch.full_like(target, 99.0), normalised)
    loss = masked_cell_loss(reconstruction, target, active_b1dhw, CELL_SIZE)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


def test_forward_backward_reaches_encoder_mask_tokens_and_decoder():
    torch.manual_seed(0)
    spark = build_spark()
    loss = spark(torch.randn(2, 1, 16, 64, 64))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    gradients = {
        "encoder stem": spark.sparse_encoder.encoder.conv1.weight.grad,
        "decoder projection": spark.decoder.projection.weight.grad,
        "decoder first block": spark.decoder.blocks[0].upsample.weight.grad,
        **{f"mask token {stage}": token.grad for stage, token in enumerate(spark.mask_tokens)},
    }
    for part, gradient in gradients.items():
        assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0, part


def test_visuals_have_input_shape_and_paste_visible_cells():
    torch.manual_seed(0)
    spark = build_spark()
    x_bcdhw = torch.randn(2, 1, 16, 64, 64)
    active_b1dhw = spark.mask(2, "cpu", torch.Generator().manual_seed(5))
    loss, visuals = spark(x_bcdhw, active_b1dhw, return_visuals=True)
    assert torch.isfinite(loss)
    for tensor in visuals:
        assert tensor.shape == x_bcdhw.shape and not tensor.requires_grad
    visible = active_b1dhw.repeat_interleave(8, 2).repeat_interleave(32, 3).repeat_interleave(32, 4)
    assert torch.equal(visuals.reconstruction_bcdhw[visible.expand_as(x_bcdhw)], x_bcdhw[visible.expand_as(x_bcdhw)])
    assert torch.equal(visuals.target_bcdhw, x_bcdhw)
    assert torch.all(visuals.masked_bcdhw[~visible.expand_as(x_bcdhw)] == 0)


def test_local_contrast_matches_a_direct_computation():
    torch.manual_seed(0)
    volume_bcdhw = torch.rand(1, 1, 3, 12, 12, dtype=torch.float64)
    contrast = local_contrast(volume_bcdhw, window=5)
    assert contrast.shape == volume_bcdhw.shape
    for z, y, x in [(0, 6, 6), (1, 2, 9), (2, 0, 0), (2, 11, 5)]:  # inside, and at corners and edges
        def window(yy, xx):  # the in-plane neighbours that exist, as the pooling without padding counts them
            return volume_bcdhw[0, 0, z, max(yy - 2, 0):yy + 3, max(xx - 2, 0):xx + 3]
        neighbours = [(yy, xx) for yy in range(max(y - 2, 0), min(y + 3, 12)) for xx in range(max(x - 2, 0), min(x + 3, 12))]
        squared = [(volume_bcdhw[0, 0, z, yy, xx] - window(yy, xx).mean()) ** 2 for yy, xx in neighbours]
        assert contrast[0, 0, z, y, x].item() == pytest.approx(torch.stack(squared).mean().sqrt().item(), rel=1e-9)


def test_local_contrast_is_zero_on_flat_layers_and_ignores_brightness():
    flat_bcdhw = torch.arange(4, dtype=torch.float64).reshape(1, 1, 4, 1, 1).expand(1, 1, 4, 9, 9)  # each layer constant
    assert torch.allclose(local_contrast(flat_bcdhw), torch.zeros_like(flat_bcdhw))
    textured_bcdhw = torch.rand(1, 1, 2, 16, 16, dtype=torch.float64)
    assert torch.allclose(local_contrast(textured_bcdhw + 0.3), local_contrast(textured_bcdhw))
    assert torch.allclose(local_contrast(2 * textured_bcdhw), 2 * local_contrast(textured_bcdhw))


def test_texture_target_trains_and_its_visuals_show_the_target():
    torch.manual_seed(0)
    spark = build_spark(target="texture")
    x_bcdhw = torch.rand(2, 1, 16, 64, 64)
    active_b1dhw = spark.mask(2, "cpu", torch.Generator().manual_seed(5))
    loss, visuals = spark(x_bcdhw, active_b1dhw, return_visuals=True)
    loss.backward()
    assert torch.isfinite(loss) and spark.sparse_encoder.encoder.conv1.weight.grad.abs().sum() > 0
    visible = active_b1dhw.repeat_interleave(8, 2).repeat_interleave(32, 3).repeat_interleave(32, 4).expand_as(x_bcdhw)
    assert torch.equal(visuals.target_bcdhw, local_contrast(x_bcdhw))
    assert torch.equal(visuals.reconstruction_bcdhw[visible], visuals.target_bcdhw[visible])
    # The pixel target is a different loss on the same input, mask and weights.
    pixels = build_spark(target="pixels")
    pixels.load_state_dict(spark.state_dict())
    assert not torch.isclose(pixels(x_bcdhw, active_b1dhw), loss)
    with pytest.raises(ValueError, match="target"):
        build_spark(target="hog")


def test_wrong_input_size_is_refused():
    with pytest.raises(ValueError, match="built for"):
        build_spark()(torch.randn(1, 1, 16, 96, 96))


def test_decoder_strides_must_match_the_encoder_ratio():
    with pytest.raises(ValueError, match="downsample ratio"):
        LightDecoder3d(width=32, downsample_ratio=(16, 32, 32))
    decoder = LightDecoder3d(width=32)
    skips = [torch.randn(1, channels, 2 ** stage, 2 ** (stage + 1), 2 ** (stage + 1))
             for stage, channels in enumerate(decoder.skip_channels)]
    assert decoder(skips).shape == (1, 1, 8, 64, 64)
