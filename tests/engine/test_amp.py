"""AMP_ARGS.dtype=auto decides the precision from what the device reports; a run under CPU autocast
trains and checkpoints its loss scaler."""

from __future__ import annotations

import logging

import pytest
import torch

from vissl_vit.config import compose_config
from vissl_vit.engine.parallel import amp_dtype, cpu_native_bf16
from vissl_vit.errors import ConfigError

CPU = torch.device("cpu")


def _cfg(*overrides: str):
    return compose_config(["config=test/quick_vit", "config.MODEL.AMP_PARAMS.USE_AMP=True", *overrides]).config


def _fake_cpu(monkeypatch, bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("bf16", "amx"), [(True, False), (False, True), (True, True)])
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16(monkeypatch, caplog, bf16, amx):
    _fake_cpu(monkeypatch, bf16, amx)
    with caplog.at_level(logging.INFO, logger="vissl_vit"):
        assert amp_dtype(_cfg(), CPU) is torch.bfloat16
    assert "AMP_ARGS.dtype=auto): bfloat16, because the CPU reports" in caplog.text


def test_auto_is_float32_on_a_cpu_without_it_and_says_why(monkeypatch, caplog):
    _fake_cpu(monkeypatch, False)
    with caplog.at_level(logging.INFO, logger="vissl_vit"):
        assert amp_dtype(_cfg(), CPU) is None
    assert "no AVX512-BF16 or AMX" in caplog.text and "autocast stays off" in caplog.text
    assert cpu_native_bf16()[0] is False


def test_a_named_dtype_is_forced_whatever_the_cpu(monkeypatch):
    _fake_cpu(monkeypatch, False)
    assert amp_dtype(_cfg("config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=bfloat16"), CPU) is torch.bfloat16
    assert amp_dtype(_cfg("config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=float16"), CPU) is torch.float16
    _fake_cpu(monkeypatch, True)
    assert amp_dtype(_cfg("config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=float32"), CPU) is None
    assert amp_dtype(_cfg("config.MODEL.AMP_PARAMS.USE_AMP=False"), CPU) is None  # AMP off stays off


def test_bfloat16_forced_on_a_cpu_that_emulates_it_is_a_warning(monkeypatch, caplog):
    forced = "config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=bfloat16"
    _fake_cpu(monkeypatch, False)
    with caplog.at_level(logging.INFO, logger="vissl_vit"):
        assert amp_dtype(_cfg(forced), CPU) is torch.bfloat16  # what was asked for, with a warning
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "emulated on this CPU (it reports no AVX512-BF16 or AMX" in warned[0]
    caplog.clear()
    _fake_cpu(monkeypatch, True)
    with caplog.at_level(logging.INFO, logger="vissl_vit"):
        amp_dtype(_cfg(forced), CPU)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # native: nothing to warn about


def test_an_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="expected auto, bfloat16, float16 or float32"):
        amp_dtype(_cfg("config.MODEL.AMP_PARAMS.AMP_ARGS.dtype=fp8"), CPU)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_amp_on_cpu_trains_and_checkpoints_the_scaler(tmp_path, capfd, dtype):
    from tests.conftest import read_losses
    from vissl_vit import run_train_engine

    run = tmp_path / dtype
    cfg = compose_config(
        [
            "config=test/quick_vit",
            "config.TEST_MODEL=False",
            "config.MODEL.AMP_PARAMS.USE_AMP=True",
            f"config.MODEL.AMP_PARAMS.AMP_ARGS.dtype={dtype}",
            "config.MODEL.AMP_PARAMS.AMP_TYPE=apex",
            "config.MODEL.GRAD_CLIP.USE_GRAD_CLIP=True",
            f"config.CHECKPOINT.DIR={run}",
        ]
    )
    run_train_engine(cfg)
    log = capfd.readouterr().out  # the engine's console: what the command prints
    assert f"autocast to {dtype}" in log and "AMP_TYPE=apex (opt_level O1) runs on torch.amp" in log
    state = torch.load(run / "checkpoint.torch", weights_only=False)
    assert (state["grad_scaler"].get("scale") is not None) == (dtype == "float16")  # fp16: a loss scale, kept
    losses = read_losses(run)
    assert losses and all(v == v for v in losses.values())  # finite
