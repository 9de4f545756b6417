"""InkUNet contracts on tiny inputs: shapes, channels read from the encoder contract, pretrained loading,
and a frozen encoder that really stays frozen."""
import pytest
import torch

from finetune.model import InkUNet, build_ink_unet
from pretrain import checkpoint
from pretrain.models import build_encoder


class ContractOnlyEncoder(torch.nn.Module):
    """Not a ResNet: odd channel counts, produced by pooling. InkUNet must work from the contract alone."""

    channels = (5, 7, 9, 11)

    def __init__(self) -> None:
        super().__init__()
        self.projections = torch.nn.ModuleList(torch.nn.Conv3d(1, channels, 1) for channels in self.channels)

    def get_downsample_ratio(self):
        return (8, 32, 32)

    def get_feature_map_channels(self):
        return list(self.channels)

    def forward(self, x_bcdhw, hierarchical=True):
        # Stage i: depth / 2^i, space / (4 · 2^i), as the contract's ratio (8, 32, 32) implies.
        return [projection(torch.nn.functional.avg_pool3d(x_bcdhw, (2**stage, 4 * 2**stage, 4 * 2**stage)))
                for stage, projection in enumerate(self.projections)]


@pytest.mark.parametrize("output_stride", [1, 4])
@pytest.mark.parametrize("depth_pool", ["max", "mean"])
def test_full_resolution_logits_and_gradients(output_stride, depth_pool):
    model = build_ink_unet("resnet18_3d_tiny", depth_pool=depth_pool, output_stride=output_stride)
    volume = torch.randn(2, 1, 8, 64, 96, requires_grad=True)
    logits = model(volume)
    assert logits.shape == (2, 1, 64, 96)
    logits.mean().backward()
    assert volume.grad is not None and torch.isfinite(volume.grad).all()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_decoder_channels_come_from_the_encoder_contract():
    model = InkUNet(ContractOnlyEncoder(), output_stride=1)
    assert model(torch.randn(2, 1, 8, 64, 64)).shape == (2, 1, 64, 64)
    # The first decoder block fuses the deepest stage (11 channels) with the next one (9).
    assert model.decoder.blocks[0].conv1[0].in_channels == 11 + 9
    resnet = build_ink_unet("resnet18_3d_tiny", output_stride=4)
    deepest, next_deepest = resnet.encoder.get_feature_map_channels()[-1], resnet.encoder.get_feature_map_channels()[-2]
    assert resnet.decoder.blocks[0].conv1[0].in_channels == deepest + next_deepest


def test_pretrained_encoder_loads_strictly_and_leaves_only_decoder_keys_new(tmp_path):
    encoder_state = build_encoder("resnet18_3d_tiny").state_dict()
    torch.save(encoder_state, tmp_path / "resnet18_3d_tiny_timm_style.pth")
    model = build_ink_unet("resnet18_3d_tiny")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    weights = checkpoint.encoder_weights(tmp_path / "resnet18_3d_tiny_timm_style.pth")
    checkpoint.load_encoder(model.encoder, weights, "resnet18_3d_tiny", "MODEL")
    after = model.state_dict()
    for key, value in encoder_state.items():
        assert torch.equal(after[f"encoder.{key}"], value), key
    unchanged = {key for key in after if torch.equal(after[key], before[key])}
    new_keys = model.decoder_state_keys()
    assert new_keys and all(key.startswith(("decoder.", "segmentation_head.")) for key in new_keys)
    assert new_keys <= unchanged  # the decoder and head are not touched by the encoder checkpoint


def test_freeze_encoder_keeps_weights_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = build_ink_unet("resnet18_3d_tiny", freeze_encoder=True)
    model.train()
    assert not model.encoder.training and model.decoder.training
    encoder_before = {key: value.clone() for key, value in model.encoder.state_dict().items()}
    decoder_before = {key: value.clone() for key, value in model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    volume, labels = torch.randn(2, 1, 8, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(model(volume), labels).backward()
    optimizer.step()
    for key, value in model.encoder.state_dict().items():  # weights, running means and variances, counters
        assert torch.equal(value, encoder_before[key]), key
    assert any(not torch.equal(value, decoder_before[key]) for key, value in model.decoder.state_dict().items())
    assert all(not parameter.requires_grad for parameter in model.encoder.parameters())


def test_lp_ft_unfreezes_the_encoder_for_the_second_phase():
    torch.manual_seed(0)
    model = build_ink_unet("resnet18_3d_tiny")
    model.set_encoder_frozen(True)
    model.train()
    assert not model.encoder.training and not any(p.requires_grad for p in model.encoder.parameters())
    model.set_encoder_frozen(False)
    assert model.encoder.training and all(p.requires_grad for p in model.encoder.parameters())
