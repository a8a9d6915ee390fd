"""Weighted kNN against a hand count and a plain loop; the command-line tool on a quick run."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from vissl_vit import compose_config, run_train_engine
from vissl_vit.benchmark.knn import knn_classify, knn_search, weighted_knn_accuracy
from vissl_vit.benchmark.nearest_neighbor import main
from vissl_vit.engine.launch import main as launch_main


def test_votes_by_hand():
    # query (1, 0); bank: two class-0 points at 60 degrees, one class-1 point at 0 degrees
    bank = torch.tensor([[0.5, math.sqrt(3) / 2], [0.5, -math.sqrt(3) / 2], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    q, t = torch.tensor([[1.0, 0.0]]), 0.5
    # T = 0.5: class 0 gets 2 e^{0.5/0.5} = 5.44, class 1 gets e^{1/0.5} = 7.39: class 1 wins
    assert knn_classify(bank, labels, q, torch.tensor([1]), k=3, temperature=t)["top_1"] == 100.0
    # with a higher temperature the two class-0 votes outweigh it: 2 e^{0.5/2} = 2.57 > e^{1/2} = 1.65
    assert knn_classify(bank, labels, q, torch.tensor([0]), k=3, temperature=2.0)["top_1"] == 100.0
    # k=1: only the nearest votes
    assert knn_classify(bank, labels, q, torch.tensor([1]), k=1, temperature=2.0)["top_1"] == 100.0


def _reference(bank, labels, queries, k, t, num_classes):
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    preds = []
    for q in queries:
        sims = [(float(q @ b), int(y)) for b, y in zip(bank, labels)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, y in sims[:k]:
            votes[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_a_plain_loop(k):
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(200, 8, generator=g), torch.randint(0, 5, (200,), generator=g)
    queries, targets = torch.randn(50, 8, generator=g), torch.randint(0, 5, (50,), generator=g)
    expected = (_reference(bank, labels, queries, k, 0.07, 5) == targets).float().mean().item() * 100
    got = knn_classify(bank, labels, queries, targets, k=k, temperature=0.07, chunk=16)
    assert got["top_1"] == pytest.approx(expected)
    assert got["top_5"] == 100.0  # 5 classes


def _clustered(n, d, classes, seed):
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(123))  # shared by both splits
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + 0.8 * torch.randn(n, d, generator=g), labels


@pytest.mark.parametrize("backend,index", [("faiss", "flat"), ("faiss", "ivf"), ("torch", "flat")])
def test_search_backends_equal_the_torch_reference(backend, index):
    pytest.importorskip("faiss")
    bank, bank_labels = _clustered(2000, 16, 10, 0)
    queries, query_labels = _clustered(300, 16, 10, 1)
    ks = [1, 10, 20, 100]
    b, q = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    # ivf visiting every cell is exact too
    sim, idx = knn_search(b, q, max(ks), backend, index, nlist=16, nprobe=16)
    exact_sim, exact_idx = (q @ b.T).topk(max(ks), dim=1)
    assert torch.allclose(sim, exact_sim, atol=1e-5)
    assert (idx == exact_idx).float().mean() > 0.999  # float ties aside, the same neighbours
    got = weighted_knn_accuracy(sim, idx, bank_labels, query_labels, ks, 0.07)
    for k in ks:
        ref = knn_classify(bank, bank_labels, queries, query_labels, k=k, temperature=0.07)
        assert got[str(k)]["top_1"] == pytest.approx(ref["top_1"], abs=1e-9)
        assert got[str(k)]["top_5"] == pytest.approx(ref["top_5"], abs=1e-9)
    assert 50 < got["20"]["top_1"] < 100  # a task that is neither trivial nor hopeless


def test_ivf_with_few_probes_is_approximate_and_missing_neighbours_do_not_vote():
    pytest.importorskip("faiss")
    bank, bank_labels = _clustered(4000, 16, 10, 0)
    queries, query_labels = _clustered(200, 16, 10, 1)
    b, q = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    sim, idx = knn_search(b, q, 200, "faiss", "ivf", nlist=64, nprobe=1)
    exact = weighted_knn_accuracy(*knn_search(b, q, 200, "torch"), bank_labels, query_labels, [200], 0.07)
    approx = weighted_knn_accuracy(sim, idx, bank_labels, query_labels, [200], 0.07)
    assert (idx == -1).any()  # one cell of ~60 points cannot give 200 neighbours
    assert abs(approx["200"]["top_1"] - exact["200"]["top_1"]) < 15


def test_tool_on_a_quick_run(tmp_path, capsys):
    pytest.importorskip("faiss")
    run = tmp_path / "run"
    pre = ["config=test/quick_vit", f"config.CHECKPOINT.DIR={tmp_path / 'pre'}"]
    args = ["config=test/quick_vit", "+config/test/overlays=knn", f"config.CHECKPOINT.DIR={run}"]
    assert main(args) == 2 and "ALLOW_RANDOM_INIT" in capsys.readouterr().err  # no weights: refused
    run_train_engine(compose_config(pre))
    assert main(args + ["--weights", str(tmp_path / "pre"), "--k", "5,10"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(args + ["--random-init", "--k", "5", "--feature", "concatCLS2"]) == 0
    records = [json.loads(line) for line in open(run / "nearest_neighbor.json")]
    assert records[0]["weights"] == str(tmp_path / "pre") and set(records[0]["results"]) == {"5", "10"}
    assert records[1]["weights"] == "random-init" and records[1]["feature"] == "concatCLS2"
    assert records[0]["test_images"] == 64 and records[0]["train_images"] == 64
    # a pretraining config's augmented views are refused, not silently averaged
    moco = [
        "config=test/quick_moco",
        f"config.CHECKPOINT.DIR={tmp_path / 'moco'}",
        "config.ENGINE_NAME=extract_features",
        "config.EXTRACT_FEATURES.SPLITS=[TRAIN]",
        "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True",
    ]
    assert launch_main(moco) == 2 and "one view per image" in capsys.readouterr().err


def _nn_cfg(tmp_path, *extra):
    return compose_config(
        [
            "config=test/quick_vit",
            "+config/test/overlays=knn",
            "config.NEAREST_NEIGHBOR.BACKEND=torch",
            "config.NEAREST_NEIGHBOR.TOPK=[1]",
            "config.MODEL.WEIGHTS_INIT.ALLOW_RANDOM_INIT=True",
            f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
            *extra,
        ]
    ).config


@pytest.mark.parametrize("l2", [True, False])
def test_l2_norm_feats_decides_cosine_or_inner_product(tmp_path, l2):
    # VISSL's knn_utils.run_knn_at_layer: features are normalised only with L2_NORM_FEATS, and the
    # neighbours are the largest torch.mm(test, train.T). Query (1, 0.1): the class-1 bank point
    # (1, 0.1) has cosine 1 but inner product 1.01; the class-0 point (10, 0) has inner product 10.
    from vissl_vit.engine.extract_engine import feature_file, nearest_neighbor

    np_ = pytest.importorskip("numpy")
    arrays = {
        ("TRAIN", "features"): np_.array([[10.0, 0.0], [1.0, 0.1]], np_.float32),
        ("TRAIN", "targets"): np_.array([0, 1]),
        ("TEST", "features"): np_.array([[1.0, 0.1]], np_.float32),
        ("TEST", "targets"): np_.array([1]),
    }
    for (split, kind), a in arrays.items():
        np_.save(feature_file(str(tmp_path), split, "f", kind), a)
    cfg = _nn_cfg(tmp_path, f"config.NEAREST_NEIGHBOR.L2_NORM_FEATS={l2}")
    record = nearest_neighbor(cfg, str(tmp_path), "f")
    assert record["results"]["1"]["top_1"] == (100.0 if l2 else 0.0)
    assert record["l2_norm_feats"] is l2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("pre") / "run"
    run_train_engine(compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={run}"]))
    return run


def _extracted(cfg, split="train"):
    import numpy as np

    from vissl_vit.engine.extract_engine import run_nearest_neighbor_engine

    record = run_nearest_neighbor_engine(cfg)
    folder = os.path.join(cfg.config.CHECKPOINT.DIR, "features")
    return record, torch.from_numpy(np.load(os.path.join(folder, f"{split}_{record['feature']}_features.npy")))


# VISSL's kNN base configs (configs/config/benchmark/nearest_neighbor/eval_resnet_8gpu_in1k_kNN.yaml)
VISSL_KNN_BASE = [
    "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=True",
    "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_AND_HEAD=True",
    "config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_TRUNK_AND_HEAD=True",
]
# and a trunk overlay over it (its models/dino/vit_b16.yaml)
VISSL_TRUNK_OVERLAY = [
    "config.MODEL.FEATURE_EVAL_SETTINGS.FREEZE_TRUNK_ONLY=True",
    "config.MODEL.FEATURE_EVAL_SETTINGS.EXTRACT_TRUNK_FEATURES_ONLY=True",
    "config.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP=[[lastCLS,[Identity,[]]]]",
    "config.MODEL.HEAD.PARAMS=[]",
]


def test_vissl_knn_base_runs_on_the_loaded_heads_and_its_trunk_overlay_on_the_trunk(tmp_path, pretrained):
    from vissl_vit.engine.checkpoint import find_latest, load_checkpoint
    from vissl_vit.models.heads.vision_transformer_head import VisionTransformerHead

    common = [
        "config=test/quick_vit",
        "+config/test/overlays=knn",
        "config.NEAREST_NEIGHBOR.BACKEND=torch",
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={pretrained}",
    ]
    # the base alone: VISSL's extraction has no trunk feature names, so kNN runs on "heads", the
    # pretrained head's output (should_init_head_weights: EVAL_TRUNK_AND_HEAD loads the heads)
    base = compose_config([*common, *VISSL_KNN_BASE, f"config.CHECKPOINT.DIR={tmp_path / 'base'}"])
    record, heads_out = _extracted(base)
    assert record["feature"] == "heads" and heads_out.shape == (64, 4)
    # base + trunk overlay: both FREEZE_TRUNK_* set, composes as in VISSL (FREEZE_TRUNK_ONLY wins)
    # and kNN runs on the trunk's lastCLS
    pair = compose_config(
        [*common, *VISSL_KNN_BASE, *VISSL_TRUNK_OVERLAY, f"config.CHECKPOINT.DIR={tmp_path / 'pair'}"]
    )
    record, cls = _extracted(pair)
    assert record["feature"] == "lastCLS" and cls.shape == (64, 32)
    # the base's features are the pretrained head applied to those trunk features
    heads = load_checkpoint(find_latest(str(pretrained)))["classy_state_dict"]["base_model"]["model"]["heads"]
    head = VisionTransformerHead(in_plane=32, num_classes=4).eval()
    head.load_state_dict({k[len("0.") :]: v for k, v in heads.items()})
    with torch.no_grad():
        torch.testing.assert_close(heads_out, head(cls), atol=1e-5, rtol=1e-5)


def test_votes_of_raw_inner_products_do_not_overflow():
    # unnormalised features (L2_NORM_FEATS False): exp(1000 / 0.07) is inf in float64, which would
    # tie every class. Votes: class 0 e^{1000/T}, class 1 2 e^{999.99/T} = 1.73 e^{1000/T}: class 1.
    sim = torch.tensor([[1000.0, 999.99, 999.99]])
    idx = torch.tensor([[0, 1, 2]])
    got = weighted_knn_accuracy(sim, idx, torch.tensor([0, 1, 1]), torch.tensor([1]), [3], 0.07)
    assert got["3"]["top_1"] == 100.0
