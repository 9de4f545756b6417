"""What pretraining draws, through the path users run: the real DataLoader with the default (persistent) workers
draws new crops and views every epoch, a resumed run draws what an uninterrupted one would have, and under
torchrun (two gloo processes) every rank keeps its own randomness across a resume and all ranks stop together
on a non-finite loss."""
import datetime

import pytest
import torch
import torch.distributed
import torch.multiprocessing
import tqdm

import pretrain.main
from pretrain.data.segment import open_segment
from pretrain.utils import arg_util, misc
from tests.synthetic import random_volume, rectangle_mask, write_png, write_zarr_segment


@pytest.fixture(scope="module")
def segment_path(tmp_path_factory) -> str:
    volume = random_volume((65, 160, 160), seed=12)
    path = write_zarr_segment(tmp_path_factory.mktemp("segment") / "s.zarr", volume, chunks=(32, 64, 64))
    write_png(path / "mask.png", rectangle_mask((160, 160), margin=4))
    return str(path)


class RecordingModel(torch.nn.Module):
    """Stands in for SparK or VICReg in train_one_epoch: records every input batch and one draw from the global
    generator per step (where SparK draws its masks), and returns a finite loss (or NaN on `nan_rank`)."""

    def __init__(self, nan_rank: int = -1) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.nan_rank = nan_rank
        self.inputs, self.draws = [], []

    def forward(self, *inputs, return_visuals=False):
        self.inputs.append(torch.cat([inp.flatten() for inp in inputs]).clone())
        self.draws.append(torch.rand(3))
        loss = (self.weight - inputs[0].mean()) ** 2
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == self.nan_rank:
            loss = loss * float("nan")
        if len(inputs) == 2:  # VICReg's signature: (loss, logged terms)
            return loss, {}
        return (loss, (inputs[0],) * 3) if return_visuals else loss


def default_args(segment_path: str, tmp_path, *extra: str) -> arg_util.Args:
    """The defaults users run (num_workers 2, persistent workers), on a small segment with small crops."""
    args = arg_util.parse_args(["--data_path", segment_path, "--tile_size", "32", "--samples_per_ep", "8",
                                "--exp_dir", str(tmp_path), "--vis_every", "0", *extra])
    args.fill_runtime("cpu", torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    return args


def run_epochs(args: arg_util.Args, epochs: list[int], model: RecordingModel) -> RecordingModel:
    """train_one_epoch for `epochs`, through the loader pretrain/main.py builds."""
    loader = pretrain.main.build_loader(args, open_segment(args.data_path), torch.device("cpu"))
    assert loader.num_workers == args.num_workers and loader.persistent_workers == (args.num_workers > 0)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if torch.distributed.is_initialized() else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    tensorboard = misc.TensorboardLogger(args.exp_dir + "/tb")
    for epoch in epochs:
        pretrain.main.train_one_epoch(args, model, ddp_model, optimizer, loader, epoch, 0, tensorboard,
                                      tqdm.tqdm(disable=True))
    return model


@pytest.mark.parametrize("method", ["spark", "vicreg"])
def test_every_epoch_draws_new_crops_and_a_resumed_run_the_same_ones(segment_path, tmp_path, method):
    args = default_args(segment_path, tmp_path, "--method", method)
    assert args.num_workers == 2  # the default: persistent workers, which kept epoch 0 before the fix
    straight = run_epochs(args, [0, 1, 2], RecordingModel())
    per_epoch = len(straight.inputs) // 3  # 8 crops in batches of 2
    epochs = [straight.inputs[start:start + per_epoch] for start in range(0, 3 * per_epoch, per_epoch)]
    for later in (1, 2):  # no batch of a later epoch repeats one of an earlier epoch
        for batch in epochs[later]:
            assert not any(torch.equal(batch, earlier) for previous in epochs[:later] for earlier in previous)
    # A run resumed at epoch 2 (fresh workers) draws exactly the crops, views and masks of the uninterrupted one.
    resumed = run_epochs(args, [2], RecordingModel())
    assert all(torch.equal(a, b) for a, b in zip(resumed.inputs, epochs[2], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.draws, straight.draws[2 * per_epoch:], strict=True))


def distributed_worker(rank: int, port: int, segment_path: str, folder: str, epochs: list[int], nan_rank: int, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    args = default_args(segment_path, folder, "--bs", "4", "--num_workers", "0")  # workers: tested above
    model = RecordingModel(nan_rank)
    try:
        run_epochs(args, epochs, model)
        results.put((rank, "done", [draw.tolist() for draw in model.draws]))
    except pretrain.utils.schedule.NonFiniteLossError as error:
        results.put((rank, "stopped", str(error)))
    torch.distributed.destroy_process_group()


def run_two_ranks(segment_path: str, folder, epochs: list[int], nan_rank: int = -1) -> dict:
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    port = 29500 + (hash(str(folder)) % 2000)
    processes = [context.Process(target=distributed_worker,
                                 args=(rank, port, segment_path, str(folder), epochs, nan_rank, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    outcome = {}
    for _ in processes:
        rank, status, detail = results.get(timeout=180)  # a rank left waiting in a collective never reports
        outcome[rank] = (status, detail)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    return outcome


def test_two_ranks_keep_their_own_masks_across_a_resume(segment_path, tmp_path):
    straight = run_two_ranks(segment_path, tmp_path / "straight", [0, 1])
    resumed = run_two_ranks(segment_path, tmp_path / "resumed", [1])  # a resume starts at epoch 1 in new processes
    steps = len(resumed[0][1])  # 8 crops, global batch 4, 2 ranks: 2 steps per epoch
    assert steps == 2 and all(status == "done" for status, _ in (*straight.values(), *resumed.values()))
    assert resumed[0][1] != resumed[1][1]  # each rank draws its own masks after a resume
    for rank in range(2):  # and exactly what it would have drawn without the interruption
        assert resumed[rank][1] == straight[rank][1][steps:]


def test_a_nan_on_one_rank_stops_both_with_the_same_message(segment_path, tmp_path):
    outcome = run_two_ranks(segment_path, tmp_path, [0], nan_rank=1)
    assert outcome[0][0] == outcome[1][0] == "stopped"
    assert outcome[0][1] == outcome[1][1] and outcome[0][1].startswith("loss is nan at epoch 1, iteration 0")
