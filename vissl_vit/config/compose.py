"""Compose a run's config from defaults.yaml, a config file, overlays and dotted overrides.

The grammar is VISSL's, parsed by hydra's override parser::

    config=pretrain/vision_transformer/supervised/1gpu_vit_example   # the experiment config
    +config/test/overlays=one_epoch                                  # an overlay, in order
    config.OPTIMIZER.num_epochs=1                                    # one key

We use hydra's parser for the grammar but merge with OmegaConf ourselves rather than through
``hydra.compose``: each source is validated against defaults.yaml before it is merged, so an
error names the file or override the bad key came from, and defaults.yaml can live at the
repository root outside hydra's search path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from vissl_vit.config.paths import configs_dir, defaults_path, list_configs
from vissl_vit.config.validate import check_cross_keys, check_environment, check_source, coerce_override
from vissl_vit.errors import ConfigError, closest

USAGE = (
    "Each argument is one of: config=<path under configs/config/, no .yaml>, "
    "+config/<group>=<name> (an overlay), or config.KEY.SUBKEY=value."
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently;
    VISSL's own tutorial sets DROP_PATH_RATE twice in one block)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name}: key '{key}' is set twice in the same mapping (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); keep one."
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """Load a config file in VISSL's format (a top-level ``config:`` mapping)."""
    try:
        raw = path.read_bytes()
        raw.decode("utf-8")  # whatever the locale: a traceback from deep in the YAML reader otherwise
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as UTF-8."
        ) from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) - {"config"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(
            f"{path}: a config file holds one top-level mapping `config:` (VISSL's format, with "
            f"`# @package _global_` on its first line); found {keys}."
        )
    return data


def _resolve_config_file(name: str, what: str) -> Path:
    rel = name[:-5] if name.endswith(".yaml") else name
    path = configs_dir() / f"{rel}.yaml"
    if path.is_file():
        return path
    known = list_configs()
    near = closest(rel, known, n=5)
    if not near:  # fall back to configs in the same folder, or sharing the file name
        stem = Path(rel).name
        near = [k for k in known if k.startswith(str(Path(rel).parent) + "/") or Path(k).name == stem][:5]
    hint = (
        ("Nearest existing: " + ", ".join(near) + ".") if near else f"{len(known)} configs exist under {configs_dir()}."
    )
    raise ConfigError(f"Unknown {what} '{rel}': no file {path}. {hint}")


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose, validate and return the config (the root node, with ``config`` under it).

    Args:
        overrides: command-line style strings, e.g. ``["config=test/quick_vit",
            "config.OPTIMIZER.num_epochs=1"]``.

    Raises:
        ConfigError: a malformed argument, an unknown config file, an unknown key or a value of the
            wrong type, with the source, the key and the closest real key in the message.
    """
    defaults = load_yaml(defaults_path())
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as e:
        raise ConfigError(f"Could not parse the command line: {e}. {USAGE}") from None

    main_file: Path | None = None
    overlays: list[Path] = []
    dotted: list[tuple[str, Any, str]] = []
    for o in parsed:
        key = o.key_or_group
        if o.is_delete():
            raise ConfigError(f"'{o.input_line}': deleting keys is not supported; set a value instead. {USAGE}")
        if key == "config" and not o.is_add():
            if main_file is not None:
                raise ConfigError(f"'{o.input_line}': only one config=... may be given. {USAGE}")
            main_file = _resolve_config_file(str(o.value()), "config")
        elif key.startswith("config/") and o.is_add():
            overlays.append(_resolve_config_file(f"{key[len('config/') :]}/{o.value()}", "overlay"))
        elif key.startswith("config.") and not o.is_add():
            dotted.append((key, o.value(), o.input_line))
        elif key.startswith("config.") and o.is_add():
            raise ConfigError(
                f"'{o.input_line}': keys cannot be added, every key is declared in defaults.yaml; "
                f"drop the '+' to override {key}."
            )
        else:
            raise ConfigError(f"'{o.input_line}' is not understood. {USAGE}")

    cfg = OmegaConf.create(defaults)
    for path in ([main_file] if main_file else []) + overlays:
        data = load_yaml(path)
        check_source(data, defaults, source=str(path))
        cfg = OmegaConf.merge(cfg, data)
    for key, value, line in dotted:
        value = coerce_override(key, value, defaults, source=f"the override '{line}'")
        OmegaConf.update(cfg, key, value, merge=isinstance(value, dict))
    check_cross_keys(cfg.config)
    check_environment(cfg.config)
    return cfg
