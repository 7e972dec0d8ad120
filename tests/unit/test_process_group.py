"""The learners' process group: a rendezvous that cannot complete fails in bounded time, naming the address; a
complete one forms the group; on CUDA the group is bound to the process's device."""

import multiprocessing as mp
import socket
import time

import pytest
import torch

from trainers import distributed as D


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
def test_rendezvous_without_the_other_rank_fails_in_bounded_time():
    port = _port()
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{port} did not complete within 2 s"):
        D.init_process_group(0, 2, ("127.0.0.1", port), torch.device("cpu"), init_timeout_s=2.0)
    assert time.perf_counter() - t0 < 15
    assert not D.is_distributed()


def _rank(rank: int, port: int, out) -> None:
    D.init_process_group(rank, 2, ("127.0.0.1", port), torch.device("cpu"), init_timeout_s=30.0)
    t = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(t)
    out.put((rank, float(t)))
    D.destroy()


@pytest.mark.multiproc
def test_two_ranks_form_the_group():
    port = _port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert sorted(out.get(timeout=5) for _ in range(2)) == [(0, 3.0), (1, 3.0)]


def test_cuda_groups_are_bound_to_the_device(monkeypatch):
    assert D.group_device_kwargs(torch.device("cpu")) == {}
    chosen = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert D.group_device_kwargs(torch.device("cuda")) == {"device_id": torch.device("cuda", 0)}
    assert D.group_device_kwargs(torch.device("cuda", 3)) == {"device_id": torch.device("cuda", 3)}
    assert chosen == [0, 3]
