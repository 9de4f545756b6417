"""cpu_threads 0 gives torch the cores left after the DataLoader workers, never torch's one thread per core
that thrashes when the workers (or other jobs) also want them."""
import pytest

from pretrain import dist


@pytest.mark.parametrize("cores, workers, processes, threads", [
    (2, 2, None, 1),  # the project's 2-core machine with the quickstart's 2 workers
    (8, 2, None, 6),  # a laptop
    (8, 2, "2", 2),  # torchrun with 2 processes on the machine: each has 4 cores, 2 of them for its workers
    (1, 0, None, 1),
    (2, 4, None, 1),  # more workers than cores: still one thread
])
def test_automatic_cpu_threads_leave_the_workers_their_cores(monkeypatch, cores, workers, processes, threads):
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert dist.automatic_cpu_threads(workers) == threads
