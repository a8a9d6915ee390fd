"""Host syncs and collectives per training step (issue 13): the step's scalars (the NaN verdict,
the unreadable-image count, the logged loss) are reduced together and read by the host once per
sync interval (LOG_FREQUENCY), as timm and DINO do, not every step.

There is no GPU here (torch.cuda.set_sync_debug_mode is CUDA-only), so the host reads are counted
by wrapping the Tensor methods that wait for a device (item, tolist, cpu, numpy, bool/float/int
conversion), and the collectives by wrapping torch.distributed's, on a real one-process gloo group
(the engine's collectives then run as on many). Reads made while loading data are not counted:
they run in the loader's workers, on the CPU, in a real run.

Measured on the toy trainer below (the engine's per-step hooks, the preemption flag reduced as on
several processes). Before: every step 5 reads, 3 of them of device tensors (the NaN verdict, the
bad-image count, the train meter's loss) and 2 of CPU tensors (the loader's bad flags, the
preemption flag), and 3 collectives (NaN verdict, bad-image count, preemption flag); a log step 1
read and 1 collective more. Now: a step between sync points makes no read and no collective; a
sync step makes 1 read and 1 collective for all the step scalars of the interval together, the
preemption flag of several processes included.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.engine.toy import ToyLoader, toy_trainer
from vissl_vit import compose_config, run_train_engine
from vissl_vit.engine import trainer as trainer_module
from vissl_vit.engine.hooks import (
    BadImageHook,
    CheckpointHook,
    HookBase,
    LogHook,
    NanLossHook,
    PreemptionHook,
    TrainMeterHook,
)
from vissl_vit.engine.hooks.checkpoint_hook import Preempted
from vissl_vit.engine.hooks.phases import PhaseWriter
from vissl_vit.engine.trainer import Trainer
from vissl_vit.errors import TrainingError
from vissl_vit.utils.distributed import all_reduce_sum

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "barrier")
# frames of data loading: in a real run they are the loader workers', on the CPU
_DATA = (os.sep + os.path.join("torch", "utils", "data"), os.sep + os.path.join("vissl_vit", "data"), "torchvision")


def _caller() -> str:
    """``file:line`` of the vissl_vit code that made the current call (vissl_vit/utils' helpers such
    as all_reduce_sum are looked through), "torch.optim" inside an optimizer's own step, "data"
    inside data loading."""
    f, site = sys._getframe(2), ""
    while f is not None:
        name = f.f_code.co_filename
        if any(d in name for d in _DATA):
            return "data"
        if not site and os.sep + os.path.join("torch", "optim") + os.sep in name:
            site = "torch.optim"
        if not site and os.sep + "vissl_vit" + os.sep in name and os.sep + "utils" + os.sep not in name:
            site = f"{os.path.basename(name)}:{f.f_lineno}"
        f = f.f_back
    return site or "other"


def _site(module, text: str) -> str:
    """``file:line`` of the (first) line of ``module`` where ``text`` (maybe several lines) starts."""
    source = open(module.__file__).read()
    return f"{os.path.basename(module.__file__)}:{source[: source.index(text)].count(chr(10)) + 1}"


class _Count:
    """Host reads and collectives, by call site (``file:line`` of the vissl_vit code that made them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: Counter = Counter()
        self.collectives: Counter = Counter()
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), self.reads))
        for name in COLLECTIVES:
            monkeypatch.setattr(dist, name, self._wrap(getattr(dist, name), self.collectives))

    @staticmethod
    def _wrap(fn, counter: Counter):  # noqa: ANN001, ANN205
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            site = _caller()
            if site != "data":
                counter[site] += 1
            return fn(*args, **kwargs)

        return counted


class _Probe(HookBase):
    """Records the counters at every before_step: step i's counts are the difference to step i+1's."""

    def __init__(self, count: _Count) -> None:
        self.count, self.marks = count, []

    def before_step(self) -> None:
        self.marks.append((Counter(self.count.reads), Counter(self.count.collectives)))

    def per_step(self) -> list[tuple[Counter, Counter]]:
        """(reads, collectives) of each step but the last (1-based step i at index i - 1)."""
        return [(r1 - r0, c1 - c0) for (r0, c0), (r1, c1) in zip(self.marks, self.marks[1:])]


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo group of one process: the engine's collectives run (and are counted) as on many."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _toy_trainer(loader: ToyLoader, sync_every: int = 4, amp_dtype: torch.dtype | None = None) -> Trainer:
    trainer = toy_trainer(loader, sync_every=sync_every, amp_dtype=amp_dtype)
    trainer.read_flags_on_host = False  # count as on a GPU, where reading a flag waits for the device
    return trainer


def _toy_run(tmp_path, count: _Count, loader: ToyLoader, sync_every: int = 4) -> tuple[Trainer, _Probe]:
    """8 steps of a toy trainer with the engine's per-step hooks, in build_hooks' order."""
    trainer = _toy_trainer(loader, sync_every)
    checkpoint = CheckpointHook(str(tmp_path), epoch_frequency=1, iter_frequency=-1, keep_last=1, is_primary=False)
    probe = _Probe(count)
    trainer.register_hooks(
        [
            probe,
            NanLossHook(all_reduce_sum),
            BadImageHook(32, 0.5, all_reduce=all_reduce_sum),
            TrainMeterHook(None, PhaseWriter(None, None, "meter"), all_reduce_sum),
            LogHook(sync_every, None, None, 1, all_reduce_sum),
            checkpoint,
            # world_size=2: its flag is all-reduced every step, as on several processes
            PreemptionHook(checkpoint, all_reduce_sum, world_size=2),
        ]
    )
    trainer.train()
    return trainer, probe


def _engine_sites(counter: Counter) -> Counter:
    """The counts of the engine's code but torch's optimizers (non-fused AdamW on the CPU reads its
    CPU step counters; on CUDA the engine's SGD/Adam/AdamW are fused and read none)."""
    return Counter({k: v for k, v in counter.items() if k != "torch.optim"})


# at most what this change achieved: on a step between sync points, no read and no collective; on a
# sync step, one of each (all the scalars together, the preemption flag included)
BETWEEN_SYNCS, AT_SYNC = (0, 0), (1, 1)


def test_the_step_scalars_are_read_and_reduced_once_per_sync_interval(tmp_path, monkeypatch, one_process_group):
    count = _Count(monkeypatch)
    trainer, probe = _toy_run(tmp_path, count, ToyLoader(with_bad_fields=True))
    assert trainer.iteration == 8
    steps = probe.per_step()  # steps 1..7 (step 8 ends the epoch)
    for i, (reads, collectives) in enumerate(steps, start=1):
        engine = (sum(_engine_sites(reads).values()), sum(_engine_sites(collectives).values()))
        want = AT_SYNC if i % 4 == 0 else BETWEEN_SYNCS
        assert engine[0] <= want[0] and engine[1] <= want[1], (i, reads, collectives)
    assert sum(sum(_engine_sites(r).values()) for r, _ in steps) == 1  # one sync step (4) among steps 1..7


@pytest.mark.parametrize("amp", [None, torch.float16], ids=["fp32", "fp16-grad-scaler"])
def test_a_nan_step_between_sync_points_is_skipped_on_the_device_and_raises_at_the_sync(monkeypatch, amp):
    count = _Count(monkeypatch)
    loader = ToyLoader(with_bad_fields=True)
    loader.batches[1]["label"][0] = float("nan")  # step 2's loss
    seen: dict[int, dict[str, torch.Tensor]] = {}

    class _Weights(HookBase):
        def after_step(self) -> None:
            seen[self.trainer.iteration] = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}

    trainer = _toy_trainer(loader, sync_every=4, amp_dtype=amp)  # fp16: the flag joins the GradScaler's
    trainer.register_hooks([NanLossHook(), _Weights()])
    with pytest.raises(TrainingError, match=r"^The loss is nan at iteration 2 \(epoch 0, lr 0\.1\)"):
        trainer.train()
    # steps 2 and 3 ran on without a host read, and the weights took neither (the skip holds until
    # the sync): they are step 1's; step 4's sync raised before its after_step
    assert sorted(seen) == [1, 2, 3]
    assert all(torch.equal(seen[1][k], v) for k, v in seen[3].items())
    assert all(torch.equal(seen[1][k], v) for k, v in trainer.model.state_dict().items())
    # one read for the 4 steps' scalars (the message's own loss value is read after the verdict)
    assert count.reads[_site(trainer_module, "flat = torch.cat(parts).tolist()")] == 1


@pytest.mark.parametrize("fused", [False, True, "read"], ids=["restored", "fused-found_inf", "read-on-cpu"])
def test_a_flagged_step_leaves_the_weights_as_before(fused):
    # the two device-side skips against a plain optimizer that never saw the flagged step (step 1)
    torch.manual_seed(0)
    model, ref = nn.Linear(3, 1), nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused is True or None)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.1)
    trainer = Trainer(
        model, nn.MSELoss(), opt, lambda w: 0.1, ToyLoader(with_bad_fields=True), 8, 8, "step", torch.device("cpu")
    )
    assert trainer.read_flags_on_host  # the CPU's default
    trainer.read_flags_on_host = fused == "read"
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    # restored: the weights are put back, the optimizer state is not (the run raises at the sync);
    # fused and read: the moments and the step count are skipped too, so later steps match as well
    for step in range(3 if fused else 2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        flagged = step == 1
        if flagged:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        else:
            ref_opt.step()
        trainer.skip_optimizer_step(torch.tensor(flagged))
        trainer._optimizer_step()
        trainer.sync()  # clears the flag (nothing was filed: no guard here)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q), step
    if fused:
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"])
            assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 2


def test_unreadable_images_are_looked_up_at_the_sync_point(tmp_path, monkeypatch, one_process_group):
    count = _Count(monkeypatch)
    seen: list[int] = []

    class _BadCount(HookBase):  # what the bad-image hook knows after each step
        def after_step(self) -> None:
            seen.append(next(h for h in self.trainer.hooks if isinstance(h, BadImageHook)).count)

    trainer = _toy_trainer(
        ToyLoader(with_bad_fields=True, bad_at=1)
    )  # step 2 meets image 5; the sync of step 4 reads it
    trainer.register_hooks([BadImageHook(32, 0.5, all_reduce=all_reduce_sum), _BadCount()])
    trainer.train()
    assert seen == [0, 0, 0, 1, 1, 1, 1, 1]
    assert trainer.hooks[0].bad.paths == {5: "/d/5.jpg"}
    # the paths are gathered once, at that sync, and only because a rank met one
    assert sum(n for site, n in count.collectives.items() if site.startswith("guards.py")) == 1


def test_a_real_run_reads_the_host_once_per_log_interval(tmp_path, monkeypatch, one_process_group):
    # the quick config through the Python API, without a meter (the accuracy meter reads its own counts)
    overrides = [
        "config=test/quick_vit",
        "config.LOG_FREQUENCY=4",
        "config.METERS.name=",
        "config.TEST_MODEL=False",
        "config.OPTIMIZER.num_epochs=1",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",  # 8 steps
        f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
    ]
    count = _Count(monkeypatch)
    probe = _Probe(count)

    class _AsOnGpu(HookBase):  # a flagged step is then skipped without reading the flag
        def before_train(self) -> None:
            self.trainer.read_flags_on_host = False

    trainer = run_train_engine(compose_config(overrides), extra_hooks=[_AsOnGpu(), probe])
    assert trainer.iteration == 8
    for i, (reads, collectives) in enumerate(probe.per_step(), start=1):
        engine = sum(_engine_sites(reads).values())
        want = AT_SYNC if i % 4 == 0 else BETWEEN_SYNCS
        assert engine <= want[0] and sum(collectives.values()) <= want[1], (i, reads, collectives)


def _preemption_run(tmp_path, world_size: int, all_reduce, request_at: int | None) -> tuple[Trainer, list[int]]:
    """The toy trainer (sync every 4 steps) with a checkpoint and a preemption hook; this process is
    asked to stop during step ``request_at`` (None: never). Returns it and the steps it completed."""
    trainer = _toy_trainer(ToyLoader(with_bad_fields=True), sync_every=4)
    checkpoint = CheckpointHook(str(tmp_path), epoch_frequency=1, iter_frequency=-1, keep_last=-1, is_primary=True)
    preemption = PreemptionHook(checkpoint, all_reduce, world_size=world_size)
    done: list[int] = []

    class _Signal(HookBase):
        def before_step(self) -> None:
            if self.trainer.iteration + 1 == request_at:
                preemption.requested = True  # what its SIGTERM handler sets

        def after_step(self) -> None:
            done.append(self.trainer.iteration)

    trainer.register_hooks([_Signal(), checkpoint, preemption])
    return trainer, done


def test_one_process_stops_after_the_step_of_the_signal(tmp_path):
    trainer, done = _preemption_run(tmp_path, 1, lambda t: t, request_at=2)
    with pytest.raises(Preempted, match="preempted at iteration 2: checkpoint written"):
        trainer.train()
    assert done == [1, 2] and trainer.iteration == 2  # step 2 completed, then the stop
    assert os.path.exists(tmp_path / "model_iteration2.torch")


def test_several_processes_stop_together_at_the_next_sync_point(tmp_path, monkeypatch, one_process_group):
    # the other rank got the signal in step 3 and this one never: the flags are summed at the sync
    # of step 4 (no collective of their own before it) and both stop after step 4
    other, layout = {3: 1.0}, []  # layout: the (step, name) of each value filed since the last read

    def with_other_rank(t: torch.Tensor) -> torch.Tensor:
        theirs = [other.get(step, 0.0) if name == "preempt" else 0.0 for step, name in layout]
        layout.clear()
        return all_reduce_sum(t) + torch.tensor(theirs, dtype=t.dtype)  # a real collective, counted

    trainer, done = _preemption_run(tmp_path, 2, all_reduce_sum, request_at=None)
    count = _Count(monkeypatch)
    original_add = trainer.scalars.add

    def add(name, values, reducer=None, check=None):  # noqa: ANN001, ANN202
        layout.append((trainer.scalars.step, name))
        return original_add(name, values, with_other_rank if reducer is not None else None, check)

    monkeypatch.setattr(trainer.scalars, "add", add)
    with pytest.raises(Preempted, match="preempted at iteration 4: checkpoint written"):
        trainer.train()
    assert done == [1, 2, 3, 4] and trainer.iteration == 4
    assert os.path.exists(tmp_path / "model_iteration4.torch")
    # in the steps, one collective: the sync of step 4, for steps 1-4 together (the others are the
    # early-signal check of before_train and the checkpoint's save)
    assert {k: v for k, v in count.collectives.items() if not k.startswith("checkpoint_hook")} == {
        _site(trainer_module, "parts = [torch.cat(ts) if r is None else r(torch.cat(ts))"): 1
    }
