"""Images on disk: an ImageFolder tree or a flat folder (``disk_folder``), or VISSL's .npy file lists
(``disk_filelist``); and the split folders (train/, val/) of a data set root, found as timm finds them."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from vissl_vit.data.datasets.base import ImageSource, name_list, open_image
from vissl_vit.errors import DataError
from vissl_vit.registry import DATASETS

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# timm's split folder names (timm/data/dataset_factory.py, _TRAIN_SYNONYM and _EVAL_SYNONYM), in its order
TRAIN_SPLIT_NAMES = ("train", "training")
EVAL_SPLIT_NAMES = ("val", "valid", "validation", "eval", "evaluation")
# every name that marks a folder of splits rather than of classes ("test" too: root/{train,test})
_SPLIT_FOLDERS = frozenset(TRAIN_SPLIT_NAMES + EVAL_SPLIT_NAMES + ("test",))


def class_folders(root: str) -> list[str]:
    """The class names of an ImageFolder root: its sub-folders, sorted (torchvision's ``find_classes``)."""
    return sorted(d.name for d in os.scandir(root) if d.is_dir())


def loose_images(root: str) -> list[str]:
    """The image files directly in ``root`` (not in sub-folders), sorted."""
    return sorted(
        e.path for e in os.scandir(root) if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file(follow_symlinks=True)
    )


def split_folders(root: str) -> list[str] | None:
    """The split sub-folders of ``root`` when it is a folder of splits, else None.

    ``root`` is a folder of splits when each of its (non-hidden) sub-folders has a split name:
    train, training, val, valid, validation, eval, evaluation (timm's names) or test. Stricter
    than timm, which takes ``root/train`` whenever it exists: a folder of vehicle classes may well
    hold ``train`` next to ``bus`` and ``car``.
    """
    if not os.path.isdir(root):
        return None
    subs = [n for n in class_folders(root) if not n.startswith(".")]
    if not subs or any(n not in _SPLIT_FOLDERS for n in subs):
        return None
    return subs


def find_split_folder(root: str, split: str) -> str | None:
    """``root/<split>`` when ``root`` is a folder of splits, as timm's ``_search_split`` finds it:
    the first existing name of the split's synonyms (train, training for TRAIN; val, valid,
    validation, eval, evaluation for TEST).

    Args:
        root: a folder (anything else gives None).
        split: "TRAIN" or "TEST".

    Returns:
        The split's folder, or None when ``root`` is not a folder of splits or lacks that split.
    """
    subs = split_folders(root)
    for name in (TRAIN_SPLIT_NAMES if split == "TRAIN" else EVAL_SPLIT_NAMES) if subs else ():
        if name in subs:
            return os.path.join(root, name)
    return None


class FolderSource(ImageSource):
    """``root/<class>/<image>``: classes are the sorted sub-folder names, labels their index.

    A flat folder, ``root/<image>`` without sub-folders (unlabeled images, for self-supervised
    training), is read too: ``classes`` is empty, ``flat`` is True and every label is -1 (as a
    file list without labels), for methods that set LABEL_TYPE sample_index or zero. The config
    checks refuse it for a loss that needs classes (``vissl_vit.config.validate``).
    """

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise DataError(f"disk_folder: '{root}' is not a folder (expected a folder of class folders).")
        self.root = root
        self.classes = class_folders(root)
        self.flat = not self.classes
        self.samples: list[tuple[str, int]] = []
        if self.flat:
            self.samples = [(p, -1) for p in loose_images(root)]
            if not self.samples:
                raise DataError(
                    f"disk_folder: '{root}' has no class sub-folders and no images ({', '.join(IMG_EXTENSIONS)}) "
                    "(expected root/<class>/<image>, or root/<image> for unlabeled images)."
                )
            return
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

    def all_labels(self) -> np.ndarray:
        """Every image's label at once (for a class-balanced split slice, ``DATA.<split>.SLICE``)."""
        return np.fromiter((label for _, label in self.samples), np.int64, len(self.samples))

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def summary(self) -> str:
        if self.flat:
            return f"'{self.root}': {len(self)} images, flat (no class folders: unlabeled)"
        return f"'{self.root}': {len(self)} images, {len(self.classes)} classes ({name_list(self.classes)})"


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

    def all_labels(self) -> np.ndarray:
        """Every image's label at once (-1 without a label file), for ``DATA.<split>.SLICE``."""
        return np.asarray(self.labels, np.int64) if self.labels is not None else np.full(len(self), -1, np.int64)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def summary(self) -> str:
        return f"{len(self)} images, {'labels from a .npy file' if self.labels is not None else 'no labels'}"


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
