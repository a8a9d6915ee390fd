"""Images on disk: an ImageFolder tree (``disk_folder``) or VISSL's .npy file lists (``disk_filelist``)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from vissl_vit.data.datasets.base import ImageSource, open_image
from vissl_vit.errors import DataError
from vissl_vit.registry import DATASETS

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class FolderSource(ImageSource):
    """``root/<class>/<image>``: classes are the sorted sub-folder names, labels their index."""

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise DataError(f"disk_folder: '{root}' is not a folder (expected a folder of class folders).")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        if not self.classes:
            raise DataError(f"disk_folder: '{root}' has no class sub-folders (expected root/<class>/<image>).")
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, cls in enumerate(self.classes):
            start = len(self.samples)
            for dirpath, _, files in sorted(os.walk(os.path.join(root, cls), followlinks=True)):
                self.samples += [
                    (os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)
                ]
            if len(self.samples) == start:
                empty.append(cls)
        if not self.samples:
            raise DataError(f"disk_folder: no images ({', '.join(IMG_EXTENSIONS)}) under '{root}'.")
        if empty:
            # an empty class would still take a label and shift every later class's (torchvision's
            # ImageFolder refuses it too)
            raise DataError(
                f"disk_folder: the class folder(s) {', '.join(repr(c) for c in empty)} under '{root}' hold no images "
                f"({', '.join(IMG_EXTENSIONS)}); an empty class would shift the labels of the classes after it. "
                "Remove the folder(s) or add their images."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        return open_image(self.samples[index][0])

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def describe(self, index: int) -> str:
        return self.samples[index][0]


class FileListSource(ImageSource):
    """VISSL's file lists: a .npy array of image paths and, optionally, a .npy array of labels."""

    def __init__(self, path: str, label_path: str | None, mmap: bool) -> None:
        self.paths = _load_npy(path, mmap, "DATA_PATHS")
        self.labels = _load_npy(label_path, mmap, "LABEL_PATHS") if label_path else None
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise DataError(
                f"disk_filelist: {label_path} has {len(self.labels)} labels but {path} has {len(self.paths)} images."
            )
        _check_some_paths_exist(self.paths, path)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        return open_image(str(self.paths[index]))

    def label(self, index: int) -> int:
        return int(self.labels[index]) if self.labels is not None else -1

    def describe(self, index: int) -> str:
        return str(self.paths[index])


_PROBES = 32  # paths of a file list looked at when it is opened (a stat each, even on a slow file system)


def _check_some_paths_exist(paths: np.ndarray, list_path: str) -> None:
    """Refuse a file list none of whose probed paths exists (a wrong prefix, the list of another
    machine): every read would fail and each sample would scan the whole list for a readable image.
    Up to 32 paths spread over the list are probed; any one existing is enough (a few missing
    files are unreadable images, counted against MAX_BAD_IMAGE_FRACTION)."""
    if not len(paths):
        raise DataError(f"disk_filelist: '{list_path}' holds no paths.")
    probes = sorted({int(i) for i in np.linspace(0, len(paths) - 1, min(_PROBES, len(paths)))})
    names = [str(paths[i]) for i in probes]
    if any("://" in p or os.path.exists(p) for p in names):
        return
    checked = "all" if len(probes) == len(paths) else f"{len(probes)} spread over the list"
    raise DataError(
        f"disk_filelist: none of the image paths in '{list_path}' exists ({checked} of its {len(paths)} paths "
        f"checked, e.g. '{names[0]}'); the paths are absolute or relative to the working directory "
        f"'{os.getcwd()}'."
    )


def _load_npy(path: str, mmap: bool, key: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"disk_filelist: the {key} file '{path}' does not exist (expected a .npy array).")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"disk_filelist: '{path}' is not a .npy array of paths or labels: {e}") from None


@DATASETS.register("disk_folder")
def disk_folder(path: str, label_path: str | None, name: str, train: bool, mmap: bool) -> ImageSource:
    return FolderSource(path)


@DATASETS.register("disk_filelist")
def disk_filelist(path: str, label_path: str | None, name: str, train: bool, mmap: bool) -> ImageSource:
    return FileListSource(path, label_path, mmap)
