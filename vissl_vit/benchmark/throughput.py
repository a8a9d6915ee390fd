"""Training and inference throughput of a config's model, next to timm's ViT of the same shape.

    python tools/benchmark_throughput.py config=benchmark/throughput/vit_tiny_32 [--batch-size 64]
        [--steps 10] [--warmup 3] [--repeats 5] [--json out.json] [--no-timm] [--no-e2e] [--compile]
        [--timm-defaults]

Everything is measured in one process, on the same device, alternating the two models within each
repeat so that both see the same machine state; each figure is the median over repeats:

- model-only training: forward + cross-entropy + backward + AdamW step on tensors already on the
  device (images/s), and forward-only inference (images/s);
- end to end: vissl_vit's Trainer step fed by the config's real data loader (images/s), and the
  fraction of the step time spent waiting for data;
- FLOPs per image (fvcore, with a handler so scaled_dot_product_attention is counted; reported as
  2 x multiply-adds, forward only; a training step is about 3x) and, on a GPU, model FLOPs
  utilisation of the training step against the device's dense bf16 peak;
- peak memory of a training step (GPU only: torch.cuda.max_memory_allocated).

Both models run under the config's precision (MODEL.AMP_PARAMS: the same autocast dtype), and only
vissl_vit's is compiled with ``--compile`` (MODEL.COMPILE). ``--timm-defaults`` runs timm's model as
timm's train.py does by default instead, in float32 without autocast (``--amp`` off), eager: "each
at its own defaults" when the config is vissl_vit's defaults, measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vissl_vit.config import compose_config
from vissl_vit.models.trunks.base import trunk_class
from vissl_vit.utils.cli import cli_main, split_options

USAGE = __doc__.split("\n\n")[1]

# dense bf16 peak TFLOP/s by device name fragment (vendor data sheets, SXM parts)
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def num_classes_of(cfg: DictConfig) -> int:
    """Output width of the config's last head (the classifier), or the trunk's feature width without heads."""
    heads = cfg.MODEL.HEAD.PARAMS
    if not heads:
        trunk = trunk_class(cfg.MODEL.TRUNK)
        return trunk.feature_width_from_config(cfg.MODEL.TRUNK, trunk.default_feature_from_config(cfg.MODEL.TRUNK))
    kwargs = heads[-1][1]
    return kwargs["num_classes"] if "num_classes" in kwargs else kwargs["dims"][-1]


def timm_twin(cfg: DictConfig) -> nn.Module | None:
    """timm's model with the config trunk's shape and a linear head of the same width (the trunk's
    ``timm_reference``), or None when timm has no twin of this trunk."""
    return trunk_class(cfg.MODEL.TRUNK).timm_reference(cfg.MODEL.TRUNK, num_classes_of(cfg))


def _sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Multiply-adds of scaled_dot_product_attention: Q K^T and A V, each B H L S d."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    *batch, length, dim = q
    n = 1
    for b in batch:
        n *= b
    return 2 * n * length * k[-2] * dim


def flops_per_image(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per image (2 x multiply-adds), attention included."""
    from fvcore.nn import FlopCountAnalysis

    model.eval()
    with torch.no_grad():
        analysis = FlopCountAnalysis(model, (x,)).set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        macs = analysis.total()
    model.train()
    return 2.0 * macs / x.shape[0]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    with _autocast(x.device, dtype):
        out = model(x)
        logits = out[0] if isinstance(out, list) else out
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _time(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - start


def measure_models(
    models: dict[str, nn.Module],
    batch: int,
    image: tuple[int, int, int],
    classes: int,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    dtypes: dict[str, torch.dtype | None] | None = None,
) -> dict[str, dict[str, float]]:
    """Median training and inference images/s (and GPU peak memory) of each model, each under its
    autocast dtype in ``dtypes`` (a model not there, or None: full precision)."""
    dtypes = dtypes or {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *image, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    opts = {
        n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda" or None) for n, m in models.items()
    }
    train_ips: dict[str, list[float]] = {n: [] for n in models}
    infer_ips: dict[str, list[float]] = {n: [] for n in models}
    peak: dict[str, float] = {}
    for name, m in models.items():  # warm-up (allocator, kernels, lazy state)
        m.train()
        for _ in range(warmup):
            _train_step(m, opts[name], x, y, dtypes.get(name))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            _train_step(m, opts[name], x, y, dtypes.get(name))
            _sync(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    for r in range(repeats):
        # interleave, and alternate which goes first: both models see the same machine state
        for name, m in list(models.items()) if r % 2 == 0 else list(models.items())[::-1]:
            dtype = dtypes.get(name)
            m.train()
            train_ips[name].append(
                batch * steps / _time(lambda m=m, o=opts[name], d=dtype: _train_step(m, o, x, y, d), steps, device)
            )
            m.eval()
            with torch.no_grad(), _autocast(device, dtype):
                infer_ips[name].append(batch * steps / _time(lambda m=m: m(x), steps, device))
            m.train()
    return {
        n: {
            "train_images_per_sec": statistics.median(train_ips[n]),
            "infer_images_per_sec": statistics.median(infer_ips[n]),
            "peak_memory_mb": peak.get(n, float("nan")),
            "precision": str(dtypes.get(n) or torch.float32).removeprefix("torch."),
        }
        for n in models
    }


def measure_end_to_end(cfg_root: DictConfig, steps: int, warmup: int, repeats: int) -> dict[str, float]:
    """vissl_vit's Trainer step fed by the config's data loader: images/s and the data-wait fraction."""
    from vissl_vit.config.derive import derive_run_values
    from vissl_vit.data import build_dataloader, build_dataset
    from vissl_vit.engine.hooks import LogHook, NanLossHook
    from vissl_vit.engine.parallel import amp_dtype, wrap_model
    from vissl_vit.engine.train_engine import get_device
    from vissl_vit.engine.trainer import Trainer
    from vissl_vit.losses import build_loss
    from vissl_vit.models import build_model
    from vissl_vit.optim import build_lr_scheduler, build_optimizer, build_wd_scheduler
    from vissl_vit.utils.tensors import to_device

    cfg = cfg_root.config
    device = get_device(cfg, 0)
    dataset = build_dataset(cfg, "TRAIN")
    derived = derive_run_values(cfg, len(dataset))
    model = wrap_model(build_model(cfg).to(device), cfg, device, 0, 1)  # compiles if MODEL.COMPILE
    trainer = Trainer(
        model,
        build_loss(cfg).to(device),
        build_optimizer(cfg, model),
        build_lr_scheduler(derived),
        build_dataloader(cfg, "TRAIN", dataset, 0, 1, device),
        derived.iterations_per_epoch,
        derived.max_iterations,
        "step",
        device,
        accumulation=derived.grad_accumulation_steps,
        amp_dtype=amp_dtype(cfg, device),
        wd_scheduler=build_wd_scheduler(derived),
    )
    # the hooks every step runs (NaN guard, logging) are part of what the engine costs
    trainer.register_hooks([NanLossHook(), LogHook(cfg.LOG_FREQUENCY, None, None, 1, lambda t: t)])
    for h in trainer.hooks:
        h.before_train()
    loader = trainer.train_loader
    loader.sampler.set_epoch(0)
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(loader)
            return next(it)

    first = next_batch()
    x, y = to_device(first["data"], device), first["label"].to(device)

    def model_only() -> None:  # the same model and optimizer, on a batch already on the device
        with trainer.autocast():
            out = trainer.model(x)
            loss = trainer.loss_fn(out, y)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()

    for _ in range(warmup):
        trainer.step([next_batch()])
        model_only()
    ips, wait, bare = [], [], []
    for r in range(repeats):
        # interleaved with the model-only step, alternating which goes first: the machine's drift
        # (several % on a shared VM) must not count as engine overhead
        for kind in ("e2e", "bare") if r % 2 == 0 else ("bare", "e2e"):
            if kind == "bare":
                bare.append(len(y) * steps / _time(model_only, steps, device))
                continue
            waiting, images = 0.0, 0
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                t = time.perf_counter()
                batch = next_batch()
                waiting += time.perf_counter() - t
                trainer.step([batch])
                images += trainer.last.batch_size
            _sync(device)
            total = time.perf_counter() - start
            ips.append(images / total)
            wait.append(waiting / total)
    e2e, model_ips = statistics.median(ips), statistics.median(bare)
    return {
        "train_images_per_sec": e2e,
        "model_only_images_per_sec": model_ips,
        "data_wait_fraction": statistics.median(wait),
        "overhead_vs_model_only": model_ips / e2e - 1,
    }


def _parse(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    return split_options(
        argv,
        values={
            "--batch-size": ("batch_size", int),
            "--steps": ("steps", int),
            "--warmup": ("warmup", int),
            "--repeats": ("repeats", int),
            "--json": ("json", str),
        },
        switches={
            "--no-timm": ("timm", False),
            "--no-e2e": ("e2e", False),
            "--compile": ("compile", True),
            "--timm-defaults": ("timm_defaults", True),
        },
        defaults={
            "batch_size": None,
            "steps": 10,
            "warmup": 3,
            "repeats": 5,
            "json": None,
            "timm": True,
            "e2e": True,
            "compile": False,
            "timm_defaults": False,
        },
        usage=USAGE,
    )


def run(argv: list[str]) -> dict[str, Any]:
    """Measure, print a table, and return (and optionally write) the results as a dict."""
    overrides, opts = _parse(argv)
    if opts["batch_size"]:
        overrides.append(f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={opts['batch_size']}")
    if opts["compile"]:
        overrides.append("config.MODEL.COMPILE=True")
    cfg_root = compose_config(overrides)
    cfg = cfg_root.config
    from vissl_vit.engine.parallel import amp_dtype
    from vissl_vit.engine.train_engine import get_device, seed_all
    from vissl_vit.models import build_model

    if cfg.MACHINE.CPU_THREADS > 0:
        torch.set_num_threads(cfg.MACHINE.CPU_THREADS)
    device = get_device(cfg, 0)
    seed_all(0)
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    image = trunk_class(cfg.MODEL.TRUNK).input_shape_from_config(cfg.MODEL.TRUNK)
    models = {"vissl_vit": build_model(cfg).to(device)}
    twin = timm_twin(cfg) if opts["timm"] else None
    if twin is not None:
        models["timm"] = twin.to(device)
    elif opts["timm"]:
        print(f"timm has no model like trunk '{cfg.MODEL.TRUNK.NAME}' as configured: no ratio to timm")
        opts["timm"] = False
    x = torch.randn(2, *image, device=device)
    # FLOPs are counted by tracing, which a compiled module refuses: count them first
    gflops = {name: flops_per_image(m, x) / 1e9 for name, m in models.items()}
    if cfg.MODEL.COMPILE:
        models["vissl_vit"].compile()
    ours = amp_dtype(cfg, device)
    dtypes = {"vissl_vit": ours, "timm": None if opts["timm_defaults"] else ours}
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "batch_size": batch,
        "image": list(image),
        "steps": opts["steps"],
        "repeats": opts["repeats"],
        "compiled": cfg.MODEL.COMPILE,
        "timm_defaults": opts["timm_defaults"],
        "models": measure_models(
            models,
            batch,
            image,
            num_classes_of(cfg),
            device,
            opts["steps"],
            opts["warmup"],
            opts["repeats"],
            dtypes,
        ),
    }
    for name in models:
        r = results["models"][name]
        r["gflops_per_image"] = gflops[name]
        r["compiled"] = bool(cfg.MODEL.COMPILE) and name == "vissl_vit"
        peak = next((p for k, p in BF16_PEAK_TFLOPS.items() if k in results["device"]), None)
        r["mfu"] = 3 * gflops[name] * 1e9 * r["train_images_per_sec"] / (peak * 1e12) if peak else None
    if opts["timm"]:
        results["ratio_train"] = (
            results["models"]["vissl_vit"]["train_images_per_sec"] / results["models"]["timm"]["train_images_per_sec"]
        )
        results["ratio_infer"] = (
            results["models"]["vissl_vit"]["infer_images_per_sec"] / results["models"]["timm"]["infer_images_per_sec"]
        )
    if opts["e2e"]:
        # overhead_vs_model_only compares with the model-only step interleaved in the same repeats
        results["end_to_end"] = measure_end_to_end(cfg_root, opts["steps"], opts["warmup"], opts["repeats"])
    _print(results)
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump(results, f, indent=2)
    return results


def _print(r: dict[str, Any]) -> None:
    print(
        f"device: {r['device']}, torch {r['torch']}, batch {r['batch_size']}, image {r['image']}, "
        f"median of {r['repeats']} x {r['steps']} steps"
    )
    print(
        f"{'model':<10} {'run as':<18} {'train img/s':>12} {'infer img/s':>12} {'GFLOPs/img':>11} {'peak MB':>9} "
        f"{'MFU':>7}"
    )
    for name, m in r["models"].items():
        mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
        run_as = f"{m['precision']}, {'compiled' if m['compiled'] else 'eager'}"
        print(
            f"{name:<10} {run_as:<18} {m['train_images_per_sec']:>12.1f} {m['infer_images_per_sec']:>12.1f} "
            f"{m['gflops_per_image']:>11.3f} {m['peak_memory_mb']:>9.0f} {mfu:>7}"
        )
    if "ratio_train" in r:
        each = " (each at its own defaults: timm as its train.py runs by default)" if r["timm_defaults"] else ""
        print(f"vissl_vit / timm: training {r['ratio_train']:.3f}x, inference {r['ratio_infer']:.3f}x{each}")
    if "end_to_end" in r:
        e = r["end_to_end"]
        print(
            f"end to end (Trainer + data loader): {e['train_images_per_sec']:.1f} img/s, "
            f"{100 * e['data_wait_fraction']:.1f}% waiting for data; the model-only step, interleaved: "
            f"{e['model_only_images_per_sec']:.1f} img/s; engine overhead {100 * e['overhead_vs_model_only']:+.1f}%"
        )


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)
