"""Precision and data parallelism: the AMP dtype, SyncBatchNorm groups, DDP or FSDP wrapping."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from vissl_vit.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively, and what it reports.

    Native means AVX512-BF16 or AMX tiles (torch's oneDNN kernels use them for bf16 matmuls);
    without them autocast to bfloat16 is emulated with float32 conversions and runs slower than
    plain float32 (measured in benchmarks/README.md on an AVX2-only CPU).
    """
    cpu = torch.cpu
    flags = {
        "AVX512-BF16": getattr(cpu, "_is_avx512_bf16_supported", lambda: False)(),
        "AMX": getattr(cpu, "_is_amx_tile_supported", lambda: False)(),
    }
    found = [name for name, ok in flags.items() if ok]
    capability = torch.backends.cpu.get_cpu_capability()
    if found:
        return True, f"the CPU reports {' and '.join(found)} (capability {capability})"
    return False, f"the CPU reports no AVX512-BF16 or AMX (capability {capability})"


def _auto_dtype(device: torch.device) -> tuple[str, str]:
    """AMP_ARGS.dtype=auto -> (dtype name, why)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name(device)} supports bfloat16"
        return "float16", f"{torch.cuda.get_device_name(device)} has no bfloat16: float16 with loss scaling"
    native, why = cpu_native_bf16()
    if native:
        return "bfloat16", why
    return "float32", why + ": bfloat16 would be emulated and slower, so autocast stays off"


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """MODEL.AMP_PARAMS -> the autocast dtype, or None for full precision (AMP off, or
    ``dtype: auto`` on a device without native bfloat16 or float16 support)."""
    amp = cfg.MODEL.AMP_PARAMS
    if not amp.USE_AMP:
        return None
    if amp.AMP_TYPE == "apex":
        logger.info("AMP_TYPE=apex (opt_level %s) runs on torch.amp autocast", amp.AMP_ARGS.opt_level)
    elif amp.AMP_TYPE != "pytorch":
        raise ConfigError(f"config.MODEL.AMP_PARAMS.AMP_TYPE='{amp.AMP_TYPE}': expected pytorch or apex.")
    name = amp.AMP_ARGS.dtype
    if name not in (*_DTYPES, "auto"):
        raise ConfigError(
            f"config.MODEL.AMP_PARAMS.AMP_ARGS.dtype='{name}': expected auto, bfloat16, float16 or float32."
        )
    if name == "auto":
        name, why = _auto_dtype(device)
        logger.info("Mixed precision (AMP_ARGS.dtype=auto): %s, because %s", name, why)
    elif name == "bfloat16" and device.type == "cpu":
        native, why = cpu_native_bf16()
        if not native:
            logger.warning(
                "Mixed precision: AMP_ARGS.dtype=bfloat16 is emulated on this CPU (it reports %s) and slower than "
                "float32 (the quickstart's first 100 steps: 130 against 932 images/s, benchmarks/README.md); "
                "AMP_ARGS.dtype=auto would train in float32 here",
                why.removeprefix("the CPU reports "),
            )
    if name == "float32":
        logger.info("Mixed precision: off, training in float32")
        return None
    logger.info("Mixed precision: autocast to %s%s", name, " with loss scaling" if name == "float16" else "")
    return _DTYPES[name]


def sync_bn_groups(world_size: int, group_size: int, local_world_size: int) -> list[list[int]] | None:
    """The rank groups that share BatchNorm statistics: None for all ranks (GROUP_SIZE 0), the ranks of
    each node (-1), or consecutive groups of ``group_size``."""
    if group_size == 0:
        return None
    size = local_world_size if group_size == -1 else group_size
    if size <= 0 or world_size % size:
        raise ConfigError(
            f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size}: groups of {size} do not divide the {world_size} processes."
        )
    return [list(range(start, start + size)) for start in range(0, world_size, size)]


def convert_sync_bn(model: nn.Module, cfg: DictConfig, world_size: int, device: torch.device) -> nn.Module:
    """Turn BatchNorm layers into SyncBatchNorm over the configured groups (several processes only)."""
    sb = cfg.MODEL.SYNC_BN_CONFIG
    if not sb.CONVERT_BN_TO_SYNC_BN or world_size == 1:
        return model
    if device.type != "cuda":
        raise ConfigError("config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=True needs GPUs (torch's SyncBatchNorm).")
    if sb.SYNC_BN_TYPE == "apex":
        logger.info("SYNC_BN_TYPE=apex runs on torch.nn.SyncBatchNorm")
    groups = sync_bn_groups(world_size, sb.GROUP_SIZE, cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
    group = None
    if groups is not None:
        rank = dist.get_rank()
        for ranks in groups:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if rank in ranks:
                group = g
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    n = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    logger.info("SyncBatchNorm: %d layers, groups %s", n, groups or "all ranks")
    return converted


def wrap_model(model: nn.Module, cfg: DictConfig, device: torch.device, local_rank: int, world_size: int) -> nn.Module:
    """torch.compile (MODEL.COMPILE), then DDP (VISSL's knobs) or FSDP (each transformer block
    sharded, then the rest) over the workers."""
    if cfg.MODEL.COMPILE:
        model.compile()  # in place: state-dict keys stay the same
        logger.info("torch.compile: the model compiles at its first steps")
    if world_size == 1:
        return model
    d = cfg.DISTRIBUTED
    if cfg.MODEL.FSDP.USE_FSDP:
        from torch.distributed.fsdp import fully_shard

        reshard = cfg.MODEL.FSDP.RESHARD_AFTER_FORWARD
        from vissl_vit.models.trunks.base import Trunk

        trunk = getattr(model, "trunk", None)  # the trunk names its own FSDP units (its block type)
        blocks = trunk.shard_units() if isinstance(trunk, Trunk) else []
        for block in blocks:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        logger.info("FSDP: %d trunk blocks and the root sharded over %d processes", len(blocks), world_size)
        return model
    # broadcast_buffers is passed only to turn it off: torch deprecates the argument, not the default
    extra = {} if d.BROADCAST_BUFFERS else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[local_rank] if device.type == "cuda" else None,
        bucket_cap_mb=d.DDP_BUCKET_CAP_MB,
        find_unused_parameters=d.FIND_UNUSED_PARAMETERS,
        **extra,
    )
