#!/usr/bin/env python
"""The CPU's precision measurements, in one command: the quickstart in float32 and in bfloat16, and
the throughput benchmark per precision, eager and compiled, against timm in the same runs.

    python tools/measure_cpu_precision.py [--out runs/cpu_precision] [--dry-run] [--skip-quickstart]

What it runs (about 40 minutes on 2 cores; each piece is an ordinary command, printed before it runs):

- the quickstart (``config=quickstart/vit_fashion_mnist``, its seed) twice: float32
  (``USE_AMP=False``) and bfloat16 autocast (``USE_AMP=True``, ``AMP_ARGS.dtype=bfloat16``), each
  timed, each in its own run folder under ``--out``;
- ``tools/benchmark_throughput.py config=benchmark/throughput/vit_tiny_32`` in float32 and
  bfloat16, eager and with ``--compile`` (both models under the same precision), and once more
  with ``--timm-defaults`` for each precision: ours next to timm as its train.py runs by default;
- a summary, ``summary.md`` under ``--out``: the processor and its bf16 flags, the quickstart's
  test top-1 and wall time per precision, and the benchmark's images/s and ratios.

On a CPU without AVX512-BF16 or AMX the bfloat16 figures are emulated (slower, same numerics to
first order); the summary says which the CPU is, from torch's own capability queries.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PRECISIONS = {
    "float32": ["config.MODEL.AMP_PARAMS.USE_AMP=False"],
    "bfloat16": ["config.MODEL.AMP_PARAMS.USE_AMP=True", "config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=bfloat16"],
}
BENCH = ["config=benchmark/throughput/vit_tiny_32", "--steps", "5", "--repeats", "4", "--warmup", "2", "--no-e2e"]
# (precision, name, extra switches): both models under one precision, eager or ours compiled; then
# ours in bfloat16 (eager, compiled) next to timm at its train.py defaults (float32, eager)
BENCH_RUNS = (
    ("float32", "eager", []),
    ("float32", "compiled", ["--compile"]),
    ("bfloat16", "eager", []),
    ("bfloat16", "compiled", ["--compile"]),
    ("bfloat16", "eager_vs_timm_defaults", ["--timm-defaults"]),
    ("bfloat16", "compiled_vs_timm_defaults", ["--compile", "--timm-defaults"]),
)


def cpu_report() -> dict[str, object]:
    """The processor's name, its bf16-related flags, and what torch's capability queries say."""
    from vissl_vit.engine.parallel import cpu_native_bf16

    name, flags = "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = sorted(
                        fl for fl in line.split(":", 1)[1].split() if "bf16" in fl or fl.startswith(("amx", "avx512f"))
                    )
    except OSError:
        pass
    native, why = cpu_native_bf16()
    return {"name": name, "flags": flags, "native_bf16": native, "why": why, "cores": os.cpu_count()}


def commands(out: str, quickstart: bool = True) -> list[tuple[str, list[str]]]:
    """(label, argv) of every run, in order; each writes under ``out``."""
    py = sys.executable
    runs = []
    if quickstart:
        for precision, overrides in PRECISIONS.items():
            run_dir = os.path.join(out, f"quickstart_{precision}")
            argv = [
                py,
                os.path.join(REPO, "tools", "run_distributed_engines.py"),
                "config=quickstart/vit_fashion_mnist",
            ]
            runs.append((f"quickstart_{precision}", [*argv, *overrides, f"config.CHECKPOINT.DIR={run_dir}"]))
    for precision, mode, switches in BENCH_RUNS:
        label = f"bench_{precision}_{mode}"
        argv = [py, os.path.join(REPO, "tools", "benchmark_throughput.py"), *BENCH, *PRECISIONS[precision], *switches]
        runs.append((label, [*argv, "--json", os.path.join(out, f"{label}.json")]))
    return runs


def _last_test_top1(run_dir: str) -> float | None:
    """The run's last test top-1 (the curves' reader: a resumed run's repeated phases once, not the
    EMA's meter), or None without a finished run there."""
    from vissl_vit.visualize.curves import read_run

    if not os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return None
    test = read_run(run_dir).top1["test"]
    return test[-1][1] if test else None


def _run_as(model: dict) -> str:
    return f"{model['precision']}, {'compiled' if model['compiled'] else 'eager'}"


def summary(out: str, cpu: dict[str, object], seconds: dict[str, float]) -> str:
    """The markdown summary of the runs found under ``out`` (missing ones are left out)."""
    flags = ", ".join(cpu["flags"]) or "none"
    lines = [
        f"CPU: {cpu['name']} ({cpu['cores']} cores); bf16-related flags: {flags}; {cpu['why']}",
        "",
        "| quickstart precision | test top-1 after the last epoch | wall time |",
        "| --- | --- | --- |",
    ]
    for precision in PRECISIONS:
        top1 = _last_test_top1(os.path.join(out, f"quickstart_{precision}"))
        if top1 is not None:
            wall = seconds.get(f"quickstart_{precision}")
            lines.append(f"| {precision} | {top1:.2f}% | {f'{wall / 60:.1f} min' if wall else 'n/a'} |")
    lines += [
        "",
        "| benchmark (vit_tiny_32) | ours | timm | ours train img/s | timm train img/s | train ratio | infer ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for precision, mode, _ in BENCH_RUNS:
        path = os.path.join(out, f"bench_{precision}_{mode}.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            r = json.load(f)
        ours, timm = r["models"]["vissl_vit"], r["models"]["timm"]
        lines.append(
            f"| {precision} {mode} | {_run_as(ours)} | {_run_as(timm)} | {ours['train_images_per_sec']:.1f} | "
            f"{timm['train_images_per_sec']:.1f} | {r['ratio_train']:.3f}x | {r['ratio_infer']:.3f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out, dry, quickstart = os.path.join(REPO, "runs", "cpu_precision"), False, True
    while args:
        a = args.pop(0)
        if a == "--out" and args:
            out = os.path.abspath(args.pop(0))
        elif a == "--dry-run":
            dry = True
        elif a == "--skip-quickstart":
            quickstart = False
        else:
            print(f"measure_cpu_precision: unknown argument '{a}'.\n{__doc__.split(chr(10) * 2)[1]}", file=sys.stderr)
            return 2
    cpu = cpu_report()
    print(f"CPU: {cpu['name']}: {cpu['why']}")
    seconds: dict[str, float] = {}
    for label, argv_ in commands(out, quickstart):
        print(f"[{label}] {shlex.join(argv_)}", flush=True)
        if dry:
            continue
        os.makedirs(out, exist_ok=True)
        start = time.perf_counter()
        with open(os.path.join(out, f"{label}.log"), "w") as log:
            code = subprocess.call(argv_, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        seconds[label] = time.perf_counter() - start
        if code:
            print(f"[{label}] failed (exit {code}); see {os.path.join(out, label + '.log')}", file=sys.stderr)
            return code
    if dry:
        return 0
    text = summary(out, cpu, seconds)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
