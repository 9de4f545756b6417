"""Shared fixtures. The repository is installed (`-e .` in the lock), so tests import `pretrain.*` package-qualified."""
import dataclasses
import os
import pathlib
import sys

# One thread per process for torch (and numpy's BLAS) in the test processes and every script they start, unless the
# caller chose otherwise: pytest -n 2 already keeps both cores busy, and torch's default of a thread per core makes
# their threads wait for each other at every operation (2 threads ran 2-3× slower than 1 on the 2-core machine).
# Set before numpy and torch are imported, which read it once. A script with cpu_threads 0 (automatic) sets its own
# count, the cores less its DataLoader workers (2 with num_workers 0): the tests pass those --cpu_threads 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

from tests.synthetic import (SERVER_LAYER_SEGMENT_ID, SERVER_SEGMENT_ID, random_volume,
                             rectangle_mask, write_png, write_server_layers, write_server_segment, write_zarr_segment)


@pytest.fixture(autouse=True)
def torch_threads_put_back():
    """A script's main() run in the test process sets torch's threads for the whole process (cpu_threads 0 gives 2
    here); put OMP_NUM_THREADS' count back after each test, so that later tests in this pytest worker do not run
    with it."""
    yield
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


@dataclasses.dataclass
class ServerLayout:
    root: pathlib.Path
    volume: np.ndarray  # (65, 600, 530) uint8 of SERVER_SEGMENT_ID; its chunk column (1, 1) is all zero
    mask: np.ndarray  # (600, 530) uint8 0/255
    labels: np.ndarray  # (600, 530) uint8 0/255; served padded to (768, 768)
    layer_volume: np.ndarray  # (65, 300, 260) uint16 of SERVER_LAYER_SEGMENT_ID, served as TIFF layers
    layer_mask: np.ndarray


@pytest.fixture(scope="session")
def server_layout(tmp_path_factory) -> ServerLayout:
    """A folder laid out like the data server (built once; tests must not change it): a scroll 1 segment zarr
    with padded labels beside it and its mask in the volume package, and a scroll 4 segment of TIFF layers."""
    root = tmp_path_factory.mktemp("server")
    volume = random_volume((65, 600, 530), seed=1)
    volume[:, 512:, 512:] = 0  # chunks the server does not have: read as zeros
    mask = rectangle_mask(volume.shape[1:], margin=20)
    labels = np.zeros(volume.shape[1:], np.uint8)
    labels[300:360, 100:400] = 255
    write_server_segment(root, SERVER_SEGMENT_ID, volume, mask, labels)
    layer_volume = random_volume((65, 300, 260), seed=2, dtype=np.uint16)
    layer_mask = rectangle_mask(layer_volume.shape[1:], margin=5)
    write_server_layers(root, SERVER_LAYER_SEGMENT_ID, layer_volume, layer_mask)
    return ServerLayout(root, volume, mask, labels, layer_volume, layer_mask)


def hara_checkpoint(classes: int, module_prefix: bool, layers=(2, 2, 2, 2)) -> tuple:
    """A checkpoint with the exact key layout of Hara's 3D-ResNets-PyTorch releases (3-channel conv1, fc), at the
    tiny test width, and the model it holds."""
    import torch

    from pretrain.models.resnet3d import BasicBlock3d, ResNet3d

    torch.manual_seed(classes)
    kinetics_model = ResNet3d(BasicBlock3d, layers, in_channels=3, width=0.125, num_classes=classes)
    prefix = "module." if module_prefix else ""
    state = {prefix + key: value for key, value in kinetics_model.state_dict().items()}
    return {"epoch": 200, "arch": "resnet-18", "state_dict": state, "optimizer": {}}, kinetics_model


FINETUNE_SHAPE = (24, 128, 192)  # (Z, Y, X) of the labelled segment below
# finetune/train.py settings for a run of seconds on it
FINETUNE_TINY = ["--MODEL", "resnet18_3d_tiny", "--DEPTH", "8", "--TILE_SIZE", "32", "--STRIDE", "32",
                 "--BATCH_SIZE", "4", "--NUM_EPOCHS", "2", "--NUM_WORKERS", "0", "--INFERENCE_STRIDE", "16",
                 "--MIN_TILES_PER_EPOCH", "8", "--MIN_INK_FRACTION", "0.01", "--CPU_THREADS", "1"]


@pytest.fixture(scope="module")
def labelled_segment_path(tmp_path_factory):
    """A tiny labelled segment for fine-tuning: ink blocks that brighten the middle layers, labels for all of
    them, and label files to try."""
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 120, FINETUNE_SHAPE, dtype=np.uint8)
    labels = np.zeros(FINETUNE_SHAPE[1:], np.uint8)
    for y in range(16, 110, 36):
        for x in range(12, 180, 30):
            labels[y:y + 16, x:x + 10] = 255
    volume[10:14][:, labels > 0] += 100
    path = write_zarr_segment(tmp_path_factory.mktemp("finetune") / "tiny.zarr", volume, chunks=(8, 64, 64))
    write_png(path / "mask.png", rectangle_mask(FINETUNE_SHAPE[1:], margin=4))
    write_png(path / "inklabels.png", labels)
    two_letters = np.zeros_like(labels)
    two_letters[16:32, 12:22] = 255
    two_letters[16:32, 42:52] = 255
    write_png(path / "two_letters.png", two_letters)
    write_png(path / "three_letters.png", np.maximum(two_letters, np.pad(labels[52:68], ((52, 60), (0, 0)))))
    write_png(path / "empty.png", np.zeros_like(labels))
    write_png(path / "wrong_size.png", np.zeros((192, 128), np.uint8))  # transposed: not padding
    return path


def cached_chunk_files(cache_dir: pathlib.Path) -> list[pathlib.Path]:
    """The chunks of level "0" in a chunk cache (not temp files, not remembered absences)."""
    from pretrain.data.remote import INCOMPLETE_DIR

    return [
        path for path in cache_dir.rglob("*")
        if path.is_file() and INCOMPLETE_DIR not in path.parts and "/0/" in path.as_posix()
        and not path.name.startswith(".") and not path.name.endswith(".absent")
    ]


def assert_cache_holds_only_whole_chunks(cache_dir: pathlib.Path, mirror: pathlib.Path, server_url_host: str):
    """Every cached chunk is byte-identical to the served file, and carries the digest of its bytes: nothing partial
    where the cache looks, and no chunk without its record (or with another's)."""
    from pretrain.data import cache

    for path in cached_chunk_files(cache_dir):
        relative = path.relative_to(cache_dir / server_url_host)
        assert path.read_bytes() == (mirror / relative).read_bytes(), f"partial or wrong chunk {relative}"
        assert os.getxattr(path, cache.DIGEST_ATTRIBUTE) == cache.body_digest(path.read_bytes()), relative


DEMO_FAMILY_SHAPE = (65, 128, 192)  # (Z, Y, X) of each small demo segment below


@pytest.fixture(scope="session")
def demo_family_cache(tmp_path_factory) -> pathlib.Path:
    """A segment cache (for SEGMENT_CACHE_DIR) in which `demo:1`, `demo:2` and `demo:3` are demo segments of
    DEMO_FAMILY_SHAPE: separate segments from one generator, small enough that a run on several takes seconds."""
    from pretrain.data.demo import build_demo_segment
    from pretrain.data.segment import demo_cache_path

    cache = tmp_path_factory.mktemp("demo_family")
    for seed in (1, 2, 3):
        build_demo_segment(demo_cache_path(seed, cache), seed=seed, shape=DEMO_FAMILY_SHAPE)
    return cache
