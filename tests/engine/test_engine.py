"""The training engine on a toy method: exact resume (known and unknown epoch lengths), the non-finite stop without a
per-step host sync, checkpoint hygiene, the loss plot, and the all-rank stop under 2 gloo processes."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from components.engine import checkpoint as ckpt
from components.engine.loop import Method, NonFiniteLossError, RunSpec, fit, write_loss_plot


class Toy(Method):
    """Linear regression whose batches depend on (epoch, index), with dropout (global RNG) and an 'augmentation'
    generator: a resume that restores the wrong RNG state, or re-reads the wrong batches, changes the numbers."""

    stat_keys = ("loss", "mean_target")
    global_batch = 4

    def __init__(self, batches_per_epoch=3, nan_at=None, seed=0):
        self.n, self.nan_at = batches_per_epoch, nan_at
        self.gen = torch.Generator().manual_seed(seed + 7)
        self.seen = 0  # method state that must survive a resume

    def build(self, device):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)).to(device)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def lr_at(self, step):
        return 0.05 / (1 + step)

    def batches(self, epoch):
        for i in range(self.n):
            g = torch.Generator().manual_seed(1000 * epoch + i)
            x = torch.randn(4, 5, generator=g)
            yield {"x": x, "y": x.sum(1, keepdim=True)}

    def prepare(self, batch, device):
        noise = torch.randn(batch["x"].shape, generator=self.gen) * 0.01
        return {"x": (batch["x"] + noise).to(device), "y": batch["y"].to(device)}

    def forward(self, model, batch, step):
        loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
        if self.nan_at is not None and step == self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "mean_target": batch["y"].mean().detach()}

    def after_update(self, model, step, momentum):
        self.seen += 1

    def generators(self):
        return [self.gen]

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def _fit(method, tmp, total=8, steps_per_epoch=3, **kw):
    spec = RunSpec(total_steps=total, steps_per_epoch=steps_per_epoch, log_every=kw.pop("log_every", 1),
                   save_every=kw.pop("save_every", 2), progress=False, prefetch=kw.pop("prefetch", None))
    return fit(method, spec, ckpt_dir=tmp, fingerprint={"toy": 1}, **kw)


@pytest.mark.parametrize("steps_per_epoch", [3, None])  # a resampled loader (known) / one pass of unknown length
@pytest.mark.parametrize("prefetch", [False, True])  # True: the next batch is prepared during the step (CUDA's path)
def test_exact_resume_equals_straight_run(tmp_path, steps_per_epoch, prefetch):
    straight: dict[int, float] = {}
    a = _fit(Toy(), tmp_path / "a", steps_per_epoch=steps_per_epoch, prefetch=False,
             on_step=lambda s, st: straight.setdefault(s, st["loss"]))
    resumed: dict[int, float] = {}
    first = _fit(Toy(), tmp_path / "b", steps_per_epoch=steps_per_epoch, stop_after_step=4, prefetch=prefetch,
                 on_step=lambda s, st: resumed.setdefault(s, st["loss"]))
    assert first.stopped and first.step == 4
    torch.manual_seed(999)  # the process's RNG moved on: the resume restores what it needs
    method = Toy()
    b = _fit(method, tmp_path / "b", steps_per_epoch=steps_per_epoch, prefetch=prefetch,
             on_step=lambda s, st: resumed.setdefault(s, st["loss"]))
    assert b.resumed_from is not None and b.steps_this_run == 4 and method.seen == 8
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    for s in straight:
        assert resumed[s] == pytest.approx(straight[s], abs=1e-7), s
    for (k, v), (_, w) in zip(a.extra["model"].state_dict().items(), b.extra["model"].state_dict().items()):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-7, msg=k)
    assert [r["epoch"] for r in a.history] == [r["epoch"] for r in b.history] == [1, 2, 3]
    for ra, rb in zip(a.history, b.history):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-7)


def test_a_finished_run_resumes_to_nothing_and_another_fingerprint_starts_fresh(tmp_path):
    _fit(Toy(), tmp_path)
    again = _fit(Toy(), tmp_path)
    assert again.steps_this_run == 0 and again.step == 8
    spec = RunSpec(total_steps=3, steps_per_epoch=3, progress=False)
    other = fit(Toy(), spec, ckpt_dir=tmp_path, fingerprint={"toy": 2})
    assert other.resumed_from is None and other.steps_this_run == 3
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_non_finite_loss_stops_at_the_next_look_and_no_checkpoint_holds_it(tmp_path):
    """A NaN at step 5 with looks every 4 steps: the engine raises at the next look (step 6, a checkpoint is due
    there), names step 5 as the first bad one, and the newest checkpoint is step 4: nothing after the NaN was saved."""
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5 .*seen at step 6.*step_000000004\.pt"):
        _fit(Toy(nan_at=5), tmp_path, log_every=4)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3, 4]  # (the epoch end at 3; keep=2)
    # the re-run resumes from step 4 (after the cause is fixed)
    ok = _fit(Toy(), tmp_path, log_every=4)
    assert ok.resumed_from.endswith("step_000000004.pt") and ok.steps_this_run == 4


def test_leftover_temp_checkpoints_are_removed_on_start(tmp_path):
    _fit(Toy(), tmp_path, total=2, steps_per_epoch=2)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    junk = run_dir / ".step_000000004.pt.abc123.tmp"  # what a kill mid-save leaves
    junk.write_bytes(b"half")
    _fit(Toy(), tmp_path, total=2, steps_per_epoch=2)
    assert not junk.exists()


def test_loss_plot_always_rewritten(tmp_path):
    rows = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}]
    write_loss_plot(rows, tmp_path / "loss.csv", tmp_path / "loss.png", x="epoch", ys=["loss"], title="t")
    assert (tmp_path / "loss.csv").read_text().splitlines() == ["epoch,loss", "1,2", "2,1.5"]
    before = (tmp_path / "loss.png").read_bytes()
    write_loss_plot([], tmp_path / "loss.csv", tmp_path / "loss.png", x="epoch", ys=["loss"], title="t")
    assert (tmp_path / "loss.csv").read_text().splitlines() == ["epoch,loss"]
    assert (tmp_path / "loss.png").read_bytes() != before  # no stale curve from another run


# --------------------------------------------------------------------------------------------------------------------
# 2 gloo ranks: a NaN on one rank stops both at the same step
# --------------------------------------------------------------------------------------------------------------------
def _nan_worker(rank: int, world: int, port: int, tmpdir: str) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method = Toy(nan_at=3 if rank == 1 else None)  # only rank 1 sees the NaN
        try:
            _fit(method, Path(tmpdir) / "ck", log_every=1)
            out = "finished"
        except NonFiniteLossError as exc:
            out = str(exc)
        Path(tmpdir, f"rank{rank}.txt").write_text(out)
    finally:
        tdist.destroy_process_group()


@pytest.mark.ddp
def test_nan_on_one_rank_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nan_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert "non-finite loss at step 3 on 2 rank(s)" in msg, (r, msg)
