"""kNN retrieval pictures (issue 16): on real tiny run folders, the neighbours are the exact
cosine nearest neighbours of the trunk's features (checked against a brute-force search and the
kNN benchmark's 1-NN accuracy), the picture has its layout's size, shows the queries' pixels,
frames them green or red, and changes with the run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vissl_vit import compose_config, run_train_engine
from vissl_vit.benchmark.knn import knn_classify
from vissl_vit.data import build_dataset
from vissl_vit.load_run import load_run
from vissl_vit.visualize.retrieval import CELL_PX, draw_retrieval, main, plot_retrieval, retrieve

GREEN, RED = (44, 160, 44), (214, 39, 40)  # tab:green, tab:red


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real run folders of test/quick_vit (supervised, 2 epochs on 64 synthetic images), other seeds."""
    root = tmp_path_factory.mktemp("retrieval")
    out = []
    for seed in (0, 1):
        folder = root / f"seed{seed}"
        run_train_engine(
            compose_config(["config=test/quick_vit", f"config.CHECKPOINT.DIR={folder}", f"config.SEED_VALUE={seed}"])
        )
        out.append(folder)
    return out


def test_neighbours_are_the_exact_cosine_nearest_by_trunk_features(runs):
    run = runs[0]
    r = retrieve(str(run), queries=4, k=3, max_train=32)
    # the reference: every trunk feature by hand, brute-force cosine similarity over the same bank
    model, transform = load_run(str(run))
    cfg = compose_config([f"config={run / 'train_config.yaml'}"]).config
    train, test = build_dataset(cfg, "TRAIN"), build_dataset(cfg, "TEST")  # quick_vit: eval = ToTensor
    bank_idx = np.linspace(0, 63, 32).round().astype(int)
    query_idx = np.linspace(0, 63, 4).round().astype(int)
    assert r.query_index.tolist() == query_idx.tolist()

    def feats(ds, idx):
        with torch.no_grad():
            return model.trunk(torch.stack([transform(ds.sources[0].load(int(i))) for i in idx]))[0]

    bank, queries = feats(train, bank_idx), feats(test, query_idx)
    sim = F.cosine_similarity(queries[:, None], bank[None], dim=-1)  # [4, 32]
    want_sim, want = sim.sort(dim=1, descending=True)
    assert r.train_index.tolist() == bank_idx[want[:, :3].numpy()].tolist()
    assert torch.allclose(r.similarity, want_sim[:, :3], atol=1e-6)
    assert (r.similarity[:, :-1] >= r.similarity[:, 1:]).all()
    labels = torch.tensor([train.sources[0].label(int(i)) for i in bank_idx])
    assert r.labels.tolist() == labels[want[:, :3]].tolist()
    # the kNN benchmark's classifier at k = 1 gets right exactly the queries framed green
    q_labels = torch.tensor([test.sources[0].label(int(i)) for i in query_idx])
    assert r.query_labels.tolist() == q_labels.tolist()
    top1 = knn_classify(bank, labels, queries, q_labels, k=1)["top_1"]
    assert top1 == pytest.approx(100.0 * (r.labels[:, 0] == r.query_labels).float().mean().item())


def test_picture_size_query_pixels_and_frames(runs, tmp_path):
    r = retrieve(str(runs[0]), queries=3, k=4, max_train=32)
    img = np.asarray(Image.open(draw_retrieval(r, str(tmp_path / "r.png"))).convert("RGB")).astype(int)
    # 10 px margins; query, an 8 px gap + 8 px more, then 4 neighbours 8 px apart; rows of 28 + 96 + 8
    assert img.shape == (10 + 3 * (28 + CELL_PX + 8) + 10, 10 + 5 * CELL_PX + 4 * 8 + 8 + 10, 3)
    for row in range(3):  # the query's 16 px image at x6: its pixels at the block centres
        top = 10 + row * (28 + CELL_PX + 8) + 28
        want = (r.query_images[row].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(img[top + 9 : top + 90 : 6, 19:100:6] - want[1:-1, 1:-1]).max() <= 1  # inside the frame
        frame = img[top : top + CELL_PX, 10 : 10 + CELL_PX]
        match = bool(r.labels[row, 0] == r.query_labels[row])
        color, other = (GREEN, RED) if match else (RED, GREEN)
        assert (frame == color).all(axis=-1).sum() > 4 * CELL_PX and not (frame == other).all(axis=-1).any()


def test_the_picture_changes_with_the_run(runs, tmp_path):
    def draw(run, out):
        return np.asarray(Image.open(plot_retrieval(str(run), out, queries=2, k=3, max_train=24)))

    a = draw(runs[0], None)
    assert (runs[0] / "pictures" / "retrieval.png").is_file()  # the default place
    a_again, b = draw(runs[0], str(tmp_path / "a2.png")), draw(runs[1], str(tmp_path / "b.png"))
    assert (a == a_again).all()
    assert (a != b).any(axis=-1).mean() > 0.05  # another seed: other images, neighbours, similarities


def test_the_command_line(runs, tmp_path, capsys):
    out = tmp_path / "knn.png"
    args = [str(runs[0]), "--queries", "2", "--k", "3", "--max-train", "16", "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert Image.open(out).size == (10 + 4 * CELL_PX + 3 * 8 + 8 + 10, 10 + 2 * (28 + CELL_PX + 8) + 10)
    assert main([str(runs[0]), "--k", "0"]) == 2
    assert "k=0; expected a whole number >= 1" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no train_config.yaml there" in capsys.readouterr().err
