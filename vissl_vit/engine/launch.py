"""Launch an engine: one code path for spawned workers, torchrun, and SLURM's srun.

- torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: this process is one
  worker; the process group is initialised from the environment.
- srun with several tasks sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and the node list: this
  process is one worker; the master is the allocation's first node, the port RUN_ID's.
- Otherwise this process spawns NUM_PROC_PER_NODE workers, with global ranks
  NODE_ID x NUM_PROC_PER_NODE + local rank, meeting through INIT_METHOD / RUN_ID.

A worker that fails (an exception, a signal such as kill -9, the OOM killer) ends the job: the
other workers of its node are killed, workers on other nodes fail their next collective within
DISTRIBUTED.TIMEOUT_SECONDS, and the exit status is 2 with one line naming the rank. When a
collective times out or loses its peer, the launcher names the worker that caused it (one that is
stopped, e.g. by SIGSTOP, or dead), not the healthy rank that noticed. Workers die with their
parent (PR_SET_PDEATHSIG), so none is left behind.

Signals: SIGTERM and SIGUSR1 (preemption) are forwarded to the workers, whose PreemptionHook
finishes the step, checkpoints and exits 0. Ctrl-C (SIGINT) stops the job: the launcher asks the
workers to checkpoint and stop (SIGTERM), kills what is left after STOP_GRACE_SECONDS (or at a
second Ctrl-C), and exits 130. Workers ignore SIGINT, so a terminal's Ctrl-C, which reaches the
whole foreground group, is handled once, by the launcher.

The run folder is locked for the life of the run (run_lock.py): by the launcher before any worker
starts, or by rank 0 under torchrun / srun.

``main(argv)`` is the command line of tools/run_distributed_engines.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import pickle
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from vissl_vit.config import compose_config
from vissl_vit.engine.run_lock import lock_run_folder
from vissl_vit.errors import ConfigError, UserError
from vissl_vit.utils.cli import cli_main, exit_status, usage_status

if TYPE_CHECKING:
    import torch.multiprocessing  # imported where used: --help and --list-configs need no torch

logger = logging.getLogger(__name__)

USAGE = """usage: python tools/run_distributed_engines.py config=<path> [config.KEY=value ...] [+config/<group>=<name> ...]

  config=<path>           a config under configs/config/, without .yaml
                          (e.g. config=quickstart/vit_fashion_mnist), or a path to your own .yaml
                          file (e.g. config=./my_run.yaml, or a run folder's train_config.yaml
                          to rerun that run)
  config.KEY.SUBKEY=v     override one key of defaults.yaml (e.g. config.OPTIMIZER.num_epochs=1)
  +config/<group>=<name>  add the overlay configs/config/<group>/<name>.yaml
  --print-config          print the composed config and the values derived from it; run nothing
  --list-configs          list the configs under configs/config/
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


def process_group_backend(backend: str) -> str:
    """init_process_group's backend for DISTRIBUTED.BACKEND's ``backend`` ("gloo", "nccl").

    NCCL carries CUDA tensors only, and the engine's per-step collectives (the preemption flag,
    the bad-image count, the meters' counts, loss sums, gathered RNG states) are CPU tensors: a
    CUDA backend is paired with gloo for CPU tensors, and torch routes each tensor by its device.
    """
    return backend if backend == "gloo" else f"cpu:gloo,cuda:{backend}"


class CollectiveError(UserError):
    """A collective of this worker timed out or lost its peer: another worker died, is stopped or hangs."""


# Exit status of a spawned worker whose collective failed (CollectiveError): the launcher then
# looks for the worker that caused it instead of blaming this one.
COLLECTIVE_FAILED = 3

# gloo and NCCL errors: a timeout ("Timed out waiting 20000ms for recv operation"), a peer that
# left ("Connection closed by peer"), a watchdog report. Others are the worker's own errors.
_COLLECTIVE_ERROR = re.compile(r"/gloo/|NCCL|Connection (closed|reset) by peer|ProcessGroup")


def _is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and bool(_COLLECTIVE_ERROR.search(str(e))))


def run_worker(cfg_root: DictConfig, info: WorkerInfo) -> None:
    """Initialise the process group (if several workers) and run ENGINE_NAME as this worker.

    Under torchrun / srun (no launcher of ours), rank 0 locks the run folder first.

    Raises:
        CollectiveError: a collective timed out or lost its peer (the message says which rank).
    """
    import torch
    import torch.distributed as dist

    from vissl_vit.engine.hooks.checkpoint_hook import catch_early_preemption

    engine = _engine(cfg_root.config.ENGINE_NAME)
    catch_early_preemption()
    lock = lock_run_folder(cfg_root.config.CHECKPOINT.DIR) if info.how != "spawn" and info.rank == 0 else None
    try:
        if info.world_size == 1:
            engine(cfg_root)
            return
        if cfg_root.config.MACHINE.DEVICE == "gpu" and torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        seconds = cfg_root.config.DISTRIBUTED.TIMEOUT_SECONDS
        dist.init_process_group(
            process_group_backend(info.backend),
            init_method=info.init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=seconds),
        )
        try:
            engine(cfg_root, rank=info.rank, local_rank=info.local_rank, world_size=info.world_size)
        except Exception as e:
            if not _is_collective_failure(e):
                dist.destroy_process_group()
                raise
            # no destroy_process_group: it can block on the peer that is gone or stuck
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CollectiveError(
                f"rank {info.rank}: a collective failed ({first}): another worker died, is stopped or hangs "
                f"(DISTRIBUTED.TIMEOUT_SECONDS={seconds})"
            ) from None
        dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.release()


# Signals that stop a run. The launcher blocks them while it starts the workers (they inherit the
# mask), so that none reaches a worker before it has set up its own handling.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}


def _spawned_worker(
    local_rank: int, cfg_yaml: str, node_id: int, local_world: int, world: int, init: str, backend: str
) -> None:
    from vissl_vit.engine.hooks.checkpoint_hook import catch_early_preemption

    _die_with_parent()
    # Ctrl-C is the launcher's to handle (it forwards SIGTERM): a terminal's Ctrl-C reaches the
    # whole foreground group, this worker and its loader workers included
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    catch_early_preemption()  # a SIGTERM while the run is built stops it cleanly before its first step
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    info = WorkerInfo(node_id * local_world + local_rank, local_rank, world, local_world, init, backend, "spawn")
    try:
        run_worker(OmegaConf.create(cfg_yaml), info)
    except CollectiveError as e:
        logger.error("%s", e)  # the launcher's one line names the worker that caused it
        sys.exit(COLLECTIVE_FAILED)
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


# Seconds the launcher waits after Ctrl-C for the workers to finish their step, checkpoint and
# exit, before it kills them (a second Ctrl-C kills them at once).
STOP_GRACE_SECONDS = 120

RESUME_HINT = "Rerun the same command to resume from the last checkpoint."


def _proc_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("R", "S", "T" stopped, "t" traced, "Z"...), "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]  # the name, in parentheses, may hold spaces
    except (OSError, IndexError):
        return ""


def _death(exitcode: int) -> str:
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else str(-exitcode)
        hint = " (SIGKILL: killed, possibly by the out-of-memory killer)" if name == "SIGKILL" else ""
        return f"died with signal {name}{hint}"
    return f"exited with status {exitcode}"


class _Supervisor:
    """Watches this node's spawned workers until they have all ended.

    Forwards SIGTERM / SIGUSR1 to them; on Ctrl-C asks them to stop (SIGTERM), kills them after
    STOP_GRACE_SECONDS or a second Ctrl-C, and raises KeyboardInterrupt; when one fails, kills the
    others and raises a UserError naming the worker that caused the failure.

    Args:
        ctx: the workers (torch.multiprocessing's ProcessContext).
        first_rank: the global rank of local worker 0.
        timeout_s: DISTRIBUTED.TIMEOUT_SECONDS, for the message.
    """

    def __init__(self, ctx: torch.multiprocessing.ProcessContext, first_rank: int, timeout_s: int) -> None:
        self.ctx, self.first_rank, self.timeout_s = ctx, first_rank, timeout_s
        self.interrupted_at: float | None = None
        self.killed = False

    def _signal_all(self, signum: int) -> None:
        for p in self.ctx.processes:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        self._signal_all(signal.SIGKILL)  # SIGKILL also ends a stopped worker
        for p in self.ctx.processes:
            p.join()

    def on_signal(self, signum: int, _frame: object) -> None:
        """Signal handler (runs between the main loop's waits; writes with os.write, which is reentrant)."""
        if signum != signal.SIGINT:  # preemption: each worker checkpoints and stops (PreemptionHook)
            self._signal_all(signum)
            return
        if self.interrupted_at is None:
            self.interrupted_at = time.monotonic()
            note = (
                f"vissl_vit: interrupted: the workers checkpoint at the end of this step and stop (killed in "
                f"{STOP_GRACE_SECONDS} s, or at a second Ctrl-C)\n"
            )
            os.write(2, note.encode())
            self._signal_all(signal.SIGTERM)
        else:
            self.killed = True
            self._signal_all(signal.SIGKILL)

    def run(self) -> None:
        """Wait for every worker. Raises KeyboardInterrupt after Ctrl-C, UserError when a worker failed."""
        sentinels = {p.sentinel: i for i, p in enumerate(self.ctx.processes)}
        while sentinels:
            for s in multiprocessing.connection.wait(list(sentinels), timeout=1.0):
                i = sentinels.pop(s)
                self.ctx.processes[i].join()
                if self.ctx.processes[i].exitcode != 0 and self.interrupted_at is None:
                    raise self._failure(i)
            if self.interrupted_at is not None and time.monotonic() - self.interrupted_at > STOP_GRACE_SECONDS:
                self.killed = True
                self._signal_all(signal.SIGKILL)
        if self.interrupted_at is not None:
            if self.killed:
                print("vissl_vit: the workers were killed before they could stop by themselves", file=sys.stderr)
            raise KeyboardInterrupt

    def _culprit(self, failed: int) -> tuple[int, int, str] | None:
        """(index, pid, what) of another worker that is stopped or dead: the cause of a collective
        that timed out (a stopped peer never arrives) or lost its peer (a dead one left)."""
        for i, p in enumerate(self.ctx.processes):
            if i == failed:
                continue
            if p.exitcode is None and _proc_state(p.pid) in ("T", "t"):
                return i, p.pid, "is stopped (SIGSTOP) and did not reach the collective"
        for i, p in enumerate(self.ctx.processes):
            if i != failed and p.exitcode not in (None, 0):
                return i, p.pid, _death(p.exitcode)
        return None

    def _error_text(self, index: int) -> str:
        """The traceback torch's spawn wrapper saved for a worker that raised (or "")."""
        try:
            with open(self.ctx.error_files[index], "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError):
            return ""

    def _failure(self, index: int) -> UserError:
        """Kill the other workers; the error naming the worker that caused the failure of ``index``."""
        failed = self.ctx.processes[index]
        rank, code = self.first_rank + index, failed.exitcode
        culprit = self._culprit(index)
        self._kill_all()
        end = f"All workers of this node were killed. {RESUME_HINT}"
        if code == COLLECTIVE_FAILED:
            noticed = f"rank {rank} timed out after DISTRIBUTED.TIMEOUT_SECONDS={self.timeout_s} s"
            if culprit is not None and "stopped" not in culprit[2]:
                noticed = f"rank {rank}'s collective lost it"
        else:
            noticed = f"rank {rank} (pid {failed.pid}) {_death(code)}"
        if culprit is not None and (code == COLLECTIVE_FAILED or "stopped" in culprit[2]):
            i, pid, what = culprit
            return UserError(f"worker rank {self.first_rank + i} (pid {pid}) {what}; {noticed}. {end}")
        if code == COLLECTIVE_FAILED:
            return UserError(
                f"worker rank {rank} (pid {failed.pid}): a collective timed out (DISTRIBUTED.TIMEOUT_SECONDS="
                f"{self.timeout_s} s) or lost its peer, and no worker of this node is stopped or dead: a worker on "
                f"another node failed or hangs (rank {rank}'s error is in its log). {end}"
            )
        if code == 2:  # a UserError: the worker printed its one-line message; resuming would not help
            return UserError(
                f"worker rank {rank} stopped on the error above; the other workers of this node were stopped."
            )
        trace = self._error_text(index) if code == 1 else ""
        if trace:
            return UserError(f"worker rank {rank} (pid {failed.pid}) failed. {end} Its error:\n{trace}")
        return UserError(f"worker rank {rank} (pid {failed.pid}) {_death(code)}. {end}")


def _spawn_and_supervise(cfg_root: DictConfig, world: int, init: str, backend: str) -> None:
    """Start this node's workers and supervise them until they have all ended."""
    import torch.multiprocessing

    from vissl_vit.engine.hooks.checkpoint_hook import early_preemption

    d = cfg_root.config.DISTRIBUTED
    # the stop signals stay blocked while the workers start: they inherit the mask (through spawn's
    # exec) and unblock it only once they ignore SIGINT; here they wait for the handlers below.
    # The resource tracker is started first: starting it unblocks SIGINT and SIGTERM (bpo-33613).
    multiprocessing.resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        ctx = torch.multiprocessing.start_processes(
            _spawned_worker,
            args=(OmegaConf.to_yaml(cfg_root), d.NODE_ID, d.NUM_PROC_PER_NODE, world, init, backend),
            nprocs=d.NUM_PROC_PER_NODE,
            join=False,
            start_method="spawn",
        )
        supervisor = _Supervisor(ctx, d.NODE_ID * d.NUM_PROC_PER_NODE, d.TIMEOUT_SECONDS)
        previous = {s: signal.signal(s, supervisor.on_signal) for s in _STOP_SIGNALS}
        if early_preemption():  # it came after launch() looked: the workers stop before their first step
            supervisor.on_signal(signal.SIGTERM, None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        supervisor.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in ctx.processes:  # nothing may outlive the launcher (multiprocessing would wait for it)
            if p.exitcode is None:
                p.kill()
                p.join()
        for f in ctx.error_files:
            if os.path.exists(f):
                os.unlink(f)


def launch(cfg_root: DictConfig, early_signals: list[int] | tuple[int, ...] = ()) -> None:
    """Run ENGINE_NAME as a torchrun / srun worker, in this process, or in spawned workers.

    Args:
        cfg_root: the composed config.
        early_signals: SIGTERM / SIGUSR1 received before this call (the command line records them
            from its first line): the run then stops before it starts, with exit status 0.
    """
    import torch

    from vissl_vit.engine.hooks.checkpoint_hook import catch_early_preemption, early_preemption

    catch_early_preemption(early_signals)
    cfg = cfg_root.config
    info = environment_worker(cfg)
    if info is not None:
        run_worker(_with_world(cfg_root, info), info)
        return
    d = cfg.DISTRIBUTED
    if not 0 <= d.NODE_ID < d.NUM_NODES:
        raise ConfigError(f"config.DISTRIBUTED.NODE_ID={d.NODE_ID} must be in [0, NUM_NODES={d.NUM_NODES}).")
    world = d.NUM_NODES * d.NUM_PROC_PER_NODE
    backend, init = (_backend(cfg), _spawn_init_method(cfg)) if world > 1 else ("gloo", "")
    if backend == "nccl" and torch.cuda.device_count() < d.NUM_PROC_PER_NODE:
        raise ConfigError(
            f"config.DISTRIBUTED.NUM_PROC_PER_NODE={d.NUM_PROC_PER_NODE} GPU workers, but this machine has "
            f"{torch.cuda.device_count()} GPU(s)."
        )
    # node 0's launcher holds the run folder (the other nodes' workers do not write it, and on a
    # shared file system they would find it locked by node 0)
    lock = lock_run_folder(cfg.CHECKPOINT.DIR) if d.NODE_ID == 0 else None
    try:
        if world > 1 and early_preemption():
            print(f"vissl_vit: received {early_preemption()} before the workers started: nothing was started.")
            return
        if world == 1:  # in this process; run_worker adds nothing for one worker (the lock is held above)
            _engine(cfg.ENGINE_NAME)(cfg_root)
        else:
            _spawn_and_supervise(cfg_root, world, init, backend)
    finally:
        if lock is not None:
            lock.release()


def main(argv: list[str] | None = None, early_signals: list[int] | None = None) -> int:
    """The command line; returns the exit status.

    Args:
        argv: the arguments (default: sys.argv[1:]).
        early_signals: stop signals the calling script recorded while it imported this module.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--list-configs" in argv:
        from vissl_vit.config import list_configs

        print("\n".join(list_configs()))
        return 0
    if "--print-config" in argv:
        args = [a for a in argv if a != "--print-config"]
        return cli_main(lambda a: print(describe_config(compose_config(a))), args, USAGE)
    code = usage_status(argv, USAGE)
    if code is not None:
        return code
    # the run itself is called from here, not through cli_main, so that the path from the command
    # line to the model stays main -> launch -> engine -> Trainer.train -> step -> model (issue 13)
    with exit_status() as status:
        launch(compose_config(argv), early_signals or ())
    return status.code


def describe_config(cfg_root: DictConfig) -> str:
    """The composed config as YAML, followed by the values derived from it (world size, global batch,
    iterations, the auto-scaled LR schedule) when the training set can be read, as the run would log
    them: what ``--print-config`` prints, without starting anything."""
    text = OmegaConf.to_yaml(cfg_root)
    cfg = cfg_root.config
    if cfg.ENGINE_NAME != "train" or not len(cfg.DATA.TRAIN.DATA_SOURCES):
        return text
    from vissl_vit.config.derive import derive_run_values
    from vissl_vit.data.build import build_dataset

    derived = derive_run_values(cfg, len(build_dataset(cfg, "TRAIN")))
    return text + OmegaConf.to_yaml({"derived": derived.as_dict()})


if __name__ == "__main__":
    sys.exit(main())
