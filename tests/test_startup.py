"""What a fresh process imports: the command line's --help, --list-configs and config errors come
before torch is imported, and each registry imports its package before its first lookup."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

REGISTRIES = (
    "TRUNKS",
    "HEADS",
    "LOSSES",
    "COLLATORS",
    "TRANSFORMS",
    "DATASETS",
    "OPTIMIZERS",
    "SCHEDULERS",
    "HOOKS",
    "METERS",
)


def _fresh(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_help_list_configs_and_a_misspelled_key_do_not_import_torch():
    proc = _fresh(
        "import sys\n"
        "from vissl_vit.engine.launch import main\n"
        "codes = [main(['--help']), main(['--list-configs']), main(['config=test/quick_vit', 'config.OPTIMIZER.num_epoch=1'])]\n"
        "print(codes, [m for m in ('torch', 'torchvision', 'timm') if m in sys.modules])\n"
    )
    assert proc.stdout.strip().splitlines()[-1] == "[0, 0, 2] []"
    assert "usage: python tools/run_distributed_engines.py" in proc.stdout
    assert "quickstart/vit_fashion_mnist" in proc.stdout  # the listing
    assert "Did you mean config.OPTIMIZER.num_epochs?" in proc.stderr


def test_each_registry_loads_its_package_before_the_first_lookup_and_the_api_imports_on_first_use():
    # names in a fresh process, each registry asked first, against names once everything is imported
    proc = _fresh(
        "import json, sys\n"
        "import vissl_vit.load_run\n"  # a submodule first: the package's load_run stays the function
        "light = 'torch' not in sys.modules\n"
        "from vissl_vit import registry\n"
        f"first = {{n: getattr(registry, n).names() for n in {REGISTRIES!r}}}\n"
        "from vissl_vit import build_model, compose_config, run_train_engine\n"
        "import vissl_vit.engine.extract_engine, vissl_vit.load_run\n"
        f"after = {{n: getattr(registry, n).names() for n in {REGISTRIES!r}}}\n"
        "model = type(build_model(compose_config(['config=test/quick_vit']).config)).__name__\n"
        "try:\n"
        "    vissl_vit.no_such_name\n"
        "except AttributeError as e:\n"
        "    missing = str(e)\n"
        "listed = 'run_train_engine' in dir(vissl_vit) and callable(vissl_vit.load_run)\n"
        "print(json.dumps([first, after, light, model, listed, missing]))\n"
    )
    first, after, light, model, listed, missing = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first == after
    assert all(first[n] for n in REGISTRIES)
    assert {"vision_transformer", "convit"} <= set(first["TRUNKS"]) and "moco_loss" in first["LOSSES"]
    assert light and model == "TrunkHeadModel" and listed  # import vissl_vit alone imports no torch
    assert missing == "module 'vissl_vit' has no attribute 'no_such_name'"
