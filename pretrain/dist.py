"""One code path for CPU, one GPU, and `torchrun --nproc_per_node N` (DDP: gloo on CPU, nccl on GPU).

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op with rank 0 of 1.

A rank that stalls (a hung read, a stopped process) or dies would keep the others waiting at their next
collective operation; they give up after `timeout_minutes` (the entry script's setting), and
`stalled_rank_line` turns gloo's error into one line naming the ranks. (With nccl, torch's watchdog aborts the
process after the same timeout with its own message naming the rank.)
"""
import datetime
import os

import torch
import torch.distributed

# Long enough for rank-0-only work between collectives (checkpoints, images) and a slow read; short enough
# that a stalled rank surfaces within minutes, not after torch's default of 30.
DEFAULT_TIMEOUT_MINUTES = 10.0
_timeout_minutes = DEFAULT_TIMEOUT_MINUTES
# gloo's words when a peer did not answer in time: at a collective, or at DDP's buffer broadcast
GLOO_TIMEOUT_MESSAGES = ("Timed out waiting", "Application timeout caused pair closure")


def initialize(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> torch.device:
    """Join the process group if launched by torchrun (collectives give up after `timeout_minutes`); return
    this process's device."""
    global _timeout_minutes
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _timeout_minutes = timeout_minutes
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


# What cpu_threads (CPU_THREADS) means, in every script's --help.
CPU_THREADS_HELP = ("torch threads per process on the CPU; 0: automatic, the cores this process may use less one per "
                    "DataLoader worker (at least 1), not torch's one per core")


def automatic_cpu_threads(num_workers: int) -> int:
    """Torch threads for `cpu_threads` 0: this process's share of the cores it may run on, less one per DataLoader
    worker, at least 1. torch's own default (a thread per core) ignores the workers; with more busy threads than
    cores, its threads wait for each other at every operation: on a shared 2-core machine, 2 threads ran 3× slower
    than 1 (README, "A CPU path")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine
    return max(1, cores // processes_here - num_workers)


def set_cpu_threads(device: torch.device, cpu_threads: int, num_workers: int) -> None:
    """On the CPU, torch's threads: `cpu_threads`, or automatic_cpu_threads for 0 (CPU_THREADS_HELP)."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads or automatic_cpu_threads(num_workers))


def stalled_rank_line(error: BaseException) -> str | None:
    """One line for a collective operation that timed out waiting for another rank, or None for any other error.
    With two processes the other rank is named; with more, gloo does not say which one it waited for."""
    if not is_distributed() or not any(words in str(error) for words in GLOO_TIMEOUT_MESSAGES):
        return None
    me, size = rank(), world_size()
    others = f"rank {1 - me}" if size == 2 else "another rank"
    return (f"rank {me} of {size}: {others} did not answer at a collective operation within {_timeout_minutes:g} min "
            "(it stalled or died; the timeout is the setting dist_timeout_minutes); stopping")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU; nothing on the CPU, where bf16 runs 20-50× slower than fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model in DistributedDataParallel under torchrun, the model itself otherwise."""
    if not is_distributed():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_master() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (a copy; the input is untouched)."""
    value = value.detach().clone()
    if is_distributed():
        torch.distributed.all_reduce(value)
        value /= world_size()
    return value


def all_gather_object(value) -> list:
    """Every process's picklable `value`, in rank order (a list of one without torchrun)."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def finalize() -> None:
    """Wait for every process, then close the group. Call it once the DDP model is gone (after the entry
    script's main() has returned): a process whose DDP model outlived the group, or whose peer had already
    closed its side, could block at exit, holding the job open after all its outputs were written."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
