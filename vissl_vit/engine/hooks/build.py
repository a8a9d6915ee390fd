"""build_hooks: the trainer's hooks, by name from the HOOKS registry, in an order whose reasons are
written beside each entry (detectron2's ``DefaultTrainer.build_hooks``).

Three kinds of hooks, in this order of concern:
- the engine's own (guards, model EMA, meters, logs, test phases, checkpoints), switched by
  HOOKS.* and friends;
- a method's upkeep (MoCo's momentum encoder, SwAV's prototype normalisation), asked for by the
  model: any module of it may list hook names in a ``trainer_hooks`` attribute, so a new method
  brings its hook with its module, and the engine never looks at the loss's name;
- the user's: ``HOOKS.EXTRA`` entries ``[name, {kwargs}]`` built from the registry, then hook
  objects passed from Python (``run_train_engine(cfg_root, extra_hooks=[...])``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from vissl_vit.engine.hooks.base import HookBase
from vissl_vit.engine.hooks.checkpoint_hook import unwrap
from vissl_vit.engine.hooks.ema import EmaModelHook
from vissl_vit.engine.hooks.loggers import import_for
from vissl_vit.engine.hooks.logging_hooks import run_hparams
from vissl_vit.engine.hooks.phases import PhaseWriter
from vissl_vit.errors import ConfigError
from vissl_vit.meters import build_meter
from vissl_vit.registry import HOOKS
from vissl_vit.utils.distributed import all_reduce_sum
from vissl_vit.utils.kwargs import call_with_kwargs
from vissl_vit.utils.logging import JsonLinesWriter


@dataclass
class HookContext:
    """What the engine's hooks need besides the config: this process's place in the run, its data
    and its writers.

    Args:
        run_dir: the run folder (checkpoints).
        primary: whether this process is rank 0 (it writes files, shows the progress bars and has
            the metrics loggers).
        world_size: processes in all.
        train_size: images in the training set (0: no training set, no bad-image count).
        test_loader: the test loader, or None without a test phase.
        stdout_json: the stdout.json writer, or None on ranks > 0.
        tb: the tensorboard SummaryWriter, or None.
        phase_writer: writes metrics.json lines (train and test phases).
        config_yaml: the composed config, stored in every checkpoint.
        num_epochs: the run's epochs (``OPTIMIZER.num_epochs``, or derived from a step budget,
            ``OPTIMIZER.num_train_steps``; its last epoch may be short).
    """

    run_dir: str
    primary: bool
    world_size: int
    train_size: int
    test_loader: DataLoader | None
    stdout_json: JsonLinesWriter | None
    tb: Any
    phase_writer: PhaseWriter
    config_yaml: str
    num_epochs: int = 0


def model_hook_names(model: nn.Module) -> list[str]:
    """The hook names the model's modules ask for (``trainer_hooks``), each once, in module order."""
    names: list[str] = []
    for m in unwrap(model).modules():
        for name in getattr(m, "trainer_hooks", ()):
            if name not in names:
                names.append(name)
    return names


def _hook(name: str, where: str, **kwargs: Any) -> HookBase:
    """``HOOKS.get(name)(**kwargs)``; an unknown name or a wrong keyword is a ConfigError naming ``where``."""
    try:
        cls = HOOKS.get(name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return call_with_kwargs(cls, kwargs, f"{where} '{name}'")


def _config_hooks(cfg: DictConfig) -> list[HookBase]:
    """HOOKS.EXTRA: ``[[name, {kwargs}], ...]`` (kwargs may be left out), each built from the registry."""
    hooks = []
    for i, entry in enumerate(OmegaConf.to_container(cfg.HOOKS.EXTRA, resolve=True)):
        where = f"config.HOOKS.EXTRA[{i}]"
        if isinstance(entry, str):
            entry = [entry]
        if not (isinstance(entry, list) and 1 <= len(entry) <= 2 and isinstance(entry[0], str)):
            raise ConfigError(f"{where}: expected [hook_name, {{kwargs}}] or [hook_name], got {entry!r}.")
        kwargs = entry[1] if len(entry) == 2 else {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{where}: the kwargs of hook '{entry[0]}' must be a mapping, got {kwargs!r}.")
        hooks.append(_hook(entry[0], where, **kwargs))
    return hooks


def _ema_hook(cfg: DictConfig, model: nn.Module) -> EmaModelHook | None:
    """HOOKS.EMA_MODEL's hook, on when SAVE_EMA_MODEL or ENABLE_EMA_METERS is (as in VISSL), else None."""
    e = cfg.HOOKS.EMA_MODEL
    if not (e.SAVE_EMA_MODEL or e.ENABLE_EMA_METERS):
        return None
    if cfg.MODEL.FSDP.USE_FSDP:
        raise ConfigError(
            "config.HOOKS.EMA_MODEL (SAVE_EMA_MODEL or ENABLE_EMA_METERS True) with config.MODEL.FSDP.USE_FSDP=True: "
            "the model EMA is a whole copy of the model and is not sharded; expected USE_FSDP=False, or both EMA keys False."
        )
    return _hook(
        "ema_model_hook",
        "config.HOOKS.EMA_MODEL",
        model=model,
        decay=e.DECAY,
        update_iter=e.UPDATE_ITER,
        warmup=e.WARMUP,
        ema_device=e.EMA_DEVICE,
    )


def _logger_hooks(cfg: DictConfig, ctx: HookContext) -> list[HookBase]:
    """env.json, the console's epoch lines and results table, metrics.csv, and W&B / MLflow when
    HOOKS.WANDB_SETUP / HOOKS.MLFLOW_SETUP ask for them: on rank 0. A package asked for but not
    installed is a ConfigError on every rank (all stop together, before the first step)."""
    w, m = cfg.HOOKS.WANDB_SETUP, cfg.HOOKS.MLFLOW_SETUP
    if w.USE_WANDB:
        import_for("wandb", "HOOKS.WANDB_SETUP.USE_WANDB")
    if m.USE_MLFLOW:
        import_for("mlflow", "HOOKS.MLFLOW_SETUP.USE_MLFLOW")
    if not ctx.primary:
        return []
    hooks = [
        _hook("environment_hook", "env.json", run_dir=ctx.run_dir, world_size=ctx.world_size),
        _hook(
            "epoch_summary_hook",
            "the epoch summary",
            num_epochs=ctx.num_epochs or cfg.OPTIMIZER.num_epochs,
            run_dir=ctx.run_dir,
        ),
        _hook("csv_logger", "metrics.csv", path=os.path.join(ctx.run_dir, "metrics.csv")),
    ]
    if w.USE_WANDB:
        hooks.append(
            _hook(
                "wandb_logger",
                "config.HOOKS.WANDB_SETUP",
                run_dir=ctx.run_dir,
                project=w.PROJECT,
                entity=w.ENTITY,
                run_name=w.RUN_NAME,
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    if m.USE_MLFLOW:
        hooks.append(
            _hook(
                "mlflow_logger",
                "config.HOOKS.MLFLOW_SETUP",
                run_dir=ctx.run_dir,
                tracking_uri=m.TRACKING_URI,
                experiment_name=m.EXPERIMENT_NAME,
                run_name=m.RUN_NAME,
            )
        )
    return hooks


def build_hooks(
    cfg: DictConfig, ctx: HookContext, model: nn.Module, extra_hooks: Sequence[HookBase] = ()
) -> list[HookBase]:
    """The trainer's hooks in the order they are called (each event calls them in list order).

    Args:
        cfg: the ``config`` node.
        ctx: the run's place, data and writers.
        model: the model as trained (possibly wrapped): its modules' ``trainer_hooks`` are added.
        extra_hooks: hook objects from Python, called after those of HOOKS.EXTRA.
    """
    hooks: list[HookBase] = []
    # 1. Guards first: a step they reject (NaN before the optimizer step, too many unreadable
    #    images after it) stops the run before any later hook meters, logs or saves that step.
    if cfg.HOOKS.CHECK_NAN:
        hooks.append(_hook("nan_loss_hook", "config.HOOKS.CHECK_NAN", all_reduce=all_reduce_sum))
    if ctx.train_size:
        hooks.append(
            _hook(
                "bad_image_hook",
                "config.DATA.MAX_BAD_IMAGE_FRACTION",
                dataset_len=ctx.train_size,
                max_fraction=cfg.DATA.MAX_BAD_IMAGE_FRACTION,
                all_reduce=all_reduce_sum,
            )
        )
    # 2. Frozen parameters act in after_backward, on this step's gradients, before clipping.
    if cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP:
        iter_map = OmegaConf.to_container(cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP)
        hooks.append(_hook("freeze_params_hook", "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP", iter_map=iter_map))
    # 3. The method's upkeep right after the step (momentum encoder, unit prototypes), before any
    #    hook below reads the model (test phase) or saves it (checkpoint).
    for name in model_hook_names(model):
        # VISSL's switch, kept for its configs: normalize_last_layer=False leaves SwAV's prototypes free
        if name == "normalize_prototypes_hook" and not cfg.LOSS.swav_loss.normalize_last_layer:
            continue
        hooks.append(_hook(name, f"the model's trainer_hooks ({type(unwrap(model)).__name__})"))
    # 3b. The model EMA after the method's upkeep (it averages the upkept model: MoCo's momentum
    #     encoder, SwAV's unit prototypes), before the test phase that evaluates it and the
    #     checkpoint that saves it: a checkpoint written at a step holds that step's EMA.
    ema = _ema_hook(cfg, model)
    if ema is not None:
        hooks.append(ema)
    # 4. The train meter before the test phase: the epoch's train line precedes its test line in
    #    metrics.json (phase_idx counts in that order); then the per-step log and progress bar.
    hooks.append(
        _hook(
            "train_meter_hook",
            "config.METERS",
            meter=build_meter(cfg),
            writer=ctx.phase_writer,
            all_reduce=all_reduce_sum,
        )
    )
    hooks.append(
        _hook(
            "log_hook",
            "config.LOG_FREQUENCY",
            log_frequency=cfg.LOG_FREQUENCY,
            stdout_json=ctx.stdout_json,
            tb_writer=ctx.tb,
            world_size=ctx.world_size,
            all_reduce=all_reduce_sum,
            hparams=run_hparams(cfg, ctx.world_size) if ctx.tb is not None else None,
        )
    )
    show_bars = ctx.primary and cfg.HOOKS.PROGRESS_BAR.USE_PROGRESS_BAR
    if show_bars:
        hooks.append(
            _hook(
                "progress_bar_hook",
                "config.HOOKS.PROGRESS_BAR",
                log_frequency=cfg.LOG_FREQUENCY,
                num_epochs=ctx.num_epochs or cfg.OPTIMIZER.num_epochs,
            )
        )
    # 5. The test phase after the epoch's train phase, before the checkpoint, which then records
    #    the phase count with the test line included (a resume does not write it twice).
    if ctx.test_loader is not None:
        ema_meters = ema is not None and cfg.HOOKS.EMA_MODEL.ENABLE_EMA_METERS
        hooks.append(
            _hook(
                "test_hook",
                "config.TEST_MODEL",
                loader=ctx.test_loader,
                meter=build_meter(cfg),
                writer=ctx.phase_writer,
                every_n_epochs=cfg.TEST_EVERY_NUM_EPOCH,
                num_epochs=ctx.num_epochs or cfg.OPTIMIZER.num_epochs,
                all_reduce=all_reduce_sum,
                max_bad_fraction=cfg.DATA.MAX_BAD_IMAGE_FRACTION,
                # ENABLE_EMA_METERS: the EMA too, with its own meter, built as the model's is
                ema=ema.ema if ema_meters else None,
                ema_meter=build_meter(cfg) if ema_meters else None,
                progress_bar=show_bars,
            )
        )
    # 5b. The metrics loggers (rank 0) after the test phase: each phase reaches them as it is
    #     written, and the epoch summary's after_epoch then sees the epoch's train and test lines.
    #     They run before the checkpoint, so a checkpoint's iteration has its rows written (a resume
    #     keeps the CSV's rows up to it).
    hooks += _logger_hooks(cfg, ctx)
    # 6. The user's hooks (config, then Python) see an accepted step, the upkept model and the
    #    epoch's phases; they run before the checkpoint, so their state_dict is saved with the step.
    hooks += _config_hooks(cfg)
    hooks += list(extra_hooks)
    # 7. The checkpoint last among the step hooks: it records everything above for this step.
    c = cfg.CHECKPOINT
    checkpoint = _hook(
        "checkpoint_hook",
        "config.CHECKPOINT",
        folder=ctx.run_dir,
        epoch_frequency=c.CHECKPOINT_FREQUENCY,
        iter_frequency=c.CHECKPOINT_ITER_FREQUENCY,
        keep_last=c.KEEP_LAST,
        is_primary=ctx.primary,
        config_yaml=ctx.config_yaml,
        latest_as_copy=c.LATEST_AS_COPY,
        keep_best_metric=c.KEEP_BEST_METRIC,
        keep_best_mode=c.KEEP_BEST_MODE,
        export_safetensors=c.EXPORT_SAFETENSORS,
    )
    hooks.append(checkpoint)
    # 8. Preemption after the regular checkpoint: it writes its own and raises, which must not cut
    #    any other hook's after_step short.
    hooks.append(
        _hook(
            "preemption_hook",
            "preemption",
            checkpoint_hook=checkpoint,
            all_reduce=all_reduce_sum,
            world_size=ctx.world_size,
        )
    )
    # 9. Pictures last, in after_train: after the checkpoint hook has written the final weights
    #    (they are read back from the run folder) and the loggers have closed their files.
    p = cfg.HOOKS.PICTURES
    if ctx.primary and p.DRAW:
        hooks.append(
            _hook(
                "pictures_hook",
                "config.HOOKS.PICTURES",
                run_dir=ctx.run_dir,
                cfg=cfg,
                draw=list(p.DRAW),
                attention_blocks=list(p.ATTENTION_BLOCKS),
                num_images=p.NUM_IMAGES,
            )
        )
    return hooks
