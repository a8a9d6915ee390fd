"""VISSL's key vocabulary: what vissl_vit does with each key of VISSL's defaults.yaml (issue 11).

A key that vissl_vit's defaults.yaml declares is *implemented* and goes to the validator as it is.
Any other key is looked up in the table ``vissl_vocabulary.yaml`` (next to this file): a *no-op*
is dropped with a log line, a *mapped* key moves to its vissl_vit name with a log line, a
*refused* key is a problem "VISSL feature X is not implemented in vissl_vit". A key in neither
is left to the validator, whose error suggests the closest real key.

The translation runs on each source (a config file, one command-line override) before it is
validated and merged, and collects its problems instead of raising, so that one ConfigError
lists every problem of a command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from vissl_vit.config.validate import _is_torch_loss
from vissl_vit.utils.logging import keep_for_run_log

logger = logging.getLogger(__name__)

VOCABULARY_PATH = Path(__file__).resolve().parent / "vissl_vocabulary.yaml"
KINDS = ("noop", "mapped", "refused")


@dataclass(frozen=True)
class Rule:
    """One entry of the vocabulary table (see the header of vissl_vocabulary.yaml)."""

    key: tuple[str, ...]
    kind: str
    why: str = ""
    feature: str = ""
    values: tuple[Any, ...] | None = None
    to: str = ""
    convert: str = ""

    def matches(self, path: tuple[str, ...]) -> bool:
        """Whether ``path`` is this rule's key or lies in its section (``*`` is one segment)."""
        if len(path) < len(self.key):
            return False
        return all(p == "*" or p == s for p, s in zip(self.key, path))

    def allows(self, value: Any) -> bool:
        """Whether ``value`` is one of the no-op values (type-strict: False is not 0)."""
        if self.values is None:
            return True
        return any(_same(value, v) for v in self.values)


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, numbers) and isinstance(b, numbers):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@lru_cache(maxsize=1)
def load_vocabulary(path: Path = VOCABULARY_PATH) -> tuple[Rule, ...]:
    """Read and check the vocabulary table.

    Args:
        path: the table (vissl_vocabulary.yaml next to this module).
    """
    with open(path, encoding="utf-8") as f:
        entries = yaml.safe_load(f)
    rules = []
    for i, e in enumerate(entries):
        kind = e.get("kind")
        if kind not in KINDS or not isinstance(e.get("key"), str):
            raise ValueError(f"{path} entry {i}: needs a key and a kind in {KINDS}; got {e}.")
        if kind == "mapped" and not e.get("to"):
            raise ValueError(f"{path} entry {i} ({e['key']}): a mapped key needs `to`.")
        if (kind == "refused" or e.get("values") is not None) and not e.get("feature"):
            raise ValueError(f"{path} entry {i} ({e['key']}): a refused value needs `feature`.")
        values = e.get("values")
        rules.append(
            Rule(
                key=tuple(e["key"].split(".")),
                kind=kind,
                why=e.get("why", ""),
                feature=e.get("feature", ""),
                values=tuple(values) if values is not None else None,
                to=e.get("to", ""),
                convert=e.get("convert", ""),
            )
        )
    return tuple(rules)


def find_rule(path: tuple[str, ...] | str) -> Rule | None:
    """The first rule whose key or section holds ``path`` (a dotted key or its segments)."""
    path = tuple(path.split(".")) if isinstance(path, str) else path
    return next((r for r in load_vocabulary() if r.matches(path)), None)


def _has_deeper_rule(path: tuple[str, ...]) -> bool:
    n = len(path)
    return any(len(r.key) > n and all(p in ("*", s) for p, s in zip(r.key, path)) for r in load_vocabulary())


def top_level_keys() -> set[str]:
    """The keys a config file may hold beside ``config`` (VISSL's top-level keys)."""
    return {r.key[0] for r in load_vocabulary() if r.key[0] != "config"}


def declared(defaults: dict[str, Any], path: tuple[str, ...]) -> bool:
    """Whether vissl_vit's defaults.yaml accepts ``path``: declared there, or inside a free-form
    mapping (default ``{}`` or null), or a ``LOSS.<torch.nn loss>`` section. A path that goes
    below a declared leaf counts as declared: the validator then reports the wrong type."""
    node: Any = defaults
    for depth, name in enumerate(path):
        if not isinstance(node, dict) or (not node and depth > 1):
            return True
        if name not in node:
            return path[:2] == ("config", "LOSS") and depth == 2 and _is_torch_loss(name)
        node = node[name]
    return True


@dataclass
class Translation:
    """What the vocabulary did to one source: problems to report, lines to log."""

    problems: list[str]
    notes: list[str]


def _refusal(rule: Rule, key: str, value: Any, source: str) -> str:
    feature = rule.feature or key
    shown = f"{key}={value!r}" if rule.values is not None else key
    return f"VISSL feature {feature} is not implemented in vissl_vit ({shown} in {source})."


def _set(out: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = out
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value


def _get(data: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    node: Any = data
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return False, None
        node = node[name]
    return True, node


def _apply(rule: Rule, path: tuple[str, ...], value: Any, out: dict, source: str, t: Translation) -> None:
    key = ".".join(path)
    if rule.kind == "refused":
        t.problems.append(_refusal(rule, key, value, source))
    elif rule.kind == "noop":
        if not rule.allows(value):
            t.problems.append(_refusal(rule, key, value, source))
            return
        why = f" ({rule.why})" if rule.why else ""
        t.notes.append(f"{key} in {source} has no effect in vissl_vit{why}.")
    else:
        target = tuple(rule.to.split("."))
        if rule.convert == "list" and not isinstance(value, list):
            value = [value]
        elif rule.convert == "list":
            _set(out, path, value)  # already vissl_vit's form
            return
        _set(out, target, value)
        t.notes.append(f"{key} in {source} is vissl_vit's {rule.to}: set to {value!r}.")


def _walk(node: dict, path: tuple[str, ...], defaults: dict, out: dict, source: str, t: Translation) -> None:
    for name, value in node.items():
        here = path + (str(name),)
        rule = find_rule(here)
        if declared(defaults, here):
            if rule is not None and rule.kind == "mapped" and rule.convert:
                _apply(rule, here, value, out, source, t)  # VISSL's spelling of a vissl_vit key
            elif isinstance(value, dict) and value and _is_section(defaults, here):
                _walk(value, here, defaults, out, source, t)
            else:
                _set(out, here, value)
        elif isinstance(value, dict) and _has_deeper_rule(here):
            _walk(value, here, defaults, out, source, t)  # a section whose keys have rules of their own
        elif rule is not None:
            _apply(rule, here, value, out, source, t)
        else:
            _set(out, here, value)  # unknown: the validator names the closest real key


def _is_section(defaults: dict, path: tuple[str, ...]) -> bool:
    found, node = _get(defaults, path)
    return found and isinstance(node, dict) and bool(node)


def translate_source(data: dict[str, Any], defaults: dict[str, Any], source: str, t: Translation) -> dict[str, Any]:
    """Return ``data`` (a config file's contents) in vissl_vit's vocabulary.

    Args:
        data: the file's top-level mapping (``config`` and any VISSL top-level key).
        defaults: vissl_vit's defaults.yaml.
        source: the file, for messages.
        t: collects the problems and the log lines.
    """
    for rule in load_vocabulary():
        target = tuple(rule.to.split("."))
        if rule.kind == "mapped" and target != rule.key and _get(data, rule.key)[0] and _get(data, target)[0]:
            key = ".".join(rule.key)
            t.problems.append(f"{key} (VISSL's name for {rule.to}) and {rule.to} are both set in {source}; keep one.")
    out: dict[str, Any] = {}
    _walk(data, (), defaults, out, source, t)
    return out


def translate_override(
    key: str, value: Any, defaults: dict[str, Any], source: str, t: Translation
) -> list[tuple[str, Any]]:
    """Return the (key, value) overrides that ``key=value`` stands for in vissl_vit's vocabulary
    (none for a no-op or a refused key, whose problem goes to ``t``)."""
    nested: dict[str, Any] = {}
    _set(nested, tuple(key.split(".")), value)
    out = translate_source(nested, defaults, source, t)
    return list(_leaves_to_overrides(out, (), defaults))


def _leaves_to_overrides(node: dict, path: tuple[str, ...], defaults: dict) -> list[tuple[str, Any]]:
    pairs = []
    for name, value in node.items():
        here = path + (name,)
        if isinstance(value, dict) and value and _is_section(defaults, here):
            pairs.extend(_leaves_to_overrides(value, here, defaults))
        else:  # a leaf, a free-form mapping or an unknown key: set as one override
            pairs.append((".".join(here), value))
    return pairs


def log_notes(notes: list[str]) -> None:
    """One log line per translated key, each once per run: on the console now, and in the run's
    log.txt once the engine opens it (the run folder is not known while the config is composed).
    Replaces the lines an earlier compose kept; an empty list only forgets them."""
    lines = list(dict.fromkeys(notes))
    for line in lines:
        logger.warning("%s", line)
    keep_for_run_log(logger.name, lines, logging.WARNING)


def classify(defaults: dict[str, Any], key: str) -> str:
    """What vissl_vit does with a VISSL key: implemented, noop, mapped, refused (or unknown).

    Args:
        defaults: vissl_vit's defaults.yaml.
        key: a dotted key from the top of a VISSL config (``config.X.Y`` or ``engine_name``).
    """
    path = tuple(key.split("."))
    rule = find_rule(path)
    if declared(defaults, path):
        return "mapped" if rule is not None and rule.kind == "mapped" and rule.convert else "implemented"
    return rule.kind if rule is not None else "unknown"
