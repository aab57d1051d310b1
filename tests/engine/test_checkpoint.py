"""Checkpoints: atomic writes (a crash mid-save keeps the previous file), latest/rotation, fingerprints, RNG states,
state dict keys."""
from __future__ import annotations

import pytest
import torch

from components.errors import UserError
from components.engine import checkpoint as ckpt


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "step": int(v)}


def test_save_find_latest_and_rotation(tmp_path):
    run = tmp_path / "abc"
    assert ckpt.find_latest(run) is None
    for s in (5, 10, 15):
        ckpt.save_checkpoint(_state(s), run, s, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [10, 15]
    path, state = ckpt.find_latest(run)
    assert path.name == "step_000000015.pt" and state["step"] == 15 and state["format"] == ckpt.FORMAT_VERSION


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    run = tmp_path / "abc"
    ckpt.save_checkpoint(_state(1), run, 1)
    before = (run / "step_000000001.pt").read_bytes()

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")  # bytes reach the temp file, then the process "dies"
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_state(2), run, 2)
    with pytest.raises(KeyboardInterrupt):  # overwriting the same step must not clobber it either
        ckpt.save_checkpoint(_state(9), run, 1)
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1]
    assert (run / "step_000000001.pt").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # temp file cleaned up
    assert ckpt.find_latest(run)[1]["step"] == 1


def test_find_latest_skips_a_corrupt_newest(tmp_path):
    run = tmp_path / "abc"
    ckpt.save_checkpoint(_state(3), run, 3)
    (run / "step_000000007.pt").write_bytes(b"garbage")  # e.g. a disk that lied
    with pytest.warns(UserWarning, match="unreadable"):
        path, state = ckpt.find_latest(run)
    assert state["step"] == 3


def test_flipped_bytes_inside_a_tensor_are_caught_by_the_crc(tmp_path):
    """torch.load reads a checkpoint with flipped payload bytes as wrong weights, silently (the chaos campaign found
    it: a resumed run ended 899 away from the straight run); the CRC check makes it an unreadable file, skipped for
    the previous one. The same check guards the exported backbone."""
    import zipfile

    from components.errors import UserError
    from components.transfer.export import load_backbone

    run = tmp_path / "abc"
    ckpt.save_checkpoint(_state(3), run, 3)
    newest = ckpt.save_checkpoint({"model": {"w": torch.arange(4096, dtype=torch.float32)}, "step": 7}, run, 7)
    with zipfile.ZipFile(newest) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    data = bytearray(newest.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the member's payload
    data[start + 100:start + 104] = b"\xff\xff\xff\x7f"
    newest.write_bytes(bytes(data))
    assert not torch.equal(torch.load(newest, weights_only=False)["model"]["w"], torch.arange(4096.0))  # silent
    with pytest.raises(UserError, match=r"step_000000007\.pt: not a readable checkpoint \(damaged bytes in member"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(UserWarning, match="CRC-32 mismatch"):
        path, state = ckpt.find_latest(run)
    assert state["step"] == 3
    bb = tmp_path / "backbone.pt"
    bb.write_bytes(bytes(data))
    with pytest.raises(UserError, match="backbone.pt: not a readable backbone file .*CRC-32"):
        load_backbone(bb)


def test_fingerprint_ignores_cadence_but_not_epochs_or_lr():
    base = {"base_lr": 1.0, "epochs": 3, "num_workers": 2, "log_every_steps": 5, "seed": 0}
    h0, fp = ckpt.fingerprint(base, {"world_size": 1})
    assert fp["epochs"] == 3 and fp["_world_size"] == 1
    assert ckpt.fingerprint(dict(base, num_workers=0, log_every_steps=1), {"world_size": 1})[0] == h0
    # the schedules span the run: another length is another run (dvc exp variants must not resume each other)
    assert ckpt.fingerprint(dict(base, epochs=10), {"world_size": 1})[0] != h0
    assert ckpt.fingerprint(dict(base, base_lr=0.5), {"world_size": 1})[0] != h0
    assert ckpt.fingerprint(base, {"world_size": 2})[0] != h0
    assert "base_lr: 1.0 -> 0.5" in ckpt.describe_difference(fp, ckpt.fingerprint(dict(base, base_lr=0.5),
                                                                                   {"world_size": 1})[1])


def test_a_new_checkpoint_format_is_a_new_run_folder(monkeypatch):
    """Checkpoints of an older file format (which the weights-only reader refuses) sit under another fingerprint, so
    an upgraded run starts fresh beside them instead of stopping on them."""
    base = {"base_lr": 1.0, "epochs": 3, "seed": 0}
    h_now, fp = ckpt.fingerprint(base)
    assert fp["_format"] == ckpt.FORMAT_VERSION
    monkeypatch.setattr(ckpt, "FORMAT_VERSION", ckpt.FORMAT_VERSION - 1)
    assert ckpt.fingerprint(base)[0] != h_now


def test_rng_state_roundtrip():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    state = ckpt.rng_state(g)
    a, b = torch.rand(3), torch.rand(3, generator=g)
    torch.manual_seed(99)
    g.manual_seed(99)
    ckpt.set_rng_state(state, g)
    assert torch.equal(torch.rand(3), a) and torch.equal(torch.rand(3, generator=g), b)


def test_clean_state_dict_and_unwrap():
    sd = {"module.a": torch.zeros(1), "module._orig_mod.b": torch.zeros(1), "c": torch.zeros(1)}
    assert set(ckpt.clean_state_dict(sd)) == {"a", "b", "c"}
    inner = torch.nn.Linear(2, 2)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = inner

    assert ckpt.unwrap(Wrap()) is inner



def _tree_copy(tmp_path):
    """A copy of the project's components/ (the code a run executes), to edit."""
    import shutil
    from pathlib import Path

    repo = Path(ckpt.__file__).resolve().parents[2]
    shutil.copytree(repo / "components", tmp_path / "components", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_code_digest_follows_the_code_a_method_imports_and_nothing_else(tmp_path):
    root = _tree_copy(tmp_path)
    method = "components.pretrain.methods.slotcon.method"
    before = ckpt.code_digest(method, root)
    assert ckpt.code_digest(method, root) == before  # stable
    # a file outside the method's import closure (the detection stage) changes nothing ...
    with open(root / "components/transfer/detect/stage.py", "a") as f:
        f.write("\n# edited\n")
    assert ckpt.code_digest(method, root) == before  # (the file bytes are read on every call)
    # ... one inside it (the augmentation the method's views run) changes the digest, so the fingerprint
    with open(root / "components/pretrain/augment.py", "a") as f:
        f.write("\n# edited\n")
    after = ckpt.code_digest(method, root)
    assert after != before
    fp_a = ckpt.fingerprint({"lr": 1.0}, {"code": before})[0]
    fp_b = ckpt.fingerprint({"lr": 1.0}, {"code": after})[0]
    assert fp_a != fp_b
