"""Launch an engine on one process, or spawn NUM_PROC_PER_NODE processes on this node.

``main(argv)`` is the command line of tools/run_distributed_engines.py: compose and validate the
config (errors are printed without a traceback, exit status 2), then run ENGINE_NAME.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from vissl_vit.config import compose_config
from vissl_vit.errors import ConfigError
from vissl_vit.utils.cli import cli_main

USAGE = """usage: python tools/run_distributed_engines.py config=<path> [config.KEY=value ...] [+config/<group>=<name> ...]

  config=<path>           a config under configs/config/, without .yaml
                          (e.g. config=quickstart/vit_fashion_mnist)
  config.KEY.SUBKEY=v     override one key of defaults.yaml (e.g. config.OPTIMIZER.num_epochs=1)
  +config/<group>=<name>  add the overlay configs/config/<group>/<name>.yaml
"""


def _engine(name: str) -> Callable[..., object]:
    from vissl_vit.engine.train_engine import run_train_engine

    engines = {"train": run_train_engine}
    if name not in engines:
        raise ConfigError(f"config.ENGINE_NAME='{name}': expected one of {', '.join(engines)}.")
    return engines[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, cfg_yaml: str, init_method: str, world_size: int, backend: str) -> None:
    cfg_root = OmegaConf.create(cfg_yaml)
    dist.init_process_group(backend, init_method=init_method, rank=local_rank, world_size=world_size)
    try:
        _engine(cfg_root.config.ENGINE_NAME)(cfg_root, rank=local_rank, local_rank=local_rank, world_size=world_size)
    finally:
        dist.destroy_process_group()


def launch(cfg_root: DictConfig) -> None:
    """Run ENGINE_NAME in this process (world size 1) or in NUM_PROC_PER_NODE spawned processes."""
    cfg = cfg_root.config
    d = cfg.DISTRIBUTED
    engine = _engine(cfg.ENGINE_NAME)
    if d.NUM_NODES > 1:
        raise ConfigError("config.DISTRIBUTED.NUM_NODES > 1 is not supported yet: run on one node.")
    world = d.NUM_PROC_PER_NODE
    if world == 1:
        engine(cfg_root)
        return
    backend = d.BACKEND if d.BACKEND != "auto" else ("nccl" if cfg.MACHINE.DEVICE == "gpu" else "gloo")
    if d.INIT_METHOD != "tcp":
        raise ConfigError(f"config.DISTRIBUTED.INIT_METHOD='{d.INIT_METHOD}' is not supported yet: use tcp.")
    run_id = d.RUN_ID if d.RUN_ID != "auto" else f"127.0.0.1:{_free_port()}"
    torch.multiprocessing.spawn(
        _worker, args=(OmegaConf.to_yaml(cfg_root), f"tcp://{run_id}", world, backend), nprocs=world, join=True
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(lambda args: launch(compose_config(args)), sys.argv[1:] if argv is None else argv, USAGE)


if __name__ == "__main__":
    sys.exit(main())
