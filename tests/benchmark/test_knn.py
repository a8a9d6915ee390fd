"""Weighted kNN against a hand count and a plain loop; the command-line tool on a quick run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vissl_vit import compose_config, run_train_engine
from vissl_vit.benchmark.knn import knn_classify
from vissl_vit.benchmark.nearest_neighbor import main


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


def test_tool_on_a_quick_run(tmp_path, capsys):
    args = ["config=test/quick_vit", f"config.CHECKPOINT.DIR={tmp_path / 'run'}"]
    assert main(args) == 2 and "No checkpoint" in capsys.readouterr().err
    run_train_engine(compose_config(args))
    assert main(args + ["--k", "5,10"]) == 0
    assert main(args + ["--random-init", "--k", "5"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "run" / "nearest_neighbor.json")]
    assert records[0]["weights"].endswith("model_phase1.torch") and set(records[0]["results"]) == {"5", "10"}
    assert records[1]["weights"] == "random-init" and records[0]["test_images"] == 64
    assert main(["config=test/quick_moco", "--random-init"]) == 2 and "needs DATA.TEST" in capsys.readouterr().err
