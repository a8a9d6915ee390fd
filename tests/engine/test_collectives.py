"""Collectives on a process group whose CUDA backend (NCCL) cannot carry CPU tensors.

There is no GPU here, so NCCL's one relevant property is imitated: a backend registered for
``devices=["cuda"]`` only (it is gloo underneath). A group made from it alone fails every CPU
collective the engine issues (the negative control: what an NCCL-only group does to the per-step
flags, counts and meters); the group launch builds, ``cpu:gloo,cuda:<it>``, runs them all, and
runs the real train engine (hooks, meters, checkpoints, the preemption flag, a test phase) in 2
processes through ``launch.run_worker``.
"""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from tests.conftest import read_losses
from vissl_vit.config import compose_config
from vissl_vit.engine.launch import WorkerInfo, process_group_backend, run_worker
from vissl_vit.utils import distributed as du

FAKE = "cuda_only_gloo"  # stands for nccl: a backend for CUDA tensors only


def _register_fake() -> None:
    def create(store, rank, size, timeout):  # noqa: ANN001, ANN202  torch's creator signature
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    if FAKE not in dist.Backend.backend_list:
        dist.Backend.register_backend(FAKE, create, devices=["cuda"])


def _engine_collectives(rank: int) -> dict[str, object]:
    """Every kind of collective the engine issues, on CPU tensors (as its hooks, meters, losses,
    checkpoints and extraction do), with the values each must return on 2 ranks."""
    x = torch.tensor([float(rank + 1)], dtype=torch.float64)
    shuffled, inverse = du.batch_shuffle(torch.arange(4.0).reshape(2, 2) + 10 * rank)
    return {
        "all_reduce_sum": du.all_reduce_sum(x).item(),  # guards, phases, logs, preemption flag, meters
        "all_reduce_max": du.all_reduce_max(x).item(),  # SwAV's Sinkhorn
        "all_gather_cat": du.all_gather_cat(x).tolist(),  # MoCo's keys
        "batch_shuffle": du.batch_unshuffle(shuffled, inverse).tolist(),  # broadcast of the permutation
        "all_gather_object": du.all_gather_object({"rank": rank}),  # RNG states in checkpoints
        "barrier": dist.barrier() or "done",  # feature extraction
        "new_group": (dist.all_reduce(t := x.clone(), group=dist.new_group([0, 1])), t.item())[1],  # sync BN
    }


def _collectives_worker(rank: int, ports: list[int]) -> None:
    _register_fake()
    for control, backend, port in ((True, FAKE, ports[0]), (False, process_group_backend(FAKE), ports[1])):
        timeout = datetime.timedelta(seconds=60)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timeout
        )
        try:
            if control:  # the negative control, a group of the CUDA-only backend alone: the test sees the bug
                with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
                    du.all_reduce_sum(torch.ones(1, dtype=torch.float64))
                continue
            got = _engine_collectives(rank)
            assert got["all_reduce_sum"] == 3.0 and got["all_reduce_max"] == 2.0 and got["new_group"] == 3.0
            assert got["all_gather_cat"] == [1.0, 2.0] and got["all_gather_object"] == [{"rank": 0}, {"rank": 1}]
            assert got["batch_shuffle"] == (torch.arange(4.0).reshape(2, 2) + 10 * rank).tolist()
        finally:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, *args) -> None:  # noqa: ANN001
    torch.multiprocessing.start_processes(fn, args=args, nprocs=2, join=True, start_method="spawn")


def test_a_cuda_backend_is_paired_with_gloo_for_cpu_tensors():
    assert process_group_backend("gloo") == "gloo"
    assert process_group_backend("nccl") == "cpu:gloo,cuda:nccl"


@pytest.mark.slow
def test_a_cuda_only_group_fails_the_engines_cpu_collectives_and_the_paired_group_runs_them():
    _spawn(_collectives_worker, [_free_port(), _free_port()])


def _engine_worker(rank: int, overrides: list[str], port: int) -> None:
    _register_fake()
    cfg_root = compose_config(overrides)
    run_worker(cfg_root, WorkerInfo(rank, rank, 2, 2, f"tcp://127.0.0.1:{port}", FAKE, "spawn"))


@pytest.mark.slow
def test_the_train_engine_runs_on_a_group_whose_cuda_backend_cannot_carry_cpu_tensors(tmp_path):
    run = tmp_path / "run"
    overrides = [
        "config=test/quick_vit",  # meters, a test phase every epoch, checkpoints, the preemption flag
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        "config.OPTIMIZER.num_epochs=1",
        "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2",
        "config.DISTRIBUTED.TIMEOUT_SECONDS=60",
        f"config.CHECKPOINT.DIR={run}",
    ]
    _spawn(_engine_worker, overrides, _free_port())
    assert sorted(read_losses(run)) == [1, 2, 3, 4]
    assert (run / "model_phase0.torch").exists() and (run / "model_iteration2.torch").exists()
    assert "test_accuracy_list_meter" in (run / "metrics.json").read_text()
