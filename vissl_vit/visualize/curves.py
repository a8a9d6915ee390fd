"""Training curves of one or several runs, from their ``stdout.json`` and ``metrics.json``, as one PNG:

    python tools/plot_curves.py ./runs/ln ./runs/bn ./runs/gn --labels LN BN GN --out norms.png

Four panels: the training loss per step (the raw values faint, an exponential moving average over
them solid), the learning rate per step, top-1 per epoch (train solid, test dashed) and the loss per
epoch (train mean solid, test dashed). Each run has its own colour, named in the legend (its folder
name unless ``labels`` are given): the comparisons of issue 16 (LayerNorm vs BatchNorm vs ..., Adam
vs Shampoo) are several runs on one picture.

A resumed run's files may hold a step or a phase twice (the lines written after its last
checkpoint, then again by the resumed process): the last occurrence is kept, as the resumed run's
own value.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vissl_vit.errors import ConfigError
from vissl_vit.utils.logging import read_json_lines
from vissl_vit.visualize.common import new_figure, save_png

# TensorBoard's default smoothing weight is 0.6; this keeps the curve close to the raw values
# ("lightly smoothed") while showing the trend of a noisy per-step loss.
SMOOTHING = 0.6
# The picture's size in pixels (width, height): four panels of about 600 x 400.
SIZE = (1200, 800)


@dataclass
class RunCurves:
    """One run's series, each a list of (x, y) sorted by x.

    Args:
        label: the legend's name of the run.
        loss: (iteration, loss) of each logged step.
        lr: (iteration, lr) of each logged step.
        top1: ``{"train": [(epoch, top-1)], "test": [...]}`` (epochs from 1), the run's meter;
            empty lists without an accuracy meter.
        phase_loss: ``{"train": [(epoch, mean loss)], "test": [(epoch, test loss)]}``.
    """

    label: str
    loss: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    top1: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"train": [], "test": []})
    phase_loss: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: {"train": [], "test": []})


def _lines(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file (is the folder a run folder, CHECKPOINT.DIR?).")
    try:
        records = read_json_lines(path)
    except ValueError as e:
        raise ConfigError(f"{path}: not a JSON-lines file ({e}).") from None
    if not records:
        raise ConfigError(f"{path}: the file has no complete line (the run has not logged a step or phase yet).")
    return records


def _meter_top1(record: dict[str, Any], prefix: str) -> float | None:
    """The top-1 of the run's meter in a phase line (``<prefix>_<meter>: {"top_1": {"0": v}}``), its
    first output; None without one. The EMA's meter (``..._ema``) is not the run's."""
    for key, value in record.items():
        if key.startswith(f"{prefix}_") and not key.endswith("_ema") and isinstance(value, dict):
            per_output = value.get("top_1")
            if isinstance(per_output, dict) and per_output:
                return float(next(iter(per_output.values())))
    return None


def read_run(run_dir: str, label: str | None = None) -> RunCurves:
    """A run folder's curves (see :class:`RunCurves`); ``label`` defaults to the folder's name.

    Raises:
        ConfigError: stdout.json or metrics.json is missing or has no complete line.
    """
    run_dir = os.path.abspath(run_dir)
    steps = {r["iteration"]: r for r in _lines(os.path.join(run_dir, "stdout.json")) if "iteration" in r}
    # a phase is known by its number: a resumed run writes the phases after its checkpoint again
    phases = {r["phase_idx"]: r for r in _lines(os.path.join(run_dir, "metrics.json")) if "phase_idx" in r}
    out = RunCurves(label or os.path.basename(run_dir))
    for it in sorted(steps):
        if "loss" in steps[it]:
            out.loss.append((it, float(steps[it]["loss"])))
        if "lr" in steps[it]:
            out.lr.append((it, float(steps[it]["lr"])))
    for idx in sorted(phases):
        r = phases[idx]
        epoch = int(r.get("train_phase_idx", 0)) + 1
        for prefix in ("train", "test"):
            if f"{prefix}_loss" in r:
                out.phase_loss[prefix].append((epoch, float(r[f"{prefix}_loss"])))
            top1 = _meter_top1(r, prefix) if f"{prefix}_loss" in r else None
            if top1 is not None:
                out.top1[prefix].append((epoch, top1))
    return out


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so that the first values
    are not pulled towards 0 (``s_t = w s_{t-1} + (1 - w) x_t``, divided by ``1 - w^t``)."""
    out, last = [], 0.0
    for t, x in enumerate(values, 1):
        last = weight * last + (1.0 - weight) * x
        out.append(last / (1.0 - weight**t))
    return out


def default_labels(run_dirs: Sequence[str]) -> list[str]:
    """The runs' folder names; where two are the same, their parent folder is put in front."""
    names = [os.path.basename(os.path.abspath(d)) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [os.path.join(*os.path.abspath(d).split(os.sep)[-2:]) for d in run_dirs]


def _xy(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in points], [p[1] for p in points]


def _draw(fig: Any, runs: list[RunCurves]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax_loss, ax_lr, ax_top1, ax_phase = fig.subplots(2, 2).flatten()
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        x, y = _xy(run.loss)
        ax_loss.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax_loss.plot(x, smooth(y), color=color, linewidth=1.6, label=run.label)
        ax_lr.plot(*_xy(run.lr), color=color, linewidth=1.4, label=run.label)
        for prefix, style in (("train", "-"), ("test", "--")):
            marker = "o" if len(run.top1[prefix]) < 30 else None
            for ax, series in ((ax_top1, run.top1[prefix]), (ax_phase, run.phase_loss[prefix])):
                if series:
                    ax.plot(
                        *_xy(series), style, color=color, marker=marker, markersize=3, label=f"{run.label} {prefix}"
                    )
    ax_loss.set(title="training loss per step (faint: raw)", xlabel="iteration", ylabel="loss")
    ax_lr.set(title="learning rate", xlabel="iteration", ylabel="lr")
    ax_top1.set(title="top-1 per epoch (train solid, test dashed)", xlabel="epoch", ylabel="top-1 (%)")
    ax_phase.set(title="loss per epoch (train mean solid, test dashed)", xlabel="epoch", ylabel="loss")
    if not any(r.top1["train"] or r.top1["test"] for r in runs):
        ax_top1.text(
            0.5, 0.5, "no accuracy meter in metrics.json", ha="center", va="center", transform=ax_top1.transAxes
        )
    for ax in (ax_top1, ax_phase):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
    for ax in (ax_loss, ax_lr, ax_top1, ax_phase):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    # fixed margins, not tight_layout: that would draw the figure once more (half the time of a picture)
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.07, top=0.96, wspace=0.18, hspace=0.3)


def plot_curves(
    run_dirs: Sequence[str],
    out: str | None = None,
    labels: Sequence[str] | None = None,
    size: tuple[int, int] = SIZE,
) -> str:
    """Draw the curves of ``run_dirs`` on one picture; returns the PNG's path.

    Args:
        run_dirs: run folders (CHECKPOINT.DIR), each with stdout.json and metrics.json.
        out: the PNG to write; default ``<run_dir>/pictures/curves.png`` for a single run (several
            runs need one).
        labels: the legend's names, one per run; default the folder names.
        size: (width, height) in pixels.

    Raises:
        ConfigError: no run, a label count that differs from the run count, several runs without
            ``out``, or a run's file missing or empty.
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ConfigError("plot_curves: run_dirs is empty; expected at least one run folder.")
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"plot_curves: {len(labels)} labels for {len(run_dirs)} runs; expected one label per run.")
    if out is None:
        if len(run_dirs) > 1:
            raise ConfigError(
                f"plot_curves: {len(run_dirs)} runs and no out; expected --out FILE.png for a comparison."
            )
        out = os.path.join(run_dirs[0], "pictures", "curves.png")
    names = list(labels) if labels is not None else default_labels(run_dirs)
    runs = [read_run(d, name) for d, name in zip(run_dirs, names)]
    fig = new_figure(*size)
    _draw(fig, runs)
    return save_png(fig, out)


USAGE = "python tools/plot_curves.py RUN_DIR [RUN_DIR ...] [--labels NAME ...] [--out FILE.png]"


def main(argv: list[str] | None = None) -> int:
    """The command line (tools/plot_curves.py); returns the exit status."""
    from vissl_vit.utils.cli import exit_status

    parser = argparse.ArgumentParser(
        prog="tools/plot_curves.py",
        usage=USAGE,
        description="Loss, LR and top-1 curves of one or several runs (stdout.json, metrics.json) as one PNG.",
    )
    parser.add_argument("run_dirs", nargs="+", help="run folders (CHECKPOINT.DIR)")
    parser.add_argument(
        "--labels", nargs="+", default=None, help="the legend's names, one per run (default: folder names)"
    )
    parser.add_argument("--out", default=None, help="the PNG (default RUN_DIR/pictures/curves.png for one run)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with exit_status() as status:
        print(plot_curves(args.run_dirs, args.out, args.labels))
    return status.code
