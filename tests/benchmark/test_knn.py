"""Weighted kNN against a hand count and a plain loop; the command-line tool on a quick run."""

from __future__ import annotations

import json
import math

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
