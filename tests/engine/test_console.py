"""The console (issue 17): one line per epoch, the results table, rank 0 only, log lines routed
through tqdm while a bar is live, the bars of a run on a terminal, and env.json."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import pytest
import torch
from tqdm import tqdm

from tests.conftest import REPO
from vissl_vit import compose_config, run_train_engine
from vissl_vit.utils import logging as vlog
from vissl_vit.utils.environment import git_commit, write_environment
from vissl_vit.utils.logging import (
    SHOWN_BY_BAR,
    ConsoleHandler,
    epoch_line,
    format_duration,
    results_table,
    setup_logging,
)

# metrics.json records as the engine writes them: a meter with one output, then the EMA's
TRAIN = {
    "iteration": 300,
    "phase_idx": 4,
    "train_phase_idx": 2,
    "train_loss": 0.84123,
    "train_accuracy_list_meter": {"top_1": {"0": 84.7}, "top_5": {"0": 97.125}},
}
TEST = {
    "iteration": 300,
    "phase_idx": 5,
    "train_phase_idx": 2,
    "test_loss": 0.85234,
    "test_accuracy_list_meter": {"top_1": {"0": 83.6}, "top_5": {"0": 97.1}},
    "test_loss_ema": 0.8611,
    "test_accuracy_list_meter_ema": {"top_1": {"0": 84.0}, "top_5": {"0": 97.0}},
}


def _test(phase_idx: int, epoch: int, top1: float, ema: float | None = None) -> dict:
    r = {"iteration": 100 * (epoch + 1), "phase_idx": phase_idx, "train_phase_idx": epoch, "test_loss": 1.0}
    r["test_accuracy_list_meter"] = {"top_1": {"0": top1}}
    if ema is not None:
        r["test_accuracy_list_meter_ema"] = {"top_1": {"0": ema}}
    return r


# ---- the lines ----


def test_epoch_line_from_given_metrics():
    line = epoch_line(3, 10, [("train", TRAIN), ("test", TEST)], 72.4)
    assert line == (
        "epoch 3/10  train loss 0.8412 top-1 84.70 top-5 97.12  |  "
        "test loss 0.8523 top-1 83.60 top-5 97.10  ema loss 0.8611 top-1 84.00 top-5 97.00  (1m12s)"
    )
    # an SSL epoch without a meter or a test phase
    assert epoch_line(1, 2, [("train", {"train_phase_idx": 0, "phase_idx": 0, "train_loss": 5.5})], 3.04) == (
        "epoch 1/2  train loss 5.5  (3.0s)"
    )


def test_epoch_line_names_the_best_of_several_outputs():
    rec = {"train_phase_idx": 0, "test_loss": 2.0, "test_m": {"top_1": {"res4": 40.0, "res5": 55.5}}}
    assert epoch_line(1, 1, [("test", rec)], 0) == "epoch 1/1  test loss 2 top-1 55.50 [res5]  (0.0s)"


@pytest.mark.parametrize(
    "seconds, text", [(0.04, "0.0s"), (9.96, "10.0s"), (12.4, "12s"), (72, "1m12s"), (3599, "59m59s"), (7500, "2h05m")]
)
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_results_table_best_and_last_with_their_epochs_and_the_ema():
    records = [
        {"phase_idx": 0, "train_phase_idx": 0, "iteration": 100, "train_loss": 1.5},
        _test(1, 0, 70.0, 71.0),
        {"phase_idx": 2, "train_phase_idx": 1, "iteration": 200, "train_loss": 1.2},
        _test(3, 1, 80.0, 79.5),
        {"phase_idx": 4, "train_phase_idx": 2, "iteration": 300, "train_loss": 1.1},
        _test(5, 2, 10.0, 75.0),  # written by a run that was then interrupted...
        _test(5, 2, 78.25, 81.0),  # ...and again after its resume: the last counts
    ]
    table = results_table(records, 3, "/runs/a", 754.0, "since the resume at iteration 200")
    assert table == (
        "Results:\n"
        "  best top-1 (test)  80.00  at epoch 2/3\n"
        "  last top-1 (test)  78.25  at epoch 3/3\n"
        "  best top-1 (ema)   81.00  at epoch 3/3\n"
        "  last top-1 (ema)   81.00  at epoch 3/3\n"
        "  last train loss    1.1  at epoch 3/3\n"
        "  wall time          12m34s (since the resume at iteration 200)\n"
        "  run folder         /runs/a"
    )


def test_results_table_without_test_phases():
    records = [{"phase_idx": 0, "train_phase_idx": 0, "iteration": 4, "train_loss": 7.25}]
    assert results_table(records, 1, "/r", 2.0) == (
        "Results:\n  last train loss  7.25  at epoch 1/1\n  wall time        2.0s\n  run folder       /r"
    )


# ---- rank 0 only, tqdm routing ----


def _info_and_warning(capsys) -> str:
    log = logging.getLogger("vissl_vit.test_console")
    log.info("an info line")
    log.warning("a warning")
    return capsys.readouterr().out


def test_rank_above_0_prints_nothing_at_info(tmp_path, capsys):
    setup_logging(str(tmp_path / "r1"), rank=1)
    out = _info_and_warning(capsys)
    assert "an info line" not in out
    assert "[rank 1]" in out and "WARNING vissl_vit.test_console: a warning" in out
    assert not (tmp_path / "r1" / "log.txt").exists()  # log.txt is rank 0's
    setup_logging(str(tmp_path / "r1"), rank=1, all_ranks=True)  # LOG_ALL_RANKS
    assert "[rank 1] " in _info_and_warning(capsys).split("an info line")[0]
    setup_logging(str(tmp_path / "r0"), rank=0)
    out = _info_and_warning(capsys)
    assert "an info line" in out and "INFO" not in out  # the console's INFO lines: time and message
    log_txt = (tmp_path / "r0" / "log.txt").read_text()
    assert "INFO " in log_txt and "vissl_vit.test_console: an info line" in log_txt  # log.txt: the full format


def test_log_lines_go_through_tqdm_write_while_a_bar_is_live(monkeypatch):
    written: list[str] = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    stream = io.StringIO()
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("vissl_vit.test_routing")
    log.propagate, log.handlers = False, [handler]
    try:
        log.info("before")
        bar = tqdm(total=3, file=io.StringIO())  # a live bar
        assert vlog.live_progress_bars() == [bar]
        log.info("during")
        log.info("iter 1/3 ...", extra={SHOWN_BY_BAR: True})  # the bar shows it: not printed
        bar.close()
        log.info("after")
    finally:
        log.handlers = []
    assert written == ["during"]
    assert stream.getvalue() == "before\nafter\n"


def test_progress_bars_only_on_a_terminal(monkeypatch):
    assert vlog.progress_bar(True, 5, "x") is None  # pytest's stderr is no terminal
    fake = io.StringIO()
    fake.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", fake)
    bar = vlog.progress_bar(True, 5, "epoch 1/2")
    assert bar is not None and bar.desc == "epoch 1/2" and not bar.leave
    bar.close()
    assert vlog.progress_bar(False, 5, "x") is None  # HOOKS.PROGRESS_BAR.USE_PROGRESS_BAR=False


def test_a_run_on_a_terminal_shows_bars_and_one_line_per_epoch(quick_overrides, tmp_path, monkeypatch, capsys):
    fake = io.StringIO()
    fake.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", fake)
    run_train_engine(compose_config(quick_overrides))
    out, bars = capsys.readouterr().out, fake.getvalue()
    assert "epoch 1/2" in bars and "epoch 2/2" in bars and "test" in bars  # a train bar per epoch, a test bar
    lines = out.splitlines()
    epochs = [ln for ln in lines if "  train loss " in ln]
    assert [ln.split()[1:3] for ln in epochs] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert all("  |  test loss " in ln and " top-1 " in ln for ln in epochs)
    assert not [ln for ln in lines if " iter " in ln]  # the bar showed the per-step numbers...
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "iter 8/8" in log  # ...log.txt has them
    assert "Results:" in out and "best top-1 (test)" in out and "at epoch" in out
    assert "{" not in "".join(epochs)  # no dict reprs


def test_the_results_table_after_a_run_matches_metrics_json(quick_overrides, tmp_path, capsys):
    run_train_engine(compose_config(quick_overrides))
    out = capsys.readouterr().out
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.json").read_text().splitlines()]
    tests = [m for m in metrics if "test_loss" in m]
    tops = [m["test_accuracy_list_meter"]["top_1"]["0"] for m in tests]
    best = max(range(len(tops)), key=lambda i: tops[i])
    assert f"best top-1 (test)  {tops[best]:.2f}  at epoch {tests[best]['train_phase_idx'] + 1}/2" in out
    assert f"last top-1 (test)  {tops[-1]:.2f}  at epoch 2/2" in out
    assert f"run folder         {tmp_path / 'run'}" in out


# ---- env.json ----


def test_env_file_contents(tmp_path):
    env = write_environment(str(tmp_path), world_size=2)
    on_disk = json.loads((tmp_path / "env.json").read_text())
    assert on_disk == env
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert env["world_size"] == 2 and env["command_line"] == [sys.executable, *sys.argv]
    assert env["timm"] and env["torchvision"] and env["vissl_vit"] == "0.1.0" and env["cpu"] and env["hostname"]
    assert env["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert env["git"]["commit"] == head.strip()
    assert env["earlier_starts"] == []
    again = write_environment(str(tmp_path), world_size=1)  # a resumed run: the first start is kept
    assert again["world_size"] == 1 and [e["world_size"] for e in again["earlier_starts"]] == [2]


def test_no_git_checkout_is_no_failure(tmp_path):
    assert git_commit(str(tmp_path)) is None


def test_a_training_run_writes_env_json(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides + ["+config/test/overlays=one_epoch"]))
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["world_size"] == 1 and env["torch"] == torch.__version__
    assert "Environment: vissl_vit 0.1.0, torch " in (tmp_path / "run" / "log.txt").read_text()


def test_test_only_logs_its_phase_in_one_line(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides + ["+config/test/overlays=one_epoch"]))
    run_train_engine(compose_config(quick_overrides + ["+config/test/overlays=one_epoch", "config.TEST_ONLY=True"]))
    last = json.loads((tmp_path / "run" / "metrics.json").read_text().splitlines()[-1])
    top1 = last["test_accuracy_list_meter"]["top_1"]["0"]
    line = f"TEST_ONLY, the model at iteration 4:  test loss {last['test_loss']:.4g} top-1 {top1:.2f} top-2 "
    assert line in (tmp_path / "run" / "log.txt").read_text()
