"""The interface of a data source: images by index, loaded lazily, with labels."""

from __future__ import annotations

import os
import stat

from PIL import Image


class ImageSource:
    """A list of images and labels. ``load`` may raise for an unreadable image: the caller
    (:class:`~vissl_vit.data.dataset.VisslDataset`) counts it and substitutes another image."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> Image.Image:
        """The image at ``index`` (PIL)."""
        raise NotImplementedError

    def label(self, index: int) -> int:
        """The class label at ``index``."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where image ``index`` comes from (a path), for error messages."""
        return f"image {index}"

    def summary(self) -> str:
        """What this source holds, for the data summary logged at the start of a run."""
        return f"{len(self)} images"


def name_list(names: list[str], first: int = 8) -> str:
    """``names`` joined with commas, the first ``first`` of them and a count of the rest."""
    shown = ", ".join(names[:first])
    return shown + (f", ... ({len(names) - first} more)" if len(names) > first else "")


def open_image(path: str) -> Image.Image:
    """Decode an image file fully (so a truncated file fails here, not later) as RGB.

    A local path must be a regular file: opening a FIFO (or a device) named ``x.jpg`` would block
    the loader forever, so it is refused and becomes an unreadable image like a corrupt one.
    """
    from iopath.common.file_io import g_pathmgr

    if "://" not in path:  # local; iopath's other handlers (http, manifold, ...) have no such files
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is not a regular file (a FIFO, socket, device or folder)")
    with g_pathmgr.open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return img.convert("RGB")
