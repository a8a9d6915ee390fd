"""What every picture shares: a matplotlib figure of an exact pixel size, written atomically to PNG,
and images shown as they were before the input normalisation.

Figures are made with ``matplotlib.figure.Figure`` directly, never ``pyplot``: no global figure
state, no GUI backend, safe in a training process and in its worker threads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from vissl_vit.errors import ConfigError

DPI = 100


def new_figure(width_px: int, height_px: int) -> Any:
    """A matplotlib Figure that saves to exactly ``width_px`` x ``height_px`` pixels."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is an install requirement
        raise ConfigError("pictures need matplotlib: pip install matplotlib") from e
    if width_px < 16 or height_px < 16:
        raise ConfigError(f"a picture of {width_px}x{height_px} pixels: expected at least 16x16")
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def save_png(fig: Any, path: str) -> str:
    """Write ``fig`` to ``path`` (PNG) atomically: a temporary file in the same folder, then a rename,
    so a killed run never leaves half a picture. Returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".png", dir=folder)
    os.close(fd)
    try:
        # no bbox_inches="tight": it would change the pixel size the caller asked for
        fig.savefig(tmp, format="png", dpi=DPI)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the picture private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _entries(transforms: Sequence[Any] | None) -> list[dict]:
    out = []
    for t in transforms or []:
        if isinstance(t, dict):
            out.append(t)
        else:  # an OmegaConf node
            from omegaconf import OmegaConf

            out.append(OmegaConf.to_container(t, resolve=True))
    return out


def denormalize(x: torch.Tensor, transforms: Sequence[Any] | None) -> torch.Tensor:
    """Undo the last value mapping of a transform list (``Normalize`` mean/std or ``ValueRange``
    vmin/vmax, as config entries) so that ``x`` [.., C, H, W] is back in [0, 1] for display; clamps
    to [0, 1]. Without either transform ``x`` is taken to be in [0, 1] already."""
    x = x.detach().float().cpu()
    for entry in reversed(_entries(transforms)):
        name = entry.get("name")
        if name == "Normalize":
            c = x.shape[-3]
            mean = torch.as_tensor(entry["mean"], dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
            std = torch.as_tensor(entry["std"], dtype=torch.float32).reshape(-1, 1, 1).expand(c, 1, 1)
            x = x * std + mean
            break
        if name == "ValueRange":
            vmin, vmax = float(entry.get("vmin", -1.0)), float(entry.get("vmax", 1.0))
            x = (x - vmin) / (vmax - vmin)
            break
    return x.clamp(0.0, 1.0)


def to_display(x: torch.Tensor) -> Any:
    """One image [C, H, W] in [0, 1] -> a numpy array matplotlib's ``imshow`` takes ([H, W] for one
    channel, shown grey; [H, W, 3] otherwise)."""
    x = x.detach().float().cpu()
    if x.shape[0] == 1:
        return x[0].numpy()
    return x[:3].permute(1, 2, 0).numpy()
