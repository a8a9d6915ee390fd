"""Compose, validate and derive run configs (see defaults.yaml at the repository root)."""

from vissl_vit.config.compose import compose_config
from vissl_vit.config.derive import DerivedValues, derive_run_values
from vissl_vit.config.paths import configs_dir, defaults_path, list_configs

__all__ = ["DerivedValues", "compose_config", "configs_dir", "defaults_path", "derive_run_values", "list_configs"]
