"""Data sources, registered by name in DATASETS (the names of DATA.*.DATA_SOURCES)."""

from vissl_vit.data.datasets import disk, shards, synthetic, torchvision_files  # noqa: F401  (registration)
