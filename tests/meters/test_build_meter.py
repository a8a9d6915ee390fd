"""Meters built from the config: linear evaluation infers one meter per probed feature."""

from __future__ import annotations

import json

from vissl_vit import build_meter, compose_config, run_train_engine

# a linear-eval overlay over a base config with one meter, as VISSL's benchmark overlays are
LINEAR_OVER_ONE_METER = [
    "config=test/quick_vit",
    "+config/test/overlays=linear_eval",
    "config.METERS.accuracy_list_meter.num_meters=1",
    "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True",
]


def test_num_meters_inferred_from_the_feature_map():
    # VISSL: vissl/utils/hydra_config.py, infer_and_assert_hydra_config sets
    # METERS.<list meter>.num_meters = len(LINEAR_EVAL_FEAT_POOL_OPS_MAP) and meter_names = its names
    meter = build_meter(compose_config(LINEAR_OVER_ONE_METER).config)
    assert meter.num_meters == 2 and meter.names == ["lastCLS", "concatCLS2"]
    # not a feature-eval model: the configured count stays
    meter = build_meter(compose_config(["config=test/quick_vit"]).config)
    assert meter.num_meters == 1


def test_linear_eval_over_a_one_meter_base_trains_and_reports_each_head(tmp_path):
    run = tmp_path / "lin"
    run_train_engine(
        compose_config([*LINEAR_OVER_ONE_METER, "config.OPTIMIZER.num_epochs=1", f"config.CHECKPOINT.DIR={run}"])
    )
    metrics = [json.loads(line) for line in open(run / "metrics.json")]
    test = [m for m in metrics if "test_accuracy_list_meter" in m][-1]["test_accuracy_list_meter"]
    assert set(test["top_1"]) == {"lastCLS", "concatCLS2"}
