"""The "train" engine: build everything from the config, resume if asked, train, test."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vissl_vit.config.derive import DerivedValues, derive_run_values
from vissl_vit.data import build_dataloader, build_dataset
from vissl_vit.data.build import log_data_summary
from vissl_vit.data.collators.device_mixup import build_device_mixup
from vissl_vit.engine.checkpoint import find_latest, load_checkpoint, remove_stale_tmp_files
from vissl_vit.engine.hooks import HookBase, HookContext, Preempted, TestHook, build_hooks, restore_trainer
from vissl_vit.engine.hooks.phases import PhaseWriter
from vissl_vit.engine.parallel import amp_dtype, convert_sync_bn, wrap_model
from vissl_vit.engine.resume_config import check_resume_config
from vissl_vit.engine.trainer import BatchTransform, Trainer
from vissl_vit.errors import ConfigError
from vissl_vit.losses import build_loss
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.optim import build_lr_scheduler, build_optimizer, build_wd_scheduler
from vissl_vit.utils.environment import write_environment
from vissl_vit.utils.logging import JsonLinesWriter, setup_logging

logger = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(cfg: DictConfig, local_rank: int) -> torch.device:
    """MACHINE.DEVICE -> a torch.device; gpu without CUDA is an error, not a silent CPU run."""
    if cfg.MACHINE.DEVICE == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("config.MACHINE.DEVICE=gpu but torch sees no CUDA device; set config.MACHINE.DEVICE=cpu.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def write_run_config(run_dir: str, cfg_root: DictConfig, derived: DerivedValues) -> None:
    """train_config.yaml: the composed config, and what was derived from it."""
    text = OmegaConf.to_yaml(cfg_root) + OmegaConf.to_yaml({"derived": derived.as_dict()})
    tmp = os.path.join(run_dir, ".train_config.yaml.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(run_dir, "train_config.yaml"))


def _tensorboard(cfg: DictConfig, run_dir: str, primary: bool) -> Any:
    if not (primary and cfg.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD):
        return None
    if "tensorflow" not in sys.modules:
        # tensorboard imports TensorFlow, when it is installed, for its file I/O, and TensorFlow's
        # import slows torch's CPU training down (quickstart/overlays=simplevit on 2 cores: 178
        # img/s with it, 468 without). tensorboard's own switch, a module tensorboard.compat.notf,
        # makes it use its TensorFlow stub, which writes the same event files.
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(
        os.path.join(run_dir, "tb_logs"), flush_secs=30, max_queue=cfg.HOOKS.TENSORBOARD_SETUP.FLUSH_EVERY_N_ITER
    )


def _checkpoint_to_resume(cfg: DictConfig, run_dir: str) -> str | None:
    """The checkpoint this run resumes from (None: train from scratch), as CHECKPOINT.* say."""
    path = find_latest(run_dir)
    if path is None:
        return None
    if not cfg.CHECKPOINT.AUTO_RESUME:
        if not cfg.CHECKPOINT.OVERWRITE_EXISTING:
            raise ConfigError(
                f"{run_dir} already holds checkpoints ({os.path.basename(path)}) and config.CHECKPOINT.AUTO_RESUME=False: "
                "resume with AUTO_RESUME=True, choose another config.CHECKPOINT.DIR, or set "
                "config.CHECKPOINT.OVERWRITE_EXISTING=True to train from scratch over them."
            )
        logger.warning("Training from scratch over the checkpoints in %s (OVERWRITE_EXISTING=True)", run_dir)
        return None
    return path


def _resume(trainer: Trainer, path: str | None, state: dict[str, Any] | None) -> None:
    if state is None:
        return
    logger.info("Resuming from %s", path)
    restore_trainer(trainer, state)
    logger.info("Resumed at iteration %d (epoch %d)", trainer.iteration, trainer.epoch)


def _start_process(cfg: DictConfig, rank: int, local_rank: int) -> tuple[str, torch.device]:
    """The run folder (made), this process's log, CPU threads, device and initial seed."""
    run_dir = os.path.abspath(cfg.CHECKPOINT.DIR)
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(run_dir, rank, all_ranks=cfg.LOG_ALL_RANKS)
    if cfg.MACHINE.CPU_THREADS > 0:
        torch.set_num_threads(cfg.MACHINE.CPU_THREADS)
    device = get_device(cfg, local_rank)
    seed_all(cfg.SEED_VALUE)  # the same initial model on every rank (FSDP shards it in place)
    return run_dir, device


def _read_resume_state(
    cfg_root: DictConfig, run_dir: str, primary: bool, derived: DerivedValues
) -> tuple[str | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its state (None, None: from scratch); then this run's config
    is written. The checkpoint is read and its config compared before train_config.yaml is
    overwritten, so a refused resume leaves the old run's config as it was (every rank checks: they
    stop together)."""
    cfg = cfg_root.config
    path = _checkpoint_to_resume(cfg, run_dir)
    state = load_checkpoint(path, cfg.CHECKPOINT.ALLOW_PICKLE_CODE_EXECUTION) if path else None
    if state is not None:
        check_resume_config(cfg_root, state, run_dir, path, warn=primary)
    if primary:
        remove_stale_tmp_files(run_dir)  # the run folder is this run's now: a temporary file is a dead run's
        write_run_config(run_dir, cfg_root, derived)
    if cfg.VERBOSE:
        logger.info("Config:\n%s", OmegaConf.to_yaml(cfg_root))
    return path, state


def _build_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The model with its initial weights (MODEL.WEIGHTS_INIT), on ``device``, before wrapping."""
    model = build_model(cfg)
    apply_weights_init(model, cfg)  # before wrapping; a resumed run then loads its own checkpoint over it
    model = model.to(device)
    if cfg.VERBOSE:
        logger.info("Model:\n%s", model)
        names = "\n".join(f"  {n} {tuple(p.shape)}" for n, p in model.named_parameters())
        logger.info("Parameters (what non_regularized_parameters matches):\n%s", names)
    logger.info("Model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def _build_trainer(
    cfg: DictConfig,
    derived: DerivedValues,
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Any,
    device: torch.device,
    rank: int,
) -> Trainer:
    clip = cfg.MODEL.GRAD_CLIP
    norm_type = float(clip.NORM_TYPE) if clip.NORM_TYPE != "inf" else float("inf")
    return Trainer(
        model,
        loss_fn,
        optimizer,
        build_lr_scheduler(derived),
        train_loader,
        iterations_per_epoch=max(derived.iterations_per_epoch, 1),
        max_iterations=derived.max_iterations,
        update_interval=cfg.OPTIMIZER.param_schedulers.lr.update_interval,
        device=device,
        grad_clip=(clip.MAX_NORM, norm_type) if clip.USE_GRAD_CLIP else None,
        accumulation=derived.grad_accumulation_steps,
        amp_dtype=amp_dtype(cfg, device),
        wd_scheduler=build_wd_scheduler(derived),
        sync_every=cfg.LOG_FREQUENCY,  # the host reads the step scalars once per log line
        batch_transform=_batch_transform(cfg, rank),
    )


def _batch_transform(cfg: DictConfig, rank: int) -> BatchTransform | None:
    """DATA.TRAIN.DEVICE_MIXUP (big_vision's mixup, on the device), or None when it is off. Each
    (rank, micro-batch) draws its own mixing weight, as each device does in big_vision."""
    mixup = build_device_mixup(cfg, cfg.SEED_VALUE)
    if mixup is None:
        return None
    return lambda images, target, number: mixup(images, target, number, rank)


def _open_writers(stack: contextlib.ExitStack, cfg: DictConfig, run_dir: str, primary: bool) -> tuple[Any, Any, Any]:
    """stdout.json, metrics.json and tensorboard writers (None on ranks > 0), closed with ``stack``."""
    stdout_json = JsonLinesWriter(os.path.join(run_dir, "stdout.json")) if primary else None
    metrics_json = JsonLinesWriter(os.path.join(run_dir, "metrics.json")) if primary else None
    tb = _tensorboard(cfg, run_dir, primary)
    for w in (stdout_json, metrics_json, tb):
        if w is not None:
            stack.callback(w.close)
    return stdout_json, metrics_json, tb


def _hook_context(
    stack: contextlib.ExitStack,
    cfg_root: DictConfig,
    run_dir: str,
    rank: int,
    world_size: int,
    device: torch.device,
    train_size: int,
    num_epochs: int,
) -> HookContext:
    """What build_hooks needs besides the config: this process's place, the test loader (TEST_MODEL)
    and the writers (opened here, closed with ``stack``)."""
    cfg, primary = cfg_root.config, rank == 0
    stdout_json, metrics_json, tb = _open_writers(stack, cfg, run_dir, primary)
    test_loader = None
    if cfg.TEST_MODEL:
        test_ds = build_dataset(cfg, "TEST")
        if primary:
            log_data_summary(cfg, "TEST", test_ds)
        test_loader = build_dataloader(cfg, "TEST", test_ds, rank, world_size, device)
    return HookContext(
        run_dir=run_dir,
        primary=primary,
        world_size=world_size,
        train_size=train_size,
        test_loader=test_loader,
        stdout_json=stdout_json,
        tb=tb,
        phase_writer=PhaseWriter(metrics_json, tb, cfg.METERS.name or "meter"),
        config_yaml=OmegaConf.to_yaml(cfg_root),
        num_epochs=num_epochs,
    )


def run_train_engine(
    cfg_root: DictConfig,
    rank: int = 0,
    local_rank: int = 0,
    world_size: int = 1,
    extra_hooks: Sequence[HookBase] = (),
) -> Trainer:
    """Train (and test) as the config says, in this process; returns the finished Trainer.

    Args:
        cfg_root: a composed config (``compose_config``), with ``config`` under it.
        rank: this process's global rank.
        local_rank: its rank on this node (its GPU).
        world_size: processes in all.
        extra_hooks: hooks to call besides the config's, after HOOKS.EXTRA's (see ``build_hooks``).
    """
    OmegaConf.set_readonly(cfg_root, True)  # frozen: no component may change the run's config
    cfg, primary = cfg_root.config, rank == 0
    run_dir, device = _start_process(cfg, rank, local_rank)

    train_ds = build_dataset(cfg, "TRAIN") if len(cfg.DATA.TRAIN.DATA_SOURCES) else None
    if train_ds is not None and primary:
        log_data_summary(cfg, "TRAIN", train_ds)  # source, images, classes, size after the transforms
    derived = derive_run_values(cfg, len(train_ds) if train_ds is not None else 0)
    resume_path, resume_state = _read_resume_state(cfg_root, run_dir, primary, derived)

    model = _build_model(cfg, device)
    loss_fn = build_loss(cfg).to(device)
    model = wrap_model(convert_sync_bn(model, cfg, world_size, device), cfg, device, local_rank, world_size)
    optimizer = build_optimizer(cfg, model)
    seed_all(cfg.SEED_VALUE + rank)  # from here on each rank draws its own dropout / drop-path
    train_loader = build_dataloader(cfg, "TRAIN", train_ds, rank, world_size, device) if train_ds is not None else None
    trainer = _build_trainer(cfg, derived, model, loss_fn, optimizer, train_loader, device, rank)

    with contextlib.ExitStack() as writers:
        train_size = len(train_ds) if train_ds is not None else 0
        context = _hook_context(writers, cfg_root, run_dir, rank, world_size, device, train_size, derived.num_epochs)
        trainer.register_hooks(build_hooks(cfg, context, model, extra_hooks))
        _resume(trainer, resume_path, resume_state)
        del resume_state  # the model and optimizer hold their copies now
        try:  # train, or only test; a preempted run stops cleanly (a rerun resumes)
            if cfg.TEST_ONLY:  # no before_train: env.json is written here
                if primary:
                    write_environment(run_dir, world_size)
                test_hook = next(h for h in trainer.hooks if isinstance(h, TestHook))  # TEST_ONLY needs TEST_MODEL
                test_hook.run_test(max(trainer.epoch - 1, 0))
            elif trainer.iteration >= trainer.max_iterations:
                logger.info("Training already complete (%d iterations); nothing to do.", trainer.iteration)
            else:
                trainer.train()
        except Preempted as e:
            logger.warning("Stopped: %s", e)
    logger.info("Done. Run folder: %s", run_dir)
    return trainer
