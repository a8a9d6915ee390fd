#!/usr/bin/env python
"""Write WebDataset tar shards from an image folder, for the ``tar_shards`` data source.

python tools/make_shards.py /data/in1k/train /data/in1k_shards/train-%06d.tar --max-count 10000
python tools/make_shards.py /data/in1k/train /data/in1k_shards/train-%06d.tar --shuffle --seed 0 --max-size-mb 1000

The source is an ImageFolder (root/<class>/<image>: classes are the sorted folder names, their
index each image's .cls) or a flat folder (root/<image>: no .cls, unlabeled). Images are copied
byte for byte. A shard is written as <name>.tmp and renamed when whole. The shards' list, the
DATA_PATHS pattern to train from and classes.txt (index, tab, class name) beside the shards are
printed; see vissl_vit/data/datasets/shards.py.
"""

from __future__ import annotations

import os
import sys

USAGE = """usage: python tools/make_shards.py SRC_FOLDER OUT_PATTERN [--max-count N] [--max-size-mb MB] [--shuffle] [--seed N]

  SRC_FOLDER     an ImageFolder (root/<class>/<image>) or a flat folder of images (unlabeled)
  OUT_PATTERN    the shard paths, with a printf field for the shard number: out/train-%06d.tar
  --max-count    images per shard, at most (default 10000)
  --max-size-mb  MB per shard, at most (default 1000: ~1 GB shards read well from disks and object stores)
  --shuffle      shuffle the samples across shards (default: sorted, class by class); --seed N (default 0)

Then train with DATA.TRAIN.DATA_SOURCES=[tar_shards] DATA.TRAIN.DATA_PATHS=["<the printed pattern>"]."""


def run(argv: list[str]) -> None:
    from vissl_vit.data.datasets.shards import brace_pattern, write_shards
    from vissl_vit.errors import UserError
    from vissl_vit.utils.cli import split_options

    args, opts = split_options(
        argv,
        values={"--max-count": ("max_count", int), "--max-size-mb": ("max_size_mb", float), "--seed": ("seed", int)},
        switches={"--shuffle": ("shuffle", True)},
        defaults={"max_count": 10000, "max_size_mb": 1000.0, "seed": 0, "shuffle": False},
        usage=USAGE,
    )
    if len(args) != 2:
        raise UserError(f"expected SRC_FOLDER and OUT_PATTERN, got {len(args)} argument(s).\n{USAGE}")
    shards, classes = write_shards(args[0], args[1], **opts)
    for path in shards:
        print(path)
    print(f"{len(shards)} shard(s); DATA_PATHS: {brace_pattern(os.path.abspath(args[1]), len(shards))}")
    print(f"classes: {classes}" if classes else "no classes (a flat folder): the shards are unlabeled")


def main(argv: list[str] | None = None) -> int:
    from vissl_vit.utils.cli import cli_main

    return cli_main(run, sys.argv[1:] if argv is None else argv, USAGE)


if __name__ == "__main__":
    sys.exit(main())
