"""The pretraining-method interface (pretrain/methods.py): every registered method keeps its contract, and a new
method is one file and one registry line."""
import json
import sys

import pytest
import torch

import pretrain.main
from pretrain import checkpoint, methods
from pretrain.models import build_encoder
from pretrain.utils import arg_util
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment

TINY = ["--model", "resnet18_3d_tiny", "--depth", "16", "--tile_size", "64", "--bs", "2", "--samples_per_ep", "4",
        "--num_workers", "0", "--cpu_threads", "1", "--vis_every", "1", "--decoder_width", "32", "--projector", "64-64"]

# The whole of a new method: this file, and the line `"toy": "toy_method"` in METHODS.
TOY_METHOD = '''"""A toy objective: pull the encoder's pooled stage-4 features of each crop towards zero."""
import torch

from pretrain.methods import Method


class Toy(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, crop_bcdhw):
        return self.encoder(crop_bcdhw, hierarchical=True)[-1].mean(dim=(2, 3, 4)).pow(2).mean()


class ToyMethod(Method):
    name = "toy"
    title = "toy pretraining"
    checkpoint_part = "withnothing_toy"
    encoder_prefix = "encoder."
    image_tag = "toy/crop"

    def build_model(self, args, encoder, sync_batchnorm):
        return Toy(encoder)

    def training_step(self, model, batch, device, show):
        crop_bcdhw = batch.to(device)  # (B, 1, D, H, W): RandomPatchDataset's crops
        loss = model(crop_bcdhw)
        return loss, {"toy__feature_energy": float(loss.detach())}, [crop_bcdhw] if show else None


METHOD = ToyMethod()
'''


@pytest.fixture(scope="module")
def segment_path(tmp_path_factory) -> str:
    path = write_zarr_segment(tmp_path_factory.mktemp("segment") / "s.zarr", random_volume((40, 128, 128), seed=4))
    write_png(path / "mask.png", rectangle_mask((128, 128), margin=4))
    return str(path)


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_method_holds_the_dense_encoder_where_it_says(name, tmp_path):
    args = arg_util.parse_args(["--method", name, *TINY, "--exp_dir", str(tmp_path)])
    method = methods.get(name)
    assert method.name == name and args.checkpoint_path.endswith(f"_{method.checkpoint_part}_style.pth")
    model = pretrain.main.build_model(args)
    encoder_state = method.dense_encoder(model).state_dict()
    assert encoder_state.keys() == build_encoder(args.model).state_dict().keys()  # the dense names fine-tuning loads
    in_model = {key.removeprefix(method.encoder_prefix) for key in model.state_dict() if key.startswith(method.encoder_prefix)}
    assert in_model == set(encoder_state)


def test_a_new_method_is_one_file_and_one_registry_line(segment_path, tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.METHODS, "toy", "toy_method")

    exp_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["pretrain/main.py", "--method", "toy", *TINY, "--ep", "1",
                                      "--data_path", segment_path, "--exp_dir", str(exp_dir)])
    threads = torch.get_num_threads()
    try:
        assert pretrain.main.main() == 0
    finally:
        torch.set_num_threads(threads)  # main sets this process's threads (cpu_threads)

    full = checkpoint.read(exp_dir / "resnet18_3d_tiny_withnothing_toy_style.pth")
    assert full["kind"] == "toy" and full["global_step"] == 2
    weights = checkpoint.encoder_weights(exp_dir / "resnet18_3d_tiny_withnothing_toy_style.pth")
    assert weights.description.startswith("toy pretraining weights, epoch 1")
    encoder = checkpoint.read(exp_dir / "resnet18_3d_tiny_timm_style.pth")
    assert encoder["method"] == "toy"
    build_encoder("resnet18_3d_tiny").load_state_dict(encoder["model"])  # dense names, strict
    epoch_record = [json.loads(line) for line in (exp_dir / "log.jsonl").read_text().splitlines()][-1]
    assert epoch_record["event"] == "epoch" and epoch_record["toy__feature_energy"] > 0


def test_an_unknown_method_names_the_registered_ones():
    with pytest.raises(arg_util.ArgumentError, match="method 'mae' is not 'spark' or 'vicreg'"):
        arg_util.parse_args(["--method", "mae"])


@pytest.mark.parametrize("option", ["--lr", "--device", "--commit"])
def test_fields_filled_at_runtime_are_refused_on_the_command_line(option):
    with pytest.raises(arg_util.ArgumentError, match=f"^{option} is filled at runtime"):
        arg_util.parse_args([option, "1"])
