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

from vissl_vit.config.derive import resolve_data
from vissl_vit.config.paths import configs_dir, defaults_path, list_configs
from vissl_vit.config.validate import (
    check_cross_keys,
    check_environment,
    check_source,
    coerce_override,
    raise_problems,
)
from vissl_vit.config.vissl_compat import Translation, log_notes, top_level_keys, translate_override, translate_source
from vissl_vit.errors import ConfigError, closest

USAGE = (
    "Each argument is one of: config=<path under configs/config/, no .yaml, or a path to a .yaml file>, "
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
    if isinstance(data, dict) and isinstance(data.get("derived"), dict) and "config" in data:
        # a run folder's train_config.yaml: the composed config, and what was derived from it (which
        # is derived again, not read back), so that config=<run>/train_config.yaml reruns that run
        data = {k: v for k, v in data.items() if k != "derived"}
    if not isinstance(data, dict) or set(data) - {"config"} - top_level_keys():
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
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
    own = Path(name).expanduser()  # a file of the user's own, anywhere (VISSL's configs are looked up first)
    if what == "config" and own.suffix in (".yaml", ".yml") and own.is_file():
        return own.resolve()
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
    log_notes([])  # a config that fails to compose leaves no notes of an earlier one for the next run
    defaults = load_yaml(defaults_path())
    t = Translation(problems=[], notes=[])
    parsed = _parse_arguments(list(overrides), t.problems)

    main_file: Path | None = None
    overlays: list[Path] = []
    dotted: list[tuple[str, Any, str]] = []
    for o in parsed:
        if isinstance(o, tuple):  # a JSON-style value, parsed by _parse_arguments
            dotted.append(o)
            continue
        key = o.key_or_group
        try:
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
        except ConfigError as e:
            t.problems.append(str(e))

    # every source is translated from VISSL's vocabulary and checked, and every problem of every
    # source is collected: one run reports them all (issue 11)
    cfg = OmegaConf.create(defaults)
    for path in ([main_file] if main_file else []) + overlays:
        try:
            data = load_yaml(path)
        except ConfigError as e:
            t.problems.append(str(e))
            continue
        data = translate_source(data, defaults, str(path), t)
        cfg = OmegaConf.merge(cfg, check_source(data, defaults, str(path), t.problems))
    for key, value, line in dotted:
        source = f"the override '{line}'"
        for k, v in translate_override(key, value, defaults, source, t):
            try:
                v = coerce_override(k, v, defaults, source=source)
            except ConfigError as e:
                t.problems.append(str(e))
                continue
            OmegaConf.update(cfg, k, v, merge=isinstance(v, dict))
    raise_problems(t.problems)
    # a user's own folders decide the split paths and the "auto" class counts; their notes are kept
    # with the translation's, so that they reach the run's log.txt once
    log_notes(t.notes + resolve_data(cfg.config))
    check_cross_keys(cfg.config)
    check_environment(cfg.config)
    return cfg


# The spelling of a list/dict value that always works, shown when a value cannot be parsed.
_JSON_HINT = (
    "Write list and mapping values as JSON or YAML flow text and quote the whole argument for the "
    """shell, e.g. 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [768, 128]}]]'."""
)


def _parse_arguments(args: list[str], problems: list[str]) -> list[Any]:
    """Parse each argument with hydra's override grammar; a ``config.KEY=[...]`` or ``{...}`` value
    that the grammar refuses (VISSL documents JSON values, whose quoted mapping keys hydra does
    not accept) is read as YAML, which holds JSON. Problems are collected, one per argument.

    Returns:
        hydra Override objects, and (key, value, argument) tuples for the values read as YAML.
    """
    parser = OverridesParser.create()
    parsed: list[Any] = []
    for arg in args:
        key, eq, text = arg.partition("=")
        json_like = eq and key.startswith("config.") and text.lstrip()[:1] in ("[", "{")
        try:
            parsed.extend(parser.parse_overrides(overrides=[arg]))
            continue
        except HydraException as e:
            if not json_like:
                problems.append(f"Could not parse the argument '{arg}': {e}. {USAGE}")
                continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            problems.append(f"Could not parse the value of '{arg}' ({first}). {_JSON_HINT}")
            continue
        parsed.append((key.strip(), value, arg))
    return parsed
