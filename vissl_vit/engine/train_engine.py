"""The "train" engine: build everything from the config, resume if asked, train, test."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from vissl_vit.config.derive import DerivedValues, derive_run_values
from vissl_vit.data import build_dataloader, build_dataset
from vissl_vit.engine.checkpoint import find_latest, load_checkpoint, remove_stale_tmp_files
from vissl_vit.engine.hooks import (
    BadImageHook,
    CheckpointHook,
    FreezeParamsHook,
    LogHook,
    MomentumEncoderHook,
    NanLossHook,
    NormalizePrototypesHook,
    Preempted,
    PreemptionHook,
    ProgressBarHook,
    TestHook,
    TrainMeterHook,
    restore_trainer,
)
from vissl_vit.engine.hooks.phases import PhaseWriter
from vissl_vit.engine.parallel import amp_dtype, convert_sync_bn, wrap_model
from vissl_vit.engine.resume_config import check_resume_config
from vissl_vit.engine.trainer import Trainer
from vissl_vit.errors import ConfigError
from vissl_vit.losses import build_loss
from vissl_vit.meters import build_meter
from vissl_vit.models import apply_weights_init, build_model
from vissl_vit.optim import build_lr_scheduler, build_optimizer
from vissl_vit.utils.distributed import all_reduce_sum
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


def run_train_engine(cfg_root: DictConfig, rank: int = 0, local_rank: int = 0, world_size: int = 1) -> Trainer:
    """Train (and test) as the config says, in this process; returns the finished Trainer.

    Args:
        cfg_root: a composed config (``compose_config``), with ``config`` under it.
        rank: this process's global rank.
        local_rank: its rank on this node (its GPU).
        world_size: processes in all.
    """
    OmegaConf.set_readonly(cfg_root, True)  # frozen: no component may change the run's config
    cfg = cfg_root.config
    primary = rank == 0
    run_dir = os.path.abspath(cfg.CHECKPOINT.DIR)
    os.makedirs(run_dir, exist_ok=True)
    setup_logging(run_dir, rank)
    if cfg.MACHINE.CPU_THREADS > 0:
        torch.set_num_threads(cfg.MACHINE.CPU_THREADS)
    device = get_device(cfg, local_rank)
    seed_all(cfg.SEED_VALUE)  # the same initial model on every rank (FSDP shards it in place)

    train_ds = build_dataset(cfg, "TRAIN") if len(cfg.DATA.TRAIN.DATA_SOURCES) else None
    derived = derive_run_values(cfg, len(train_ds) if train_ds is not None else 0)
    # the checkpoint is read and its config compared before train_config.yaml is overwritten, so a
    # refused resume leaves the old run's config as it was (every rank checks: they stop together)
    resume_path = _checkpoint_to_resume(cfg, run_dir)
    resume_state = load_checkpoint(resume_path, cfg.CHECKPOINT.ALLOW_PICKLE_CODE_EXECUTION) if resume_path else None
    if resume_state is not None:
        check_resume_config(cfg_root, resume_state, run_dir, resume_path, warn=primary)
    if primary:
        remove_stale_tmp_files(run_dir)  # the run folder is this run's now: a temporary file is a dead run's
        write_run_config(run_dir, cfg_root, derived)
    if cfg.VERBOSE:
        logger.info("Config:\n%s", OmegaConf.to_yaml(cfg_root))

    model = build_model(cfg)
    apply_weights_init(model, cfg)  # before wrapping; a resumed run then loads its own checkpoint over it
    model = model.to(device)
    if cfg.VERBOSE:
        logger.info("Model:\n%s", model)
        names = "\n".join(f"  {n} {tuple(p.shape)}" for n, p in model.named_parameters())
        logger.info("Parameters (what non_regularized_parameters matches):\n%s", names)
    logger.info("Model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    loss_fn = build_loss(cfg).to(device)
    model = wrap_model(convert_sync_bn(model, cfg, world_size, device), cfg, device, local_rank, world_size)
    optimizer = build_optimizer(cfg, model)
    seed_all(cfg.SEED_VALUE + rank)  # from here on each rank draws its own dropout / drop-path
    train_loader = build_dataloader(cfg, "TRAIN", train_ds, rank, world_size, device) if train_ds is not None else None
    clip = cfg.MODEL.GRAD_CLIP
    norm_type = float(clip.NORM_TYPE) if clip.NORM_TYPE != "inf" else float("inf")
    trainer = Trainer(
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
    )

    stdout_json = JsonLinesWriter(os.path.join(run_dir, "stdout.json")) if primary else None
    metrics_json = JsonLinesWriter(os.path.join(run_dir, "metrics.json")) if primary else None
    tb = _tensorboard(cfg, run_dir, primary)
    writer = PhaseWriter(metrics_json, tb, cfg.METERS.name or "meter")
    # Order matters: guards first (a rejected step must not reach the meters or the checkpoint),
    # then meters and logs, then the test phase, and the checkpoint last so it records all of them.
    hooks: list[Any] = []
    if cfg.HOOKS.CHECK_NAN:
        hooks.append(NanLossHook())
    if train_ds is not None:
        hooks.append(BadImageHook(len(train_ds), cfg.DATA.MAX_BAD_IMAGE_FRACTION, all_reduce_sum))
    if cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP:
        hooks.append(FreezeParamsHook(OmegaConf.to_container(cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP)))
    # algorithm upkeep right after the step, before anything reads or saves the model
    if cfg.LOSS.name == "moco_loss":
        hooks.append(MomentumEncoderHook())
    if cfg.LOSS.name == "swav_loss" and cfg.LOSS.swav_loss.normalize_last_layer:
        hooks.append(NormalizePrototypesHook())
    hooks.append(TrainMeterHook(build_meter(cfg), writer, all_reduce_sum))
    hooks.append(LogHook(cfg.LOG_FREQUENCY, stdout_json, tb, world_size, all_reduce_sum))
    if primary and cfg.HOOKS.PROGRESS_BAR.USE_PROGRESS_BAR:
        hooks.append(ProgressBarHook(cfg.LOG_FREQUENCY))
    test_hook = None
    if cfg.TEST_MODEL:
        test_ds = build_dataset(cfg, "TEST")
        test_loader = build_dataloader(cfg, "TEST", test_ds, rank, world_size, device)
        test_hook = TestHook(
            test_loader,
            build_meter(cfg),
            writer,
            cfg.TEST_EVERY_NUM_EPOCH,
            cfg.OPTIMIZER.num_epochs,
            all_reduce_sum,
            cfg.DATA.MAX_BAD_IMAGE_FRACTION,
        )
        hooks.append(test_hook)
    c = cfg.CHECKPOINT
    checkpoint_hook = CheckpointHook(
        run_dir,
        c.CHECKPOINT_FREQUENCY,
        c.CHECKPOINT_ITER_FREQUENCY,
        c.KEEP_LAST,
        primary,
        config_yaml=OmegaConf.to_yaml(cfg_root),
    )
    hooks.append(checkpoint_hook)
    hooks.append(PreemptionHook(checkpoint_hook, all_reduce_sum, world_size))  # after the regular checkpoint
    trainer.register_hooks(hooks)

    _resume(trainer, resume_path, resume_state)
    del resume_state  # the model and optimizer hold their copies now
    try:
        if cfg.TEST_ONLY:
            test_hook.run_test(max(trainer.epoch - 1, 0))
        elif trainer.iteration >= trainer.max_iterations:
            logger.info("Training already complete (%d iterations); nothing to do.", trainer.iteration)
        else:
            trainer.train()
    except Preempted as e:
        logger.warning("Stopped: %s", e)
    finally:
        for w in (stdout_json, metrics_json, tb):
            if w is not None:
                w.close()
    logger.info("Done. Run folder: %s", run_dir)
    return trainer
