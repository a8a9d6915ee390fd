"""Where defaults.yaml and configs/ are, in a source checkout or an installed package.

In a checkout (``pip install -e .``) they sit at the repository root, next to the package. A
plain ``pip install .`` copies them into ``vissl_vit/_resources/`` (see setup.py's build_py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def resource_root() -> Path:
    """The folder holding defaults.yaml and configs/."""
    for root in (_PACKAGE_DIR.parent, _PACKAGE_DIR / "_resources"):
        if (root / "defaults.yaml").is_file() and (root / "configs" / "config").is_dir():
            return root
    raise FileNotFoundError(
        f"defaults.yaml and configs/config/ were found neither next to the package "
        f"({_PACKAGE_DIR.parent}) nor in {_PACKAGE_DIR / '_resources'}: the installation is broken; "
        f"reinstall with `pip install .` from a checkout."
    )


def defaults_path() -> Path:
    """Path of defaults.yaml."""
    return resource_root() / "defaults.yaml"


def configs_dir() -> Path:
    """The folder that ``config=<path>`` is relative to (configs/config)."""
    return resource_root() / "configs" / "config"


def list_configs() -> list[str]:
    """Every config path that ``config=`` accepts (relative, without .yaml), sorted."""
    root = configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
