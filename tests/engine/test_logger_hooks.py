"""Logging fan-out as hooks (issue 17): metrics.csv for real (rows, columns, resume), W&B and MLflow
through fake modules in sys.modules (neither is installed), and the one-line error when one is
asked for but missing."""

from __future__ import annotations

import csv
import json
import types

import pytest

from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine.hooks.loggers import phase_scalars
from vissl_vit.errors import ConfigError

COLUMNS = ["kind", "iteration", "epoch", "phase_idx", "loss", "lr", "images_per_sec", "eta_seconds", "time"]


def _rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_phase_scalars_flatten_meters_outputs_and_the_ema():
    record = {
        "iteration": 8,
        "phase_idx": 3,
        "train_phase_idx": 1,
        "test_loss": 0.5,
        "test_accuracy_list_meter": {"top_1": {"0": 80.0}, "top_5": {"0": 99.0}},
        "test_loss_ema": 0.25,
        "test_accuracy_list_meter_ema": {"top_1": {"0": 81.0}},
    }
    assert phase_scalars("test", record) == {
        "loss": 0.5,
        "top_1": 80.0,
        "top_5": 99.0,
        "loss_ema": 0.25,
        "top_1_ema": 81.0,
    }
    several = {"train_phase_idx": 0, "test_m": {"top_1": {"res4": 1.0, "res5": 2.0}}}
    assert phase_scalars("test", several) == {"top_1_res4": 1.0, "top_1_res5": 2.0}


def test_csv_rows_and_columns_are_the_json_files_numbers(quick_overrides, tmp_path):
    run_train_engine(compose_config(quick_overrides))
    run = tmp_path / "run"
    rows = _rows(run)
    with open(run / "metrics.csv") as f:
        assert next(csv.reader(f)) == COLUMNS + ["top_1", "top_2"]
    steps = [r for r in rows if r["kind"] == "step"]
    stdout = _jsonl(run / "stdout.json")
    assert [int(r["iteration"]) for r in steps] == [s["iteration"] for s in stdout] == list(range(1, 9))
    for r, s in zip(steps, stdout):  # the same values, bit for bit (repr round-trips a float)
        assert (float(r["loss"]), float(r["lr"]), int(r["epoch"])) == (s["loss"], s["lr"], s["epoch"])
        assert r["top_1"] == r["phase_idx"] == ""
    phases = [r for r in rows if r["kind"] != "step"]
    metrics = _jsonl(run / "metrics.json")
    assert [r["kind"] for r in phases] == ["train", "test", "train", "test"]
    for r, m in zip(phases, metrics):
        kind = r["kind"]
        assert (int(r["phase_idx"]), int(r["epoch"]), int(r["iteration"])) == (
            m["phase_idx"],
            m["train_phase_idx"],
            m["iteration"],
        )
        assert float(r["loss"]) == m[f"{kind}_loss"]
        assert float(r["top_1"]) == m[f"{kind}_accuracy_list_meter"]["top_1"]["0"]
        assert r["lr"] == ""
    # the rows of a phase follow the steps of its epoch
    assert [r["kind"] for r in rows][:6] == ["step"] * 4 + ["train", "test"]


def test_csv_after_a_resume_has_no_row_twice(quick_overrides, tmp_path):
    run = tmp_path / "run"
    run_train_engine(compose_config(quick_overrides + ["+config/test/overlays=one_epoch"]))
    assert len(_rows(run)) == 4 + 2
    # what an interrupted run leaves after its last checkpoint (iteration 4, 2 phases): steps 5
    # and 6 and a train phase, then a half-written row
    with open(run / "metrics.csv", "a") as f:
        f.write("step,5,1,,999.0,0.1,1.0,1.0,1.0,,\nstep,6,1,,999.0,0.1,1.0,1.0,1.0,,\n")
        f.write("train,6,1,2,999.0,,,,,1.0,2.0\nstep,7,1,,99")
    run_train_engine(compose_config(quick_overrides))  # resumes at iteration 4, trains epoch 2
    rows = _rows(run)
    steps = [int(r["iteration"]) for r in rows if r["kind"] == "step"]
    assert steps == list(range(1, 9))
    assert [int(r["phase_idx"]) for r in rows if r["kind"] != "step"] == [0, 1, 2, 3]
    assert "999.0" not in {r["loss"] for r in rows}
    # the resumed rows are the resumed run's numbers
    losses = {s["iteration"]: s["loss"] for s in _jsonl(run / "stdout.json")}  # later lines win
    assert [float(r["loss"]) for r in rows if r["kind"] == "step"] == [losses[i] for i in range(1, 9)]


def test_a_run_from_scratch_over_an_old_csv_starts_it_again(quick_overrides, tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "metrics.csv").write_text("kind,iteration,epoch,phase_idx,loss\nstep,1,0,,5.0\n")
    run_train_engine(compose_config(quick_overrides + ["+config/test/overlays=one_epoch"]))
    assert [r["iteration"] for r in _rows(run) if r["kind"] == "step"] == ["1", "2", "3", "4"]
    assert "5.0" not in {r["loss"] for r in _rows(run)}


# ---- W&B and MLflow through fake modules ----


class _FakeWandbRun:
    def __init__(self, calls: list, kwargs: dict) -> None:
        self.calls, self.kwargs = calls, kwargs

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", step, dict(data)))

    def finish(self) -> None:
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeWandbRun(calls, kwargs)

    module.init = init
    monkeypatch.setitem(__import__("sys").modules, "wandb", module)
    return calls


def test_wandb_gets_the_steps_and_phases_and_a_resume_continues_its_run(quick_overrides, tmp_path, fake_wandb):
    over = quick_overrides + ["config.HOOKS.WANDB_SETUP.USE_WANDB=True", "config.HOOKS.WANDB_SETUP.PROJECT=p"]
    run_train_engine(compose_config(over + ["+config/test/overlays=one_epoch"]))
    run = tmp_path / "run"
    init = fake_wandb[0][1]
    assert fake_wandb[0][0] == "init" and fake_wandb[-1] == ("finish",)
    assert (init["project"], init["entity"], init["name"], init["resume"]) == ("p", None, "run", "allow")
    assert init["config"]["OPTIMIZER"]["num_epochs"] == 1
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    assert init["id"] == run_id
    logs = [c for c in fake_wandb if c[0] == "log"]
    stdout = _jsonl(run / "stdout.json")
    steps = [c for c in logs if "step/loss" in c[2]]
    assert [(s, d["step/loss"], d["step/lr"]) for _, s, d in steps] == [
        (r["iteration"], r["loss"], r["lr"]) for r in stdout
    ]
    metrics = _jsonl(run / "metrics.json")
    test = [c for c in logs if "test/top_1" in c[2]]
    assert [(s, d["test/top_1"], d["test/loss"]) for _, s, d in test] == [
        (m["iteration"], m["test_accuracy_list_meter"]["top_1"]["0"], m["test_loss"]) for m in metrics[1::2]
    ]
    fake_wandb.clear()
    run_train_engine(compose_config(over))  # resumed for a second epoch: the same W&B run
    assert fake_wandb[0][1]["id"] == run_id
    assert min(c[1] for c in fake_wandb if c[0] == "log") == 5


def test_mlflow_gets_the_steps_and_phases(quick_overrides, tmp_path, monkeypatch):
    calls: list = []
    module = types.ModuleType("mlflow")
    module.set_tracking_uri = lambda uri: calls.append(("uri", uri))
    module.set_experiment = lambda name: calls.append(("experiment", name))

    def start_run(run_id=None, run_name=None):
        calls.append(("start", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "abc123"))

    module.start_run = start_run
    module.log_metrics = lambda metrics, step: calls.append(("metrics", step, dict(metrics)))
    module.log_artifact = lambda path: calls.append(("artifact", path))
    module.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(__import__("sys").modules, "mlflow", module)
    over = quick_overrides + [
        "config.HOOKS.MLFLOW_SETUP.USE_MLFLOW=True",
        "config.HOOKS.MLFLOW_SETUP.TRACKING_URI=file:///tmp/x",
    ]
    run_train_engine(compose_config(over + ["+config/test/overlays=one_epoch"]))
    run = tmp_path / "run"
    assert calls[:4] == [
        ("uri", "file:///tmp/x"),
        ("experiment", "vissl_vit"),
        ("start", None, "run"),
        ("artifact", str(run / "train_config.yaml")),
    ]
    assert calls[-1] == ("end",)
    metrics = [c for c in calls if c[0] == "metrics"]
    assert [c[1] for c in metrics if "step/loss" in c[2]] == [1, 2, 3, 4]
    train = [c for c in metrics if "train/loss" in c[2]]
    assert (
        len(train) == 1
        and train[0][1] == 4
        and train[0][2]["train/loss"] == _jsonl(run / "metrics.json")[0]["train_loss"]
    )
    assert (run / "mlflow_run_id.txt").read_text().strip() == "abc123"
    calls.clear()
    run_train_engine(compose_config(over))
    assert ("start", "abc123", None) in calls  # the resumed run logs to the same MLflow run


@pytest.mark.parametrize(
    "key, module", [("HOOKS.WANDB_SETUP.USE_WANDB", "wandb"), ("HOOKS.MLFLOW_SETUP.USE_MLFLOW", "mlflow")]
)
def test_a_missing_package_is_a_one_line_config_error_before_the_first_step(
    quick_overrides, tmp_path, monkeypatch, key, module
):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # import fails, as when not installed
    with pytest.raises(ConfigError) as e:
        run_train_engine(compose_config(quick_overrides + [f"config.{key}=True"]))
    assert str(e.value) == (
        f"config.{key}=True but the package '{module}' is not installed: pip install {module}, "
        f"or set config.{key}=False."
    )
    assert not (tmp_path / "run" / "stdout.json").read_text()  # no step was taken
