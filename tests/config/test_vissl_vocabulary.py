"""VISSL's key vocabulary (issue 11): every key of VISSL's defaults.yaml is implemented, a no-op,
mapped or refused; VISSL-format config files compose, build and train unchanged."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import vissl_vit.config.compose as compose
from tests.conftest import read_losses
from vissl_vit import build_loss, build_model, build_optimizer
from vissl_vit.config.paths import defaults_path
from vissl_vit.config.vissl_compat import (
    Translation,
    classify,
    declared,
    find_rule,
    load_vocabulary,
    translate_source,
)
from vissl_vit.errors import ConfigError
from vissl_vit.utils.logging import keep_for_run_log, setup_logging

HERE = Path(__file__).resolve().parent
# VISSL's defaults.yaml flattened (facebookresearch/vissl, vissl/config/defaults.yaml)
VISSL_KEYS: dict = yaml.safe_load((HERE / "data" / "vissl_default_keys.yaml").read_text())
REFERENCE = HERE.parents[1].parent / "shared" / "reference" / "vissl_defaults.yaml"
VISSL_CONFIGS = HERE / "vissl_configs"
DEFAULTS = yaml.safe_load(defaults_path().read_text())


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_leaves(v, key) if isinstance(v, dict) and v else {key: v})
    return out


# ---- the table ----


def test_every_vissl_key_is_classified():
    unknown = [k for k in VISSL_KEYS if classify(DEFAULTS, k) == "unknown"]
    assert not unknown, f"VISSL keys missing from vissl_vit/config/vissl_vocabulary.yaml: {unknown}"
    assert len(VISSL_KEYS) == 604


@pytest.mark.skipif(not REFERENCE.is_file(), reason="VISSL's defaults.yaml is not next to the checkout")
def test_key_list_is_vissls_defaults_yaml():
    assert _leaves(yaml.safe_load(REFERENCE.read_text())) == VISSL_KEYS


def test_vissls_default_values_are_never_refused():
    """A VISSL file that writes a key at VISSL's default value means VISSL's default behaviour."""
    data: dict = {}
    for key, value in VISSL_KEYS.items():
        if classify(DEFAULTS, key) in ("noop", "mapped") and key != "defaults":
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    t = Translation([], [])
    translate_source(data, DEFAULTS, "vissl_defaults.yaml", t)
    assert t.problems == []


def test_table_entries_are_live_and_point_at_real_keys():
    reached = {id(find_rule(k)) for k in VISSL_KEYS}  # the rule each key of VISSL's defaults.yaml finds
    for rule in load_vocabulary():
        name = ".".join(rule.key)
        if rule.kind == "mapped":  # the target is a key of vissl_vit's defaults.yaml
            assert rule.to in _leaves(DEFAULTS), rule
        if not rule.convert and "*" not in rule.key:  # a key vissl_vit declares is implemented
            assert not declared(DEFAULTS, rule.key), f"{name} is in defaults.yaml now: drop its table entry"
        assert id(rule) in reached, f"no key of VISSL's defaults.yaml reaches the table entry {name}"


# ---- each kind, through compose_config ----


@pytest.fixture
def vissl_file(tmp_path, monkeypatch):
    """Write a config file under a temporary configs/config and return its config= name."""
    root = tmp_path / "config"
    root.mkdir()
    monkeypatch.setattr(compose, "configs_dir", lambda: root)

    def write(text: str, name: str = "x") -> str:
        (root / f"{name}.yaml").write_text("# @package _global_\n" + text)
        return f"config={name}"

    return write


@pytest.fixture
def notes():
    """The vocabulary's log lines (its logger, before the engine's logging is set up)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("vissl_vit.config.vissl_compat")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


QUICK = ["config.MACHINE.DEVICE=cpu"]


@pytest.fixture(autouse=True)
def _forget_kept_notes():
    """Each compose here keeps its notes for the next run's log.txt: none outlives its test."""
    yield
    keep_for_run_log("", [])


def test_noop_keys_are_accepted_and_logged_once(vissl_file, notes):
    name = vissl_file(
        "config:\n  MULTI_PROCESSING_METHOD: forkserver\n  TRAINER:\n    TRAIN_STEP_NAME: standard_train_step\n"
        "  HOOKS:\n    PERF_STATS:\n      MONITOR_PERF_STATS: True\n    TENSORBOARD_SETUP:\n"
        "      EXPERIMENT_LOG_DIR:\n      FLUSH_EVERY_N_MIN: 20\n  DISTRIBUTED:\n    NCCL_DEBUG: True\n"
        "  DATA:\n    TRAIN:\n      ENABLE_QUEUE_DATASET: True\n      DATA_SOURCES: [synthetic]\n"
        "  MODEL:\n    TRUNK:\n      RESNETS:\n        DEPTH: 50\n"
    )
    cfg = compose.compose_config([name, *QUICK, "config.TEST_MODEL=False"]).config
    assert "MULTI_PROCESSING_METHOD" not in cfg and "TRAINER" not in cfg
    for key in (
        "MULTI_PROCESSING_METHOD",
        "TRAINER.TRAIN_STEP_NAME",
        "HOOKS.PERF_STATS",
        "TENSORBOARD_SETUP.EXPERIMENT_LOG_DIR",
        "FLUSH_EVERY_N_MIN",
        "DISTRIBUTED.NCCL_DEBUG",
        "TRAIN.ENABLE_QUEUE_DATASET",
        "TRUNK.RESNETS",
    ):
        lines = [n for n in notes if f"{key} in " in n]
        assert len(lines) == 1 and "has no effect in vissl_vit" in lines[0], (key, notes)


def test_mapped_keys_move_to_vissl_vit_names(vissl_file, notes):
    name = vissl_file(
        "engine_name: nearest_neighbor\nconfig:\n  NEAREST_NEIGHBOR:\n    SIGMA: 0.1\n    TOPK: 200\n"
        "    FEATURES:\n      PATH: /tmp/feats\n  DATA:\n    DDP_BUCKET_CAP_MB: 50\n"
    )
    cfg = compose.compose_config([name, *QUICK, "config.NEAREST_NEIGHBOR.SIGMA=0.05"]).config
    nn = cfg.NEAREST_NEIGHBOR
    assert nn.TEMPERATURE == 0.05 and list(nn.TOPK) == [200] and nn.FEATURES_DIR == "/tmp/feats"
    assert cfg.ENGINE_NAME == "nearest_neighbor" and cfg.DISTRIBUTED.DDP_BUCKET_CAP_MB == 50
    assert any("SIGMA" in n and "TEMPERATURE" in n for n in notes)
    assert any("engine_name" in n and "config.ENGINE_NAME" in n for n in notes)


def test_vissl_name_and_vissl_vit_name_together_are_refused(vissl_file):
    name = vissl_file("config:\n  NEAREST_NEIGHBOR:\n    SIGMA: 0.1\n    TEMPERATURE: 0.2\n")
    with pytest.raises(ConfigError, match=r"SIGMA \(VISSL's name for config.NEAREST_NEIGHBOR.TEMPERATURE\).*keep one"):
        compose.compose_config([name, *QUICK])


def test_refused_vissl_features_name_the_feature_without_a_suggestion(vissl_file):
    name = vissl_file("config:\n  OPTIMIZER:\n    use_larc: True\n")
    with pytest.raises(ConfigError, match=r"VISSL feature LARC .* is not implemented in vissl_vit") as e:
        compose.compose_config([name, *QUICK])
    assert "Did you mean" not in str(e.value) and "x.yaml" in str(e.value)
    with pytest.raises(ConfigError, match=r"VISSL feature the debugging sampler .*not implemented") as e:
        compose.compose_config([name, *QUICK, "config.DATA.TRAIN.USE_DEBUGGING_SAMPLER=True"])
    assert "Did you mean" not in str(e.value)


def test_a_key_unknown_to_both_keeps_the_suggestion():
    with pytest.raises(ConfigError, match=r"Did you mean config\.HOOKS\.PROGRESS_BAR"):
        compose.compose_config(["config=test/quick_vit", "config.HOOKS.PROGRES_BAR.USE_PROGRESS_BAR=False"])


# ---- all problems at once ----


def test_every_problem_of_a_command_line_is_reported_together(vissl_file):
    name = vissl_file(
        "config:\n  OPTIMIZER:\n    weight_dekay: 0.1\n    num_epochs: ten\n    use_larc: True\n"
        "  MODEL:\n    TRUNK:\n      VISION_TRANSFORMERS:\n        HIDEN_DIM: 8\n"
    )
    with pytest.raises(ConfigError) as e:
        compose.compose_config([name, "config.DATA.TRAIN.BATCHSIZE=4", "config.SEED_VALUE=abc", "config.X=[1,"])
    lines = str(e.value).splitlines()
    assert lines[0] == "7 problems in the config:", lines
    problems = "\n".join(lines[1:])
    for pattern in (
        r"weight_dekay in .*x\.yaml.*Did you mean config\.OPTIMIZER\.weight_decay",
        r"num_epochs in .*x\.yaml: expected int",
        r"VISSL feature LARC",
        r"HIDEN_DIM in .*x\.yaml.*Did you mean .*HIDDEN_DIM",
        r"BATCHSIZE in the override 'config\.DATA\.TRAIN\.BATCHSIZE=4'",
        r"SEED_VALUE in the override 'config\.SEED_VALUE=abc': expected int",
        r"'config\.X=\[1,'",
    ):
        assert len([p for p in lines[1:] if re.search(pattern, p)]) == 1, (pattern, problems)


# ---- JSON-style overrides (VISSL's documented spelling) ----


def test_json_style_override_of_head_params():
    over = 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 4], "use_relu": true}]]'
    cfg = compose.compose_config(["config=test/quick_vit", over]).config
    assert cfg.MODEL.HEAD.PARAMS[0][0] == "mlp" and list(cfg.MODEL.HEAD.PARAMS[0][1]["dims"]) == [32, 4]
    assert cfg.MODEL.HEAD.PARAMS[0][1]["use_relu"] is True
    cfg = compose.compose_config(["config=test/quick_vit", "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,4]}]]"]).config
    assert list(cfg.MODEL.HEAD.PARAMS[0][1]["dims"]) == [32, 4]  # hydra's own spelling still works


def test_unparseable_json_override_shows_the_accepted_spelling():
    with pytest.raises(
        ConfigError, match=r"""e\.g\. 'config\.MODEL\.HEAD\.PARAMS=\[\["mlp", \{"dims": \[768, 128\]\}\]\]'"""
    ):
        compose.compose_config(["config=test/quick_vit", 'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 4]]]'])


# ---- VISSL-format config files (tests/config/vissl_configs), with data/device/size overrides ----

V = "config.MODEL.TRUNK.VISION_TRANSFORMERS"
SIZE = [f"{V}.IMAGE_SIZE=32", f"{V}.PATCH_SIZE=8", f"{V}.NUM_HEADS=2", f"{V}.HIDDEN_DIM=32", f"{V}.MLP_DIM=64"]
DEVICE = ["config.MACHINE.DEVICE=cpu", "config.DISTRIBUTED.NUM_NODES=1", "config.DISTRIBUTED.NUM_PROC_PER_NODE=1"]
DATA = [
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.DATA.TRAIN.DATA_SOURCES=[synthetic]",
    "config.DATA.TEST.DATA_SOURCES=[synthetic]",
    "config.DATA.SYNTHETIC.IMAGE_SIZE=32",
    "config.DATA.SYNTHETIC.NUM_IMAGES=16",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4",
    "config.DATA.TEST.BATCHSIZE_PER_REPLICA=4",
    "config.OPTIMIZER.num_epochs=1",
]
LABELS = ["config.DATA.TRAIN.LABEL_SOURCES=[synthetic]", "config.DATA.TEST.LABEL_SOURCES=[synthetic]"]
RANDOM_TRUNK = ["config.MODEL.WEIGHTS_INIT.PARAMS_FILE=''", "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True"]
LIN = "benchmark/linear_image_classification/imagenet1k"
CASES = {
    "supervised": [
        "config=pretrain/vision_transformer/supervised/vit_b16_supervised",
        f"{V}.NUM_LAYERS=2",
        'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 1000]}]]',
        *LABELS,
    ],
    "deit_cutmixup": [
        "config=pretrain/vision_transformer/supervised/deit_b16_cutmixup",
        f"{V}.NUM_LAYERS=2",
        'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 1000]}]]',
        *LABELS,
    ],
    "moco": [
        "config=pretrain/vision_transformer/moco/vit_b16",
        f"{V}.NUM_LAYERS=2",
        'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 64, 128], "use_relu": True}]]',
        "config.LOSS.moco_loss.queue_size=16",
    ],
    "simclr": [
        "config=pretrain/vision_transformer/simclr/vit_b16",
        f"{V}.NUM_LAYERS=2",
        'config.MODEL.HEAD.PARAMS=[["mlp", {"dims": [32, 64, 128], "use_relu": True}]]',
    ],
    "swav": [
        "config=pretrain/vision_transformer/swav/vit_b16_swav",
        f"{V}.NUM_LAYERS=2",
        'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [32, 64, 128], "use_bn": True, "num_clusters": [30]}]]',
    ],
    "linear_eval": [
        f"config={LIN}/eval_resnet_8gpu_transfer_in1k_linear",
        f"+config/{LIN}/models=vit_b16",
        f"{V}.NUM_LAYERS=4",
        'config.MODEL.HEAD.PARAMS=[["eval_mlp", {"in_channels": 128, "dims": [128, 1000]}], '
        '["eval_mlp", {"in_channels": 32, "dims": [32, 1000]}], ["mlp", {"dims": [128, 1000]}], '
        '["mlp", {"dims": [32, 1000]}]]',
        *LABELS,
        *RANDOM_TRUNK,
    ],
    "knn": [
        "config=benchmark/nearest_neighbor/eval_resnet_8gpu_in1k_kNN",
        "+config/benchmark/nearest_neighbor/models/dino=deit_s16",
        "config.ENGINE_NAME=nearest_neighbor",  # what tools/nearest_neighbor_test.py adds
        f"{V}.NUM_LAYERS=2",
        *LABELS,
        *RANDOM_TRUNK,
    ],
}


def _compose(case: str, run_dir: Path, monkeypatch, *extra: str) -> object:
    monkeypatch.setattr(compose, "configs_dir", lambda: VISSL_CONFIGS)
    return compose.compose_config([*CASES[case], *SIZE, *DEVICE, *DATA, f"config.CHECKPOINT.DIR={run_dir}", *extra])


@pytest.mark.parametrize("case", list(CASES))
def test_vissl_config_composes_and_builds(case, tmp_path, monkeypatch):
    cfg = _compose(case, tmp_path / "run", monkeypatch).config
    model = build_model(cfg)
    build_loss(cfg)
    if cfg.ENGINE_NAME == "train":
        build_optimizer(cfg, model)
    if case == "knn":  # VISSL's SIGMA and int TOPK, mapped
        assert cfg.NEAREST_NEIGHBOR.TEMPERATURE == 0.1 and list(cfg.NEAREST_NEIGHBOR.TOPK) == [200]


def _assert_notes_in_log_once(notes: list[str], run_dir: Path) -> None:
    """Each line the vocabulary logged while the config was composed is in the run's log.txt, once."""
    assert notes, "every VISSL file here carries housekeeping keys that vissl_vit notes"
    log = (run_dir / "log.txt").read_text().splitlines()
    for note in dict.fromkeys(notes):
        assert sum(line.endswith(f"vissl_vit.config.vissl_compat: {note}") for line in log) == 1, (note, log[:5])


# 8 synthetic images in batches of 4: 2 iterations in the one epoch. VISSL's linear eval schedule is
# multistep by epoch (milestones [8, 16, 24] of 28 epochs): there, 2 epochs of 4 images with one
# milestone, and the test phase after each, which VISSL's base config runs (TEST_MODEL: True).
TRAIN_CASES = ["supervised", "deit_cutmixup", "moco", "simclr", "swav", "linear_eval"]
SMALL_RUN = ["config.DATA.SYNTHETIC.NUM_IMAGES=8", "config.TEST_MODEL=False", "config.MODEL.AMP_PARAMS.USE_AMP=False"]
RUN_OVERRIDES = {
    "linear_eval": [
        "config.OPTIMIZER.num_epochs=2",
        "config.DATA.SYNTHETIC.NUM_IMAGES=4",
        "config.OPTIMIZER.param_schedulers.lr.values=[0.01,0.001]",
        "config.OPTIMIZER.param_schedulers.lr.milestones=[1]",
        "config.TEST_MODEL=True",
    ],
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_vissl_config_trains_two_iterations(case, tmp_path, monkeypatch, notes):
    from vissl_vit.engine.train_engine import run_train_engine

    assert set(TRAIN_CASES) | {"knn"} == set(CASES)  # every case runs: knn in the test below
    run_dir = tmp_path / "run"
    cfg_root = _compose(case, run_dir, monkeypatch, *SMALL_RUN, *RUN_OVERRIDES.get(case, []))
    torch.manual_seed(0)
    run_train_engine(cfg_root)
    losses = read_losses(run_dir)
    assert max(losses) == 2 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())  # the last is logged
    if case == "linear_eval":
        phases = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines()]
        assert sum("test_loss" in p for p in phases) == 2
    _assert_notes_in_log_once(notes, run_dir)


def test_vissl_knn_config_runs_its_engine(tmp_path, monkeypatch, notes):
    from vissl_vit.engine.extract_engine import run_nearest_neighbor_engine

    run_dir = tmp_path / "run"
    record = run_nearest_neighbor_engine(_compose("knn", run_dir, monkeypatch, "config.DATA.SYNTHETIC.NUM_IMAGES=8"))
    # VISSL's file: SIGMA 0.1, TOPK 200, L2_NORM_FEATS False; the DINO overlay's lastCLS feature
    assert (record["temperature"], list(record["results"]), record["l2_norm_feats"]) == (0.1, ["200"], False)
    assert record["feature"] == "lastCLS" and record["train_images"] == record["test_images"] == 8
    assert json.loads((run_dir / "nearest_neighbor.json").read_text().splitlines()[-1]) == record
    _assert_notes_in_log_once(notes, run_dir)


# ---- the compose-time notes reach log.txt ----

NOTED_FILE = "config:\n  MULTI_PROCESSING_METHOD: forkserver\n  TEST_MODEL: False\n  DATA:\n    TRAIN:\n      DATA_SOURCES: [synthetic]\n"


def test_kept_notes_reach_one_run_log_once(tmp_path, vissl_file, notes):
    name = vissl_file(NOTED_FILE)
    compose.compose_config([name, *QUICK])
    setup_logging(str(tmp_path / "a"), 0)
    setup_logging(str(tmp_path / "a"), 0)  # a second engine in the same run folder: not again
    setup_logging(str(tmp_path / "b"), 0)  # nor in the next run's folder
    _assert_notes_in_log_once(notes, tmp_path / "a")
    assert "MULTI_PROCESSING_METHOD" not in (tmp_path / "b" / "log.txt").read_text()
    # a config that fails to compose leaves nothing of the earlier one for the next run
    compose.compose_config([name, *QUICK])
    with pytest.raises(ConfigError):
        compose.compose_config([name, *QUICK, "config.SEED_VALUE=abc"])
    setup_logging(str(tmp_path / "c"), 0)
    assert "MULTI_PROCESSING_METHOD" not in (tmp_path / "c" / "log.txt").read_text()


@pytest.mark.slow
def test_kept_notes_reach_a_spawned_workers_log(tmp_path, vissl_file):
    # spawned workers start a fresh interpreter and get the config as YAML text (engine/launch.py
    # _spawned_worker): the notes travel in the environment they inherit
    name = vissl_file(NOTED_FILE)
    compose.compose_config([name, *QUICK])
    # the child loads only vissl_vit/utils/logging.py (stdlib only): importing the package (torch) takes seconds
    code = (
        "import importlib.util as u, sys; spec = u.spec_from_file_location('vl', sys.argv[2]); "
        "m = u.module_from_spec(spec); spec.loader.exec_module(m); m.setup_logging(sys.argv[1], 0)"
    )
    logging_py = HERE.parents[1] / "vissl_vit" / "utils" / "logging.py"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "w"), str(logging_py)], check=True)
    assert "MULTI_PROCESSING_METHOD in " in (tmp_path / "w" / "log.txt").read_text()
