"""The checkpoint module: every kind written carries its input settings, every kind (old and new, ours and
Kinetics) gives its encoder, unsafe pickles are refused, and the input settings resolve as documented."""
import os
import pickle

import numpy as np
import pytest
import torch

from finetune.model import build_ink_unet
from pretrain import checkpoint
from pretrain.data.patches import InputSettings
from pretrain.decoder import LightDecoder3d
from pretrain.encoder import SparseEncoder
from pretrain.models import build_encoder
from pretrain.spark import SparK3d
from pretrain.vicreg import VICReg
from tests.conftest import hara_checkpoint

SETTINGS = InputSettings(model="resnet18_3d_tiny", depth=24, depth_offset=-2, follow_surface=True,
                         normalization="zscore", tile_size=64)
NAMES = {"model": "MODEL", "depth": "DEPTH", "depth_offset": "DEPTH_OFFSET", "follow_surface": "FOLLOW_SURFACE",
         "normalization": "NORMALIZATION", "tile_size": "TILE_SIZE"}


def spark_model() -> SparK3d:
    sparse_encoder = SparseEncoder(build_encoder("resnet18_3d_tiny"))
    return SparK3d(sparse_encoder, LightDecoder3d(32, sparse_encoder.get_downsample_ratio()), input_size=64, depth=16)


def test_every_kind_written_gives_its_encoder_and_its_settings(tmp_path):
    torch.manual_seed(1)
    spark, vicreg, unet = spark_model(), VICReg(build_encoder("resnet18_3d_tiny"), [32, 32]), build_ink_unet("resnet18_3d_tiny")
    encoders = {"spark": spark.sparse_encoder.encoder, "vicreg": vicreg.encoder, "finetune": unet.encoder,
                "encoder": spark.sparse_encoder.encoder}
    states = {"spark": spark.state_dict(), "vicreg": vicreg.state_dict(), "finetune": unet.state_dict(),
              "encoder": spark.sparse_encoder.encoder.state_dict()}
    for kind, state in states.items():
        checkpoint.save(tmp_path / f"{kind}.pth", kind, state, SETTINGS, epoch=2, state={"epoch": 3})
        weights = checkpoint.encoder_weights(tmp_path / f"{kind}.pth")
        assert weights.settings == SETTINGS, kind
        assert weights.description.startswith(checkpoint.kind_name(kind)), weights.description
        encoder = build_encoder("resnet18_3d_tiny")
        checkpoint.load_encoder(encoder, weights, "resnet18_3d_tiny", "--model")
        for key, value in encoders[kind].state_dict().items():
            assert torch.equal(encoder.state_dict()[key], value), (kind, key)
        assert checkpoint.read(tmp_path / f"{kind}.pth")["kind"] == kind


def test_older_files_without_a_kind_still_load_with_the_settings_they_record(tmp_path):
    rng_state = {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}  # what older full checkpoints held
    spark = spark_model()
    torch.save({"args": {"method": "spark", "model": "resnet18_3d_tiny", "depth": 24, "depth_offset": -2,
                         "follow_surface": True, "normalization": "zscore", "input_size": 64},
                "epoch": 3, "model": spark.state_dict(), "optimizer": {}, "rng": rng_state}, tmp_path / "old_spark.pth")
    unet = build_ink_unet("resnet18_3d_tiny")
    torch.save({"config": {"MODEL": "resnet18_3d_tiny", "DEPTH": 24, "DEPTH_OFFSET": -2, "FOLLOW_SURFACE": True,
                           "NORMALIZATION": "zscore", "TILE_SIZE": 64},
                "state": {"epoch": 7}, "model": unet.state_dict(), "rng": rng_state}, tmp_path / "old_best.pth")
    torch.save(unet.encoder.state_dict(), tmp_path / "old_timm_style.pth")
    old_spark = checkpoint.encoder_weights(tmp_path / "old_spark.pth")
    assert old_spark.settings == SETTINGS and "epoch 4" in old_spark.description
    old_best = checkpoint.encoder_weights(tmp_path / "old_best.pth")
    assert old_best.settings == SETTINGS and "epoch 7" in old_best.description
    bare = checkpoint.encoder_weights(tmp_path / "old_timm_style.pth")
    assert bare.settings is None and bare.description.startswith("encoder-only")
    for weights, source in ((old_spark, spark.sparse_encoder.encoder), (old_best, unet.encoder), (bare, unet.encoder)):
        encoder = build_encoder("resnet18_3d_tiny")
        checkpoint.load_encoder(encoder, weights, "resnet18_3d_tiny", "MODEL")
        assert torch.equal(encoder.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


@pytest.mark.parametrize("classes", [700, 1039])
@pytest.mark.parametrize("module_prefix", [False, True])
def test_kinetics_checkpoint_loads_strictly_except_fc(tmp_path, classes, module_prefix):
    saved, kinetics_model = hara_checkpoint(classes, module_prefix)
    assert any(key.startswith(f"{'module.' if module_prefix else ''}fc.") for key in saved["state_dict"])
    torch.save(saved, tmp_path / "r3d18_K_200ep.pth")
    weights = checkpoint.encoder_weights(tmp_path / "r3d18_K_200ep.pth")
    assert weights.description.startswith("Kinetics (resnet-18)") and weights.settings is None
    encoder = build_encoder("resnet18_3d_tiny")
    checkpoint.load_encoder(encoder, weights, "resnet18_3d_tiny", "MODEL")
    torch.testing.assert_close(encoder.conv1.weight, kinetics_model.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(encoder.layer4[1].conv2.weight, kinetics_model.layer4[1].conv2.weight)
    torch.testing.assert_close(encoder.layer2[0].downsample[1].running_var, kinetics_model.layer2[0].downsample[1].running_var)


def test_weights_of_another_architecture_name_it_and_the_setting_to_change(tmp_path):
    checkpoint.save(tmp_path / "narrow.pth", "encoder", build_encoder("resnet50_3d_narrow").state_dict(),
                    InputSettings(model="resnet50_3d_narrow"))
    torch.save(build_encoder("resnet50_3d_narrow").state_dict(), tmp_path / "bare_narrow.pth")
    for name in ("narrow.pth", "bare_narrow.pth"):
        with pytest.raises(checkpoint.CheckpointError,
                           match="do not fit resnet18_3d_tiny: it holds a resnet50_3d_narrow encoder: set MODEL resnet50_3d_narrow"):
            checkpoint.load_encoder(build_encoder("resnet18_3d_tiny"), checkpoint.encoder_weights(tmp_path / name),
                                    "resnet18_3d_tiny", "MODEL")
    saved, _ = hara_checkpoint(700, False, layers=(3, 4, 6, 3))  # a ResNet-34 layout at the tiny width
    torch.save(saved, tmp_path / "r3d34.pth")
    with pytest.raises(checkpoint.CheckpointError, match=r"Kinetics \(resnet-18\) weights from .*r3d34.pth do not fit "
                                                         r"resnet18_3d_tiny: it fits no known encoder \(unexpected"):
        checkpoint.load_encoder(build_encoder("resnet18_3d_tiny"), checkpoint.encoder_weights(tmp_path / "r3d34.pth"),
                                "resnet18_3d_tiny", "MODEL")


class Payload:
    """Unpickling this runs os.system: what a malicious checkpoint would carry."""

    def __reduce__(self):
        return os.system, ("echo pwned > should_never_exist",)


def test_a_checkpoint_carrying_a_pickled_callable_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": build_encoder("resnet18_3d_tiny").state_dict(), "extra": Payload()}, tmp_path / "evil.pth")
    torch.save({"kind": "encoder", "input": None, "model": {}, "hook": print}, tmp_path / "callable.pth")
    for name in ("evil.pth", "callable.pth"):
        with pytest.raises(checkpoint.CheckpointError, match="holds more than weights and settings.*could run code"):
            checkpoint.read(tmp_path / name)
    assert not (tmp_path / "should_never_exist").exists()


def test_not_a_checkpoint_and_missing_files_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"optimizer": {}}, tmp_path / "other.pth")
    with pytest.raises(checkpoint.CheckpointError, match="is not an encoder, pretraining, fine-tuning or Kinetics"):
        checkpoint.read(tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with open(tmp_path / "pickle4.pth", "wb") as file:  # a plain pickle, not torch.save: refused, never unpickled
        pickle.dump({"extra": Payload()}, file, protocol=4)
    for name in ("text.pth", "pickle4.pth"):
        with pytest.raises(checkpoint.CheckpointError, match="cannot be read: it is not a PyTorch checkpoint of weights"):
            checkpoint.read(tmp_path / name)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "nope.pth")
    assert not (tmp_path / "should_never_exist").exists()


def test_input_settings_come_from_the_encoder_unless_given_and_a_contradiction_is_an_error():
    weights = checkpoint.EncoderWeights({}, SETTINGS, "encoder-only weights from x.pth")
    defaults = InputSettings(model="resnet50_3d_narrow", tile_size=48)
    assert checkpoint.resolve_input_settings(weights, {}, defaults, NAMES) == SETTINGS
    assert checkpoint.resolve_input_settings(weights, {"depth": 24, "follow_surface": True}, defaults, NAMES) == SETTINGS
    with pytest.raises(checkpoint.CheckpointError, match="DEPTH 16 differs from the encoder's 24 .*leave DEPTH unset"):
        checkpoint.resolve_input_settings(weights, {"depth": 16}, defaults, NAMES)
    with pytest.raises(checkpoint.CheckpointError, match="NORMALIZATION 'range' differs from the encoder's 'zscore'"):
        checkpoint.resolve_input_settings(weights, {"normalization": "range"}, defaults, NAMES)
    with pytest.warns(UserWarning, match="TILE_SIZE 96 differs from the encoder's 64"):
        assert checkpoint.resolve_input_settings(weights, {"tile_size": 96}, defaults, NAMES).tile_size == 96
    # Without an encoder, or with one that does not record its settings: the given values, else the defaults.
    bare = checkpoint.EncoderWeights({}, None, "Kinetics weights")
    for encoder in (None, bare):
        assert checkpoint.resolve_input_settings(encoder, {"depth": 24}, defaults, NAMES) == InputSettings(
            model="resnet50_3d_narrow", depth=24, tile_size=48)


def test_a_flipped_byte_in_the_tensor_data_is_one_error_line_and_files_without_a_checksum_still_load(tmp_path):
    weight = torch.arange(4096, dtype=torch.float32)
    checkpoint.save(tmp_path / "encoder.pth", "encoder", {"weight": weight}, SETTINGS, epoch=1)
    assert torch.equal(checkpoint.read(tmp_path / "encoder.pth")["model"]["weight"], weight)
    data = bytearray((tmp_path / "encoder.pth").read_bytes())
    start = bytes(data).find(weight.numpy().tobytes())  # the tensor's bytes, stored uncompressed in torch's zip
    assert start > 0
    data[start + 4 * 1000 + 1] ^= 0x01
    (tmp_path / "damaged.pth").write_bytes(bytes(data))
    # What the fault was: torch loads the damaged file without a word, with another weight.
    loaded = torch.load(tmp_path / "damaged.pth", weights_only=True)["model"]["weight"]
    assert not torch.equal(loaded, weight)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.read(tmp_path / "damaged.pth")
    assert str(raised.value) == (f"checkpoint {tmp_path / 'damaged.pth'} is damaged: its tensors or settings no longer "
                                 "match the SHA-256 recorded when it was written (a corrupted copy or download); copy "
                                 "it again")
    # The same contents without a kind and a checksum (a file written before either) load, unchecked.
    unchecked = torch.load(tmp_path / "encoder.pth", weights_only=True)
    torch.save(unchecked["model"], tmp_path / "older.pth")
    assert torch.equal(checkpoint.read(tmp_path / "older.pth")["model"]["weight"], weight)
    # A file of the first checksum version (a bare digest of its tensors) is checked as far as that goes.
    unchecked["checksum"] = checkpoint.tensors_checksum({key: value for key, value in unchecked.items()
                                                         if key != "checksum"})
    torch.save(unchecked, tmp_path / "first_version.pth")
    assert torch.equal(checkpoint.read(tmp_path / "first_version.pth")["model"]["weight"], weight)
    unchecked["model"]["weight"] = weight + 1
    torch.save(unchecked, tmp_path / "first_version.pth")
    with pytest.raises(checkpoint.CheckpointError, match="its tensors no longer match"):
        checkpoint.read(tmp_path / "first_version.pth")


def damage(path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of `old` in the file's bytes by `new` (of the same length): torch's zip stores
    the pickle uncompressed and its reader checks no CRC, so the file still loads."""
    data = path.read_bytes()
    assert data.count(old) == 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize("case", ["checksum key renamed", "kind key renamed", "depth_offset 0 -> 3", "model name",
                                  "checksum's form"])
def test_one_changed_byte_in_the_settings_or_the_keys_is_refused_in_one_line(tmp_path, case):
    path = tmp_path / "best.pth"
    settings = InputSettings(model="resnet18_3d_tiny", depth=8, depth_offset=0, tile_size=32)
    checkpoint.save(path, "finetune", {"weight": torch.arange(8.0)}, settings, config={"DEPTH_POOL": "mean"})
    if case == "checksum key renamed":  # the attack that turned the check off: 111 tensors damaged loaded
        damage(path, b"checksum", b"checksuN")
        message = "it has a kind but no checksum"
    elif case == "kind key renamed":  # would read as a fine-tuning file of the older format, unchecked
        damage(path, b"kind", b"kine")
        message = "it has a checksum but no kind"
    elif case == "depth_offset 0 -> 3":  # loaded without a word and read other layers
        position = path.read_bytes().index(b"depth_offset") + len(b"depth_offset")
        value = path.read_bytes().index(b"K\x00", position)  # the pickle's one-byte integer 0
        assert value - position < 4
        data = bytearray(path.read_bytes())
        data[value + 1] = 3
        path.write_bytes(bytes(data))
        assert torch.load(path, weights_only=True)["input"]["depth_offset"] == 3  # the damage alone would load
        message = "its tensors or settings no longer match the SHA-256"
    elif case == "model name":
        damage(path, b"resnet18_3d_tiny", b"resnet18_3d_tinz")
        message = "its tensors or settings no longer match the SHA-256"
    else:
        damage(path, b"sha256-all:", b"sha256-alm:")
        message = "its checksum 'sha256-alm:"
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.read(path)
    assert str(raised.value).startswith(f"checkpoint {path} is damaged: {message}") and "\n" not in str(raised.value)


def test_the_checksum_covers_settings_key_types_and_refuses_what_it_cannot_cover():
    entries = {"input": {"depth_offset": 0, "model": "resnet18_3d_tiny", "follow_surface": False}, "epoch": 1,
               "state": {0: 1.5, "0": None}, "lr": [0.1, 0.2]}
    digest = checkpoint.contents_checksum(entries)
    for changed in ({**entries, "input": {**entries["input"], "depth_offset": 3}},
                    {**entries, "input": {**entries["input"], "model": "resnet18_3d"}},
                    {**entries, "input": {**entries["input"], "follow_surface": 0}},  # same value, another type
                    {**entries, "epoch": 1.0}, {**entries, "state": {"0": 1.5, 0: None}},
                    {**entries, "lr": (0.1, 0.2)}, {**entries, "lr": [0.1]}, {**entries, "extra": None}):
        assert checkpoint.contents_checksum(changed) != digest, changed
    assert checkpoint.tensors_checksum(entries) == checkpoint.tensors_checksum({})  # the first version's blind spot
    with pytest.raises(TypeError, match="a checkpoint entry at /'when' is a object"):
        checkpoint.contents_checksum({"when": object()})


def test_the_checksum_covers_key_paths_dtypes_and_every_kind_of_entry():
    state = {"a": torch.ones(3), "b": torch.zeros(3)}
    digest = checkpoint.tensors_checksum({"model": state})
    assert digest == checkpoint.tensors_checksum({"model": {key: value.clone() for key, value in state.items()}})
    assert digest != checkpoint.tensors_checksum({"model": {"a": torch.zeros(3), "b": torch.ones(3)}})  # swapped
    assert digest != checkpoint.tensors_checksum({"model": {"a": torch.ones(3, dtype=torch.float64),
                                                            "b": torch.zeros(3)}})
    # Optimizer states (integer keys, lists), bfloat16 and 0-d tensors, numpy arrays: all hashed, none refused.
    entries = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, dtype=torch.bfloat16)}},
                             "param_groups": [{"params": [0], "lr": 0.1}]}, "rng": np.arange(4, dtype=np.uint32)}
    changed = {**entries, "rng": np.arange(1, 5, dtype=np.uint32)}
    assert checkpoint.tensors_checksum(entries) != checkpoint.tensors_checksum(changed)
