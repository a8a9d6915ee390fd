"""Linear evaluation (frozen trunk in eval mode, a head per feature, a meter per head) and the
extract_features engine (shards per rank merged in data set order)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine.checkpoint import find_latest, load_checkpoint
from vissl_vit.engine.launch import main as launch_main
from vissl_vit.errors import ConfigError
from vissl_vit.models import build_model
from vissl_vit.models.feature_eval import FeatureEvalModel

LINEAR = ["config=test/quick_vit", "+config/test/overlays=linear_eval"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "run"
    run_train_engine(compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={run}"]))
    return run


def _trunk_state(path) -> dict:
    return load_checkpoint(path)["classy_state_dict"]["base_model"]["model"]["trunk"]


@pytest.mark.parametrize("procs", [1, 2])  # 2: DDP over the heads only, gloo
def test_linear_eval_trains_only_the_heads_and_reports_each(tmp_path, pretrained, procs):
    run = tmp_path / "lin"
    args = [*LINEAR, f"config.CHECKPOINT.DIR={run}", f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}"]
    if procs == 1:
        run_train_engine(compose_config(args))
    else:
        assert launch_main([*args, f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}"]) == 0
    before, after = _trunk_state(find_latest(str(pretrained))), _trunk_state(find_latest(str(run)))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # the trunk is frozen, bit for bit

    def heads(name):
        return load_checkpoint(str(run / name))["classy_state_dict"]["base_model"]["model"]["heads"]

    first, last = heads("model_phase0.torch"), heads("model_phase1.torch")
    assert "0.channel_bn.weight" in last and any(k.startswith("1.") for k in last)
    for i in ("0", "1"):  # both probes trained
        assert any(not torch.equal(first[k], last[k]) for k in last if k.startswith(f"{i}.") and "weight" in k)
    metrics = [json.loads(line) for line in open(run / "metrics.json")]
    test = [m for m in metrics if "test_accuracy_list_meter" in m][-1]["test_accuracy_list_meter"]
    assert set(test["top_1"]) == {"lastCLS", "concatCLS2"}  # a meter per head, named after its feature


def test_frozen_trunk_stays_in_eval_mode(pretrained):
    cfg = compose_config([*LINEAR, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}"]).config
    assert (
        cfg.MODEL.TRUNK.VISION_TRANSFORMERS.DROPOUT_RATE > 0 and cfg.MODEL.TRUNK.VISION_TRANSFORMERS.DROP_PATH_RATE > 0
    )
    model = build_model(cfg)
    assert isinstance(model, FeatureEvalModel)
    model.train()
    assert not model.trunk.training and model.heads.training
    assert all(not p.requires_grad for p in model.trunk.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    x = torch.randn(4, 3, 16, 16)
    f1, f2 = model.features(x), model.features(x)
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))  # no dropout, no drop-path
    assert [f.shape[1] for f in f1] == [32, 64]
    out = model(x)
    assert len(out) == 2 and all(o.shape == (4, 4) for o in out)


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "ALLOW_RANDOM_INIT"),
        (
            ["config.MODEL.WEIGHTS_INIT.PARAMS_FILE=x", "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,4]}]]"],
            "one head per feature",
        ),
        (
            [
                "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=x",
                "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,4]}],[mlp,{dims:[32,4]}]]",
            ],
            r"PARAMS\[1\] 'mlp' takes inputs of width 32, but the trunk feature 'concatCLS2' has width 64",
        ),
        (
            [
                "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=x",
                "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[[lastCLS],[concatCLS9]]",
            ],
            "asks for blocks the trunk does not have",
        ),
        (
            [
                "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=x",
                "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=False",
                "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD=True",
            ],
            "leaves nothing to train",
        ),
    ],
)
def test_bad_linear_eval_configs_are_refused(extra, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([*LINEAR, *extra])


def _extract(tmp_path, name, procs, pretrained):
    out = tmp_path / name
    args = [
        "config=test/quick_vit",
        "+config/test/overlays=knn",
        "config.ENGINE_NAME=extract_features",
        "config.DATA.SYNTHETIC.NUM_IMAGES=63",  # 2 processes: one pads its share with a repeat
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={procs}",
        "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[[lastCLS],[concatCLS2]]",
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
        f"config.CHECKPOINT.DIR={out}",
    ]
    assert launch_main(args) == 0
    return out / "features"


def test_extraction_on_two_processes_equals_one(tmp_path, pretrained):
    one, two = _extract(tmp_path, "one", 1, pretrained), _extract(tmp_path, "two", 2, pretrained)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not [p for p in two.iterdir() if p.name.startswith("rank")]  # shards merged and removed
    for split in ("train", "test"):
        for feat, width in (("lastCLS", 32), ("concatCLS2", 64)):
            f1, f2 = (np.load(d / f"{split}_{feat}_features.npy") for d in (one, two))
            assert f1.shape == (63, width) and np.allclose(f1, f2, atol=1e-6)
            for kind in ("inds", "targets"):
                a, b = (np.load(d / f"{split}_{feat}_{kind}.npy") for d in (one, two))
                assert np.array_equal(a, b)
            assert np.array_equal(np.load(one / f"{split}_{feat}_inds.npy"), np.arange(63))


def test_frozen_trunk_and_head_test_only_reproduces_the_runs_test_metrics(tmp_path, pretrained):
    run = tmp_path / "testonly"
    run_train_engine(
        compose_config(
            [
                "config=test/quick_vit",
                f"config.CHECKPOINT.DIR={run}",
                f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",  # SCOPE auto: the whole model
                "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=True",
                "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD=True",
                "config.TEST_ONLY=True",
            ]
        )
    )

    def last_test(folder):
        lines = [json.loads(line) for line in open(folder / "metrics.json")]
        return [m for m in lines if "test_loss" in m][-1]

    ours, theirs = last_test(run), last_test(pretrained)
    assert ours["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-6)
    assert ours["test_accuracy_list_meter"] == theirs["test_accuracy_list_meter"]


def test_merge_orders_by_index_drops_padding_and_works_in_chunks(tmp_path):
    from vissl_vit.engine.extract_engine import _merge, _shard, feature_file

    n, world, dim = 10, 3, 4
    feats = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    order = list(range(n)) + [0, 1]  # padded to 12 = 3 x 4, as the sampler does
    for r in range(world):
        mine = np.array(order[r::world])
        np.save(_shard(str(tmp_path), r, "TRAIN", "f", "features"), feats[mine])
        np.save(_shard(str(tmp_path), r, "TRAIN", "f", "inds"), mine)
        np.save(_shard(str(tmp_path), r, "TRAIN", "f", "targets"), mine * 10)
    assert _merge(str(tmp_path), "TRAIN", "f", world, chunk=3) == n
    assert np.array_equal(np.load(feature_file(str(tmp_path), "TRAIN", "f", "features")), feats)
    assert np.array_equal(np.load(feature_file(str(tmp_path), "TRAIN", "f", "inds")), np.arange(n))
    assert np.array_equal(np.load(feature_file(str(tmp_path), "TRAIN", "f", "targets")), np.arange(n) * 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train_f_features.npy",
        "train_f_inds.npy",
        "train_f_targets.npy",
    ]


def test_both_freeze_flags_compose_as_in_vissl(pretrained):
    # VISSL's train_task.py build_model: "if FREEZE_TRUNK_ONLY: freeze_trunk() elif
    # FREEZE_TRUNK_AND_HEAD: freeze_head_and_trunk()": with both set, the heads still train
    both = [*LINEAR, f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}"]
    cfg = compose_config([*both, "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD=True"]).config
    assert cfg.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY
    model = build_model(cfg)
    model.train()
    assert not model.freeze_heads and model.heads.training and not model.trunk.training
    assert all(p.requires_grad for p in model.heads.parameters())
    assert all(not p.requires_grad for p in model.trunk.parameters())


def test_a_head_chain_on_one_feature_runs_as_one_chain(pretrained):
    # VISSL's base_ssl_model.py heads_forward: #heads == #features -> a head per feature; one
    # feature and several heads -> the heads in sequence (a kNN overlay over a projection head)
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "+config/test/overlays=knn",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
            "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=True",
            "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=True",
            "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD=True",
            "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD=True",
            "config.MODEL.HEAD.PARAMS=[[mlp,{dims:[32,16]}],[mlp,{dims:[16,8]}]]",
        ]
    ).config
    model = build_model(cfg).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        expected = model.heads[1](model.heads[0](model.trunk(x)[0]))
    assert len(out) == 1 and out[0].shape == (2, 8)
    torch.testing.assert_close(out[0], expected)


def test_extraction_shows_a_bar_per_split_on_a_terminal_and_writes_env_json(tmp_path, pretrained, monkeypatch):
    import io
    import json
    import sys

    fake = io.StringIO()
    fake.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", fake)
    features = _extract(tmp_path, "bar", 1, pretrained)
    bars = fake.getvalue()
    assert "extract TRAIN" in bars and "extract TEST" in bars and "batch" in bars
    env = json.loads((features.parent / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == __import__("torch").__version__
