"""Launch an engine: one code path for spawned workers, torchrun, and SLURM's srun.

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: this process is one
  worker; the process group is initialised from the environment.
- srun with several tasks sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list: this
  process is one worker; the master is the allocation's first node, the port RUN_ID's.
- Otherwise this process spawns NUM_PROC_PER_NODE workers, with global ranks
  NODE_ID x NUM_PROC_PER_NODE + local rank, meeting through INIT_METHOD / RUN_ID.

A worker that fails (an exception, a signal such as kill -9, the OOM killer) ends the job: the
other workers of its node are stopped, workers on other nodes fail their next collective within
DISTRIBUTED.TIMEOUT_SECONDS, and the exit status is non-zero with a message naming the rank.
Workers die with their parent (PR_SET_PDEATHSIG), so none is left behind.

``main(argv)`` is the command line of tools/run_distributed_engines.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from vissl_vit.config import compose_config
from vissl_vit.errors import ConfigError, UserError
from vissl_vit.utils.cli import cli_main

logger = logging.getLogger(__name__)

USAGE = """usage: python tools/run_distributed_engines.py config=<path> [config.KEY=value ...] [+config/<group>=<name> ...]

  config=<path>           a config under configs/config/, without .yaml
                          (e.g. config=quickstart/vit_fashion_mnist)
  config.KEY.SUBKEY=v     override one key of defaults.yaml (e.g. config.OPTIMIZER.num_epochs=1)
  +config/<group>=<name>  add the overlay configs/config/<group>/<name>.yaml
"""


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """Where one worker stands in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    init_method: str
    backend: str
    how: str  # "spawn", "torchrun" or "slurm", for the log


def _engine(name: str) -> Callable[..., object]:
    from vissl_vit.engine.extract_engine import run_extract_features_engine, run_nearest_neighbor_engine
    from vissl_vit.engine.train_engine import run_train_engine

    engines = {
        "train": run_train_engine,
        "extract_features": run_extract_features_engine,
        "nearest_neighbor": run_nearest_neighbor_engine,
    }
    if name not in engines:
        raise ConfigError(f"config.ENGINE_NAME='{name}': expected one of {', '.join(engines)}.")
    return engines[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(cfg: DictConfig) -> str:
    b = cfg.DISTRIBUTED.BACKEND
    if b == "auto":
        return "nccl" if cfg.MACHINE.DEVICE == "gpu" else "gloo"
    if b not in ("nccl", "gloo"):
        raise ConfigError(f"config.DISTRIBUTED.BACKEND='{b}': expected nccl, gloo or auto.")
    if b == "nccl" and cfg.MACHINE.DEVICE == "cpu":
        raise ConfigError("config.DISTRIBUTED.BACKEND=nccl needs MACHINE.DEVICE=gpu; use gloo (or auto) on CPU.")
    return b


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,7],cpu1" -> "gpu03"."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise UserError(f"cannot read the SLURM node list '{nodelist}'")
    if not m.group(2):
        return m.group(1)
    first = m.group(3).split(",")[0].split("-")[0]
    return m.group(1) + first


def _port_of(run_id: str, default: int) -> int:
    return int(run_id.rsplit(":", 1)[1]) if ":" in run_id else int(run_id) if run_id.isdigit() else default


def environment_worker(cfg: DictConfig, env: dict[str, str] | None = None) -> WorkerInfo | None:
    """The WorkerInfo of a process started by torchrun or srun, or None for a plain command."""
    env = dict(os.environ) if env is None else env
    backend = _backend(cfg)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return WorkerInfo(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            world,
            int(env.get("LOCAL_WORLD_SIZE", world)),
            "env://",
            backend,
            "torchrun",
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        world = int(env["SLURM_NTASKS"])
        host = first_slurm_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost")))
        run_id = cfg.DISTRIBUTED.RUN_ID
        port = _port_of(run_id, 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "0").split("(")[0] or 0) or max(
            world // int(env.get("SLURM_NNODES", "1")), 1
        )
        return WorkerInfo(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            world,
            local_world,
            f"tcp://{host}:{port}",
            backend,
            "slurm",
        )
    return None


def _spawn_init_method(cfg: DictConfig) -> str:
    d = cfg.DISTRIBUTED
    if d.INIT_METHOD == "tcp":
        if d.RUN_ID == "auto":
            if d.NUM_NODES > 1:
                raise ConfigError(
                    "config.DISTRIBUTED.RUN_ID=auto picks a port on this machine only; with NUM_NODES > 1 give the "
                    "first node's host:port, e.g. config.DISTRIBUTED.RUN_ID=node0.cluster:29500."
                )
            return f"tcp://127.0.0.1:{_free_port()}"
        if ":" not in d.RUN_ID:
            raise ConfigError(f"config.DISTRIBUTED.RUN_ID='{d.RUN_ID}': with INIT_METHOD=tcp give host:port.")
        return f"tcp://{d.RUN_ID}"
    if d.INIT_METHOD == "file":
        if d.RUN_ID == "auto":
            raise ConfigError("config.DISTRIBUTED.INIT_METHOD=file needs RUN_ID, a path all nodes can see.")
        return f"file://{os.path.abspath(d.RUN_ID)}"
    if d.INIT_METHOD == "env":
        return "env://"
    raise ConfigError(f"config.DISTRIBUTED.INIT_METHOD='{d.INIT_METHOD}': expected tcp, file or env.")


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker if its launcher dies, so that no worker is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def run_worker(cfg_root: DictConfig, info: WorkerInfo) -> None:
    """Initialise the process group (if several workers) and run ENGINE_NAME as this worker."""
    engine = _engine(cfg_root.config.ENGINE_NAME)
    if info.world_size == 1:
        engine(cfg_root)
        return
    if cfg_root.config.MACHINE.DEVICE == "gpu" and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    timeout = datetime.timedelta(seconds=cfg_root.config.DISTRIBUTED.TIMEOUT_SECONDS)
    dist.init_process_group(
        info.backend, init_method=info.init_method, rank=info.rank, world_size=info.world_size, timeout=timeout
    )
    try:
        engine(cfg_root, rank=info.rank, local_rank=info.local_rank, world_size=info.world_size)
    finally:
        dist.destroy_process_group()


def _spawned_worker(
    local_rank: int, cfg_yaml: str, node_id: int, local_world: int, world: int, init: str, backend: str
):
    _die_with_parent()
    info = WorkerInfo(node_id * local_world + local_rank, local_rank, world, local_world, init, backend, "spawn")
    try:
        run_worker(OmegaConf.create(cfg_yaml), info)
    except UserError as e:
        print(f"vissl_vit: error (rank {info.rank}): {e}", file=sys.stderr)
        sys.exit(2)


def _with_world(cfg_root: DictConfig, info: WorkerInfo) -> DictConfig:
    """The config with DISTRIBUTED's sizes set to what torchrun / srun actually started."""
    d = cfg_root.config.DISTRIBUTED
    nodes = max(info.world_size // max(info.local_world_size, 1), 1)
    if (d.NUM_NODES, d.NUM_PROC_PER_NODE) != (nodes, info.world_size // nodes):
        print(
            f"vissl_vit: {info.how} started {info.world_size} workers ({nodes} node(s)); using them instead of "
            f"config.DISTRIBUTED.NUM_NODES={d.NUM_NODES} x NUM_PROC_PER_NODE={d.NUM_PROC_PER_NODE}",
            file=sys.stderr,
        )
        cfg_root = OmegaConf.merge(
            cfg_root, {"config": {"DISTRIBUTED": {"NUM_NODES": nodes, "NUM_PROC_PER_NODE": info.world_size // nodes}}}
        )
    return cfg_root


def launch(cfg_root: DictConfig) -> None:
    """Run ENGINE_NAME as a torchrun / srun worker, in this process, or in spawned workers."""
    cfg = cfg_root.config
    info = environment_worker(cfg)
    if info is not None:
        run_worker(_with_world(cfg_root, info), info)
        return
    d = cfg.DISTRIBUTED
    if not 0 <= d.NODE_ID < d.NUM_NODES:
        raise ConfigError(f"config.DISTRIBUTED.NODE_ID={d.NODE_ID} must be in [0, NUM_NODES={d.NUM_NODES}).")
    world = d.NUM_NODES * d.NUM_PROC_PER_NODE
    if world == 1:
        run_worker(cfg_root, WorkerInfo(0, 0, 1, 1, "", "gloo", "spawn"))
        return
    backend, init = _backend(cfg), _spawn_init_method(cfg)
    if backend == "nccl" and torch.cuda.device_count() < d.NUM_PROC_PER_NODE:
        raise ConfigError(
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={d.NUM_PROC_PER_NODE} GPU workers, but this machine has "
            f"{torch.cuda.device_count()} GPU(s)."
        )
    ctx = torch.multiprocessing.start_processes(
        _spawned_worker,
        args=(OmegaConf.to_yaml(cfg_root), d.NODE_ID, d.NUM_PROC_PER_NODE, world, init, backend),
        nprocs=d.NUM_PROC_PER_NODE,
        join=False,
        start_method="spawn",
    )

    def forward(signum, _frame):  # preemption: each worker checkpoints and stops (PreemptionHook)
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while not ctx.join():
            pass
    except torch.multiprocessing.ProcessExitedException as e:
        rank = d.NODE_ID * d.NUM_PROC_PER_NODE + e.error_index
        cause = f"signal {e.signal_name}" if e.signal_name else f"exit status {e.exit_code}"
        hint = " (SIGKILL: killed, possibly by the out-of-memory killer)" if e.signal_name == "SIGKILL" else ""
        raise UserError(
            f"worker rank {rank} (pid {e.error_pid}) died with {cause}{hint}; the other workers of this node were "
            "stopped. Rerun the same command to resume from the last checkpoint."
        ) from None
    except torch.multiprocessing.ProcessRaisedException as e:
        rank = d.NODE_ID * d.NUM_PROC_PER_NODE + e.error_index
        raise UserError(f"worker rank {rank} failed; the other workers were stopped. Its error:\n{e}") from None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(lambda args: launch(compose_config(args)), sys.argv[1:] if argv is None else argv, USAGE)


if __name__ == "__main__":
    sys.exit(main())
