"""WebDataset-style tar shards (``tar_shards``): the format deit3-jax and timm stream ImageNet from,
read here map-style, and :func:`write_shards`, which writes them from an ImageFolder
(``tools/make_shards.py``).

The format is WebDataset's: a sample is a run of consecutive tar members sharing a key (the
member's path up to the first dot of its file name), ``<key>.jpg`` (or .jpeg, .png, .webp, any
image extension of ``disk_folder``) with ``<key>.cls``, the class index as text. Other members
(``.json``, ``.txt``) are ignored. A shard set without ``.cls`` members is unlabeled (every label
-1, for self-supervised training).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from vissl_vit.data.datasets.base import ImageSource, name_list
from vissl_vit.data.datasets.disk import IMG_EXTENSIONS, FolderSource
from vissl_vit.errors import ConfigError, DataError
from vissl_vit.registry import DATASETS

IMAGE_EXTS = frozenset(e.lstrip(".") for e in IMG_EXTENSIONS)
CLASSES_FILE = "classes.txt"  # beside the shards: "<index>\t<name>" per line, written by write_shards

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """The paths a WebDataset shard pattern names, in order: ``{000000..000127}`` is a zero-padded
    numeric range (when a bound starts with 0, every number is padded to the wider bound's width,
    as in bash and the ``braceexpand`` package WebDataset uses), ``{a,b}`` a list of alternatives; several
    groups multiply out left to right. A pattern without braces is itself."""
    found = [m for m in (_RANGE.search(pattern), _ALTERNATIVES.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda m: m.start())  # the leftmost group first
    head, tail = pattern[: m.start()], pattern[m.end() :]
    if m.re is _RANGE:
        lo, hi = m.group(1), m.group(2)
        padded = any(b.startswith("0") and len(b) > 1 for b in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        choices = m.group(1).split(",")
    return [head + c + rest for c in choices for rest in expand_braces(tail)]


def shard_paths(path: str) -> list[str]:
    """The shard files of a ``DATA_PATHS`` entry: a brace pattern (``train-{000000..000127}.tar``),
    a folder (its ``*.tar`` files, sorted) or a list file (one shard path a line, relative to the
    list's folder unless absolute; ``#`` starts a comment). Every shard must exist.

    Raises:
        DataError: (one line, naming ``path``) when it names no shard or a shard is missing.
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        shards = sorted(e.path for e in os.scandir(path) if e.name.endswith(".tar") and e.is_file())
        if not shards:
            raise DataError(f"tar_shards: the folder '{path}' holds no .tar shards.")
        return shards
    if os.path.isfile(path) and not path.endswith(".tar") and not tarfile.is_tarfile(path):
        base = os.path.dirname(path)
        with open(path) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
        shards = [os.path.join(base, os.path.expanduser(s)) for s in lines if s]
        if not shards:
            raise DataError(f"tar_shards: the shard list '{path}' names no shards.")
    else:
        shards = expand_braces(path)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        some = ", ".join(f"'{s}'" for s in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(
            f"tar_shards: {len(missing)} of the {len(shards)} shard(s) of '{path}' do not exist ({some}); expected "
            "a brace pattern such as /data/train-{000000..000127}.tar, a folder of .tar files or a list file."
        )
    return shards


def split_key(name: str) -> tuple[str, str]:
    """A member name as WebDataset splits it: (key, extension), the extension being everything after
    the first dot of the file name (``a/b.c.jpg`` -> ``("a/b", "c.jpg")``), lower-cased."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _index_shard(path: str) -> Iterator[tuple[str, str, int, int, int | None]]:
    """The samples of one shard, in order: (key, image extension, data offset, size, label or None).

    Reads the tar headers only (tarfile seeks over the data), and the few bytes of each ``.cls``.
    """
    try:
        tar = tarfile.open(path, "r:")  # uncompressed only: a compressed tar cannot be seeked into
    except tarfile.ReadError as e:
        raise DataError(f"tar_shards: '{path}' is not an uncompressed tar file ({e}).") from None
    with tar:
        key, image, label = None, None, None
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except tarfile.TarError as e:  # a damaged header: the rest of the shard cannot be found
                raise DataError(f"tar_shards: '{path}' has a damaged tar header after '{key}' ({e}).") from None
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if k != key:
                if image is not None:
                    yield (key, *image, label)
                key, image, label = k, None, None
            if ext in IMAGE_EXTS and image is None:
                image = (ext, member.offset_data, member.size)
            elif ext == "cls":
                text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                try:
                    label = int(text)
                except ValueError:
                    raise DataError(
                        f"tar_shards: '{path}' member '{member.name}' holds {text[:40]!r}, not a class index."
                    ) from None
        if image is not None:
            yield (key, *image, label)
        _check_end(tar, path)


def _check_end(tar: tarfile.TarFile, path: str) -> None:
    """Refuse a shard whose members end before its data does: tarfile takes a damaged header for
    the end of the archive, which would silently drop every sample after it."""
    tar.fileobj.seek(tar.offset)
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            raise DataError(
                f"tar_shards: '{path}' has a damaged tar header at byte {tar.offset}: the data after it cannot be "
                "indexed (rewrite the shard)."
            )


INDEX_SUFFIX = ".index.json"  # the cached index of shard x.tar: x.tar.index.json beside it


def _stamp(path: str) -> dict[str, int]:
    """What identifies one version of a shard file: its size, modification time and inode."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def cached_index(path: str) -> list[tuple[str, str, int, int, int | None]]:
    """The samples of one shard (see :func:`_index_shard`), from its cached index when that matches
    the shard (same size, modification time and inode), else read from the tar and cached.

    The cache, ``<shard>.index.json`` beside the shard, spares every rank of every run the read
    of every tar header (minutes for ImageNet's 1.28 M images); it is written atomically (a
    temporary file renamed), and skipped where the folder is read-only.
    """
    stamp = _stamp(path)
    cache = path + INDEX_SUFFIX
    try:
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("shard") == stamp:
            return [tuple(row) for row in saved["samples"]]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # no cache, or an unreadable one: index the tar
    samples = list(_index_shard(path))
    tmp = f"{cache}.{os.getpid()}.tmp"  # one per process: ranks indexing the same shard do not collide
    try:
        with open(tmp, "w") as f:
            json.dump({"shard": stamp, "samples": samples}, f)
        os.replace(tmp, cache)
    except OSError:  # a read-only folder: the index stays in memory
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return samples


_ShardSetIndex = tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# DATA_PATHS entry -> (its shards' stamps, their index): the config's checks (labels present, the
# class count of num_classes: auto) and the data set itself read it once per process, not once each.
_INDEX_MEMO: dict[str, tuple[tuple[tuple[int, ...], ...], _ShardSetIndex]] = {}


def _shard_set_index(path: str, shards: list[str]) -> _ShardSetIndex:
    """(member names, shard of each, offset, size, label or -1) of every image of ``shards``, read
    with :func:`cached_index` unless this process read the same shard files (same stamps) before.
    The arrays are shared by the sources built from them, which only read them."""
    stamps = tuple(tuple(_stamp(shard).values()) for shard in shards)
    memo = _INDEX_MEMO.get(path)
    if memo is not None and memo[0] == stamps:
        return memo[1]
    shard_ids, offsets, sizes, labels, keys = [], [], [], [], []
    for s, shard in enumerate(shards):
        for key, ext, offset, size, label in cached_index(shard):
            keys.append(f"{key}.{ext}")
            shard_ids.append(s)
            offsets.append(offset)
            sizes.append(size)
            labels.append(-1 if label is None else label)
    if not keys:
        raise DataError(f"tar_shards: the shards of '{path}' hold no images ({', '.join(sorted(IMAGE_EXTS))}).")
    index = (
        keys,
        np.asarray(shard_ids, np.int32),
        np.asarray(offsets, np.int64),
        np.asarray(sizes, np.int64),
        np.asarray(labels, np.int64),
    )
    for array in index[1:]:
        array.flags.writeable = False  # shared: a write through one source would change the others
    _INDEX_MEMO[path] = (stamps, index)
    return index


class ShardSource(ImageSource):
    """Images in WebDataset tar shards, read map-style: every sample's place is indexed once (tar
    headers only; kept in memory and cached beside each shard, see :func:`cached_index`), then
    :meth:`load` reads and decodes one image.

    Map-style on purpose: the engine's samplers then work unchanged (exact resume mid-epoch,
    repeated augmentation, the distributed split, SLICE and DATA_LIMIT), where timm's and
    deit3-jax's streaming readers shuffle shards and a buffer of samples instead, which cannot
    resume at an exact sample. The cost is random reads, one per image, which local disks and
    network file systems serve well for images of ~100 KB.

    Shard files are opened lazily by each process (a loader worker's reads never share a file
    handle with its parent's or another worker's: handles opened before a fork are dropped),
    and read with ``os.pread``, which moves no file offset.

    Args:
        path: a ``DATA_PATHS`` entry, see :func:`shard_paths`.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self.shards = shard_paths(self.path)
        self.keys, self.shard_ids, self.offsets, self.sizes, self.labels = _shard_set_index(self.path, self.shards)
        self.flat = bool((self.labels < 0).all())  # no .cls at all: unlabeled, as a flat folder
        if not self.flat and (self.labels < 0).any():
            i = int(np.argmax(self.labels < 0))
            raise DataError(
                f"tar_shards: '{self.describe(i)}' has no .cls label but other samples of '{self.path}' have one "
                "(a shard set is labeled throughout or not at all)."
            )
        self.classes = [] if self.flat else self._class_names(int(self.labels.max()) + 1)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _class_names(self, count: int) -> list[str]:
        """The class names from ``classes.txt`` beside the first shard when there is one, else the indices."""
        names = [str(c) for c in range(count)]
        listing = os.path.join(os.path.dirname(self.shards[0]), CLASSES_FILE)
        if os.path.isfile(listing):
            with open(listing) as f:
                for line in f:
                    index, _, name = line.rstrip("\n").partition("\t")
                    if index.isdigit() and int(index) < count:
                        names[int(index)] = name
        return names

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked (a loader worker): the parent's handles are not ours
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}  # a spawned worker opens its own
        return state

    def close(self) -> None:
        """Close this process's shard files (reopened by the next :meth:`load`)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  at interpreter exit os may be gone
            pass

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, index: int) -> bytes:
        """The image member's bytes, as stored."""
        size = int(self.sizes[index])
        data = os.pread(self._fd(int(self.shard_ids[index])), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes (a truncated shard?)")
        return data

    def load(self, index: int) -> Image.Image:
        img = Image.open(io.BytesIO(self.read_bytes(index)))
        img.load()
        return img.convert("RGB")

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def all_labels(self) -> np.ndarray:
        """Every image's label at once (-1 when unlabeled), for ``DATA.<split>.SLICE``."""
        return self.labels

    def describe(self, index: int) -> str:
        return f"{self.shards[int(self.shard_ids[index])]}:{self.keys[index]}"

    def summary(self) -> str:
        head = f"'{self.path}': {len(self.shards)} shards, {len(self)} images"
        if self.flat:
            return head + ", no .cls members (unlabeled)"
        return head + f", {len(self.classes)} classes ({name_list(self.classes)})"


@DATASETS.register("tar_shards")
def tar_shards(path: str, label_path: str | None, name: str, train: bool, mmap: bool) -> ImageSource:
    return ShardSource(path)


_TAR_BLOCK = 512


def _member_bytes(size: int) -> int:
    """What a member of ``size`` bytes takes in a tar: a header block and the data padded to blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same folder gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    src: str, pattern: str, max_count: int = 10000, max_size_mb: float = 1000.0, shuffle: bool = False, seed: int = 0
) -> tuple[list[str], str | None]:
    """Write the images of an ImageFolder (or a flat folder) as WebDataset tar shards.

    Classes are the sorted class folders (torchvision's order, as ``disk_folder`` reads them) and
    each image's ``.cls`` is its class index; a flat folder gives shards without ``.cls``. Images
    are copied byte for byte (never re-encoded), each with a ``.json`` naming its source file.
    Samples go in ``disk_folder``'s order, or shuffled with ``seed`` (shards of one class each
    would make a streaming reader's buffer shuffle poor). Each shard is written as ``<name>.tmp``
    and renamed when complete, so a shard that exists is whole.

    Args:
        src: the folder, ``root/<class>/<image>`` or ``root/<image>``.
        pattern: the shard paths, with a printf field for the shard number (``out/train-%06d.tar``).
        max_count: at most this many images a shard.
        max_size_mb: and at most this many MB a shard (a single larger image gets a shard of its own).
        shuffle: shuffle the samples (with ``seed``).
        seed: the shuffle's seed.

    Returns:
        The shard paths written, and the ``classes.txt`` written beside them (None when unlabeled).
    """
    if not re.search(r"%0?\d*d", pattern):
        raise ConfigError(
            f"OUT_PATTERN='{pattern}' has no shard number field: expected a printf field such as "
            "out/train-%06d.tar (WebDataset's ShardWriter convention)."
        )
    if max_count < 1 or max_size_mb <= 0:
        raise ConfigError(f"--max-count={max_count} and --max-size-mb={max_size_mb}: both must be positive.")
    src = os.path.expanduser(src)
    if not os.path.isdir(src):
        raise ConfigError(f"SRC_FOLDER='{src}' is not a folder (expected root/<class>/<image> or root/<image>).")
    folder = FolderSource(src)
    samples = list(folder.samples)
    if shuffle:
        random.Random(seed).shuffle(samples)
    out_dir = os.path.dirname(pattern % 0) or "."
    os.makedirs(out_dir, exist_ok=True)
    limit = int(max_size_mb * 1e6)
    written: list[str] = []
    tar, size, count, tmp = None, 0, 0, ""

    def finish() -> None:
        tar.close()
        os.replace(tmp, written[-1])

    for n, (path, label) in enumerate(samples):
        with open(path, "rb") as f:
            data = f.read()
        key = f"{n:09d}"
        ext = os.path.basename(path).rpartition(".")[2].lower()
        meta = json.dumps({"path": os.path.relpath(path, folder.root), "label": label}).encode()
        members = [(f"{key}.{ext}", data), (f"{key}.json", meta)]
        if label >= 0:
            members.append((f"{key}.cls", str(label).encode()))
        need = sum(_member_bytes(len(d)) for _, d in members)
        if tar is not None and (count >= max_count or size + need > limit):
            finish()
            tar = None
        if tar is None:
            written.append(pattern % len(written))
            tmp = written[-1] + ".tmp"
            tar, size, count = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), 2 * _TAR_BLOCK, 0
        for name, d in members:
            _add(tar, name, d)
        size, count = size + need, count + 1
    finish()
    classes_path = None
    if folder.classes:
        classes_path = os.path.join(out_dir, CLASSES_FILE)
        with open(classes_path + ".tmp", "w") as f:
            f.writelines(f"{i}\t{c}\n" for i, c in enumerate(folder.classes))
        os.replace(classes_path + ".tmp", classes_path)
    return written, classes_path


def brace_pattern(pattern: str, count: int) -> str:
    """The ``DATA_PATHS`` brace pattern of ``count`` shards written with printf ``pattern``:
    ``out/train-%06d.tar`` and 4 -> ``out/train-{000000..000003}.tar``."""
    m = re.search(r"%(0?)(\d*)d", pattern)
    width = int(m.group(2)) if m.group(1) and m.group(2) else 0
    field = "{" + f"{str(0).zfill(width)}..{str(count - 1).zfill(width)}" + "}" if count > 1 else str(0).zfill(width)
    return pattern[: m.start()] + field + pattern[m.end() :]
