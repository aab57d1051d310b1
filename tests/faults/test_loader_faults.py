"""Faults in the data and in the batch, injected: every sample a damaged shard did not deliver is counted exactly and
named by shard, a corrupt / CMYK / grey JPEG on the device-decode path is dropped-and-counted / decoded
(11.5), and a batch with fewer than 2 kept slot queries neither crashes nor desynchronises ranks (11.2)."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from components.data.loading.loader import iterate_samples, make_loader

pytestmark = pytest.mark.faults

PER_SHARD = 16


def _members(url: str) -> list[tarfile.TarInfo]:
    with tarfile.open(url) as tf:
        return tf.getmembers()


def _damage(url: str, how: str) -> None:
    """The damages the loader must survive (and their neighbours), on sample 4 of the shard (members 12, 13, 14)."""
    data = bytearray(Path(url).read_bytes())
    m = _members(url)
    if how.startswith("checksum_"):  # 4 bytes of a member header's checksum field (offset 148, 8 bytes)
        at = {"checksum_first_member": m[12], "checksum_json": m[13], "checksum_last_member": m[14],
              "checksum_member0": m[0]}[how].offset + 148
        data[at:at + 4] = b"9999" if data[at:at + 4] != b"9999" else b"8888"
    elif how == "cut_mid_member":
        data = data[: m[12].offset_data + 100]
    elif how == "cut_header_boundary":
        data = data[: m[12].offset]
    elif how == "cut_mid_header":
        data = data[: m[13].offset + 100]
    elif how == "empty":
        data = bytearray()
    else:
        raise AssertionError(how)
    Path(url).write_bytes(bytes(data))


DAMAGES = ["checksum_first_member", "checksum_json", "checksum_last_member", "checksum_member0", "cut_mid_member",
           "cut_header_boundary", "cut_mid_header", "empty"]


@pytest.mark.parametrize("how", DAMAGES)
def test_every_lost_sample_is_counted_and_named(tmp_path, how, write_shards):
    """Counted losses == real losses (16 - samples actually delivered from the damaged shard), per shard, in the
    evaluation iterator and in the loader with 2 workers; a shard-level record names the last key it did deliver."""
    urls = write_shards(tmp_path, 3, PER_SHARD)
    expected = {u: PER_SHARD for u in urls}
    victim = urls[1]
    _damage(victim, how)

    it = iterate_samples(urls, decode="bytes", expected_counts=expected)
    got = [s["key"] for s in it]
    delivered = {k for k in got if k.startswith("k001_")}
    real = PER_SHARD - len(delivered)
    assert real > 0 and len(got) == 2 * PER_SHARD + len(delivered)
    assert it.stats["lost"] == real and it.stats["lost_by_shard"] == {victim: real}, it.errors
    shard_recs = [e for e in it.errors if e["key"] is None]
    assert len(shard_recs) == 1 and shard_recs[0]["url"] == victim
    named_lost = {e["key"] for e in it.errors if e["key"] is not None}
    assert not named_lost & delivered  # no record calls a delivered sample lost
    after = shard_recs[0]["after"]  # the last sample read before the tar broke: delivered, or lost with its own record
    assert after is None or after in delivered | named_lost
    if how == "cut_header_boundary":
        assert after == "k001_003" and delivered == {f"k001_{j:03d}" for j in range(4)}

    loader = make_loader(urls, batch_size=5, num_workers=2, decode="bytes", expected_counts=expected, seed=1)
    keys = [s["key"] for b in loader for s in b]
    assert sorted(keys) == sorted(got)
    assert loader.stats["lost"] == real and loader.stats["lost_by_shard"] == {victim: real}


def test_damaged_header_checksum_loses_are_counted(tmp_path, write_shards):
    """The issue's case: 4 bytes of one member header's checksum in a 16-sample shard; tarfile ends the archive there
    without an exception: 12 samples are lost, and counted, also without expected counts (as damage of unknown size)."""
    (url,) = write_shards(tmp_path, 1, PER_SHARD)
    _damage(url, "checksum_first_member")
    it = iterate_samples(url, decode="bytes", expected_counts={url: PER_SHARD})
    assert len(list(it)) == 4 and it.stats["lost"] == 12
    assert it.stats["skipped_by_reason"] == {"damaged_tar": 1} and it.errors[0]["after"] == "k000_003"
    blind = iterate_samples(url, decode="bytes")  # no index: the damage is still seen, its size is not
    assert len(list(blind)) == 4 and blind.stats["skipped_by_reason"] == {"damaged_tar": 1}
    assert blind.errors[0]["lost"] is None and blind.stats["lost"] == 0


def test_resampled_counts_each_visit_and_the_ledger_counts_the_data_once(tmp_path, write_shards):
    """Resampled: every visit of the damaged shard loses its 12 again (the loader's per-visit count), the ledger
    counts the 12 once (per shard, maximum over visits and ranks), so a resumed or longer run does not inflate it."""
    from components.data.loading.ledger import DataLossLedger

    urls = write_shards(tmp_path, 3, PER_SHARD)
    expected = {u: PER_SHARD for u in urls}
    _damage(urls[0], "checksum_first_member")
    ledger = DataLossLedger(expected)
    visits = 0
    for epoch in range(2):
        loader = make_loader(urls, batch_size=4, resampled=True, samples_per_epoch=96, num_workers=2, seed=0,
                             epoch=epoch, decode="bytes", expected_counts=expected, drop_last=True)
        keys = [s["key"] for b in loader for s in b]
        assert len(keys) == 96 and not {k for k in keys if k.startswith("k000_")} - {f"k000_{j:03d}" for j in range(4)}
        visits += loader.stats["lost"] // 12
        assert loader.stats["lost"] % 12 == 0
        ledger.add_records(loader.errors)
    assert visits >= 2  # the damaged shard was visited (and lost its samples) more than once
    ledger.merge()
    assert ledger.lost == 12 and ledger.per_shard() == {urls[0]: 12} and ledger.fraction == 12 / 48
    again = DataLossLedger(expected)
    again.load_state_dict(ledger.state_dict())
    again.add_records(loader.errors)  # a resumed run re-reading what it read before the checkpoint
    assert again.lost == 12


def test_corrupt_jpeg_in_a_shard_is_counted_on_both_paths(tmp_path, write_shards, jpeg_bytes):
    """A garbage JPEG is skipped by the worker (rgb: decode fails; bytes: the header check fails); a truncated JPEG
    with a good header passes a bytes-mode worker and is dropped, with its crops, when the device decodes."""
    from components.data.loading.decode import decode_batch

    urls = write_shards(tmp_path, 2, 6)
    rng = np.random.default_rng(5)
    good = jpeg_bytes(rng.integers(0, 255, (24, 32, 3), np.uint8))
    p = tmp_path / "bad.tar"
    with wds.TarWriter(str(p), encoder=False, mtime=0) as tw:
        for key, jpg in (("garbage", b"\xff\xd8\xff" + bytes(60)), ("truncated", good[: len(good) // 2]),
                         ("fine", good)):
            tw.write({"__key__": key, "jpg": jpg, "json": b'{"image": {}}'})
    urls.append(str(p))
    expected = {**{u: 6 for u in urls[:2]}, str(p): 3}
    rgb = make_loader(urls, batch_size=4, num_workers=0, expected_counts=expected)
    assert sorted(s["key"] for b in rgb for s in b if not s["key"].startswith("k")) == ["fine"]
    assert rgb.stats["lost_by_shard"] == {str(p): 2} and rgb.stats["skipped_by_reason"] == {"bad_image": 2}
    raw = make_loader(urls, batch_size=4, num_workers=0, decode="bytes", expected_counts=expected)
    batches = list(raw)
    assert raw.stats["lost_by_shard"] == {str(p): 1} and raw.errors[0]["key"] == "garbage"
    images = [torch.frombuffer(bytearray(s["image"]), dtype=torch.uint8) for b in batches for s in b]
    keys = [s["key"] for b in batches for s in b]
    out = decode_batch(images, torch.device("cpu"))
    assert [keys[i] for i, _ in out.failed] == ["truncated"] and len(out.images) == len(keys) - 1


# --------------------------------------------------------------------------------------------------------------------
# the device-decode path, run on the CPU with a stand-in that refuses what nvJPEG refuses
# --------------------------------------------------------------------------------------------------------------------
def _components(data: bytes) -> int:
    """Colour components of a baseline/progressive JPEG (from its SOF marker)."""
    i = 2
    while i < len(data) - 9:
        if data[i] != 0xFF:
            raise RuntimeError("not a JPEG")
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return data[i + 9]
        i += 2 + length
    raise RuntimeError("no SOF")


class NvjpegStandIn:
    """Batch decode like ``decode_jpeg(list, device="cuda", mode=RGB)``: grey -> RGB, and a RuntimeError for the
    whole batch when one image is CMYK (nvJPEG cannot decode it) or corrupt."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, images):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.calls.append(len(images))
        for im in images:
            if _components(im.numpy().tobytes()) == 4:
                raise RuntimeError("nvjpeg: unsupported colour space (CMYK)")
        try:
            return [decode_jpeg(im, mode=ImageReadMode.RGB) for im in images]
        except RuntimeError as exc:
            raise RuntimeError(f"nvjpeg: {exc}") from None


@pytest.fixture
def jpegs(jpeg_bytes) -> dict[str, bytes]:
    """Five JPEGs for the decode paths: RGB, grey, CMYK, the RGB one cut in half (corrupt), a second RGB."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (20, 28, 3), np.uint8)
    good = jpeg_bytes(rgb)
    return {
        "rgb": good,
        "gray": jpeg_bytes(rng.integers(0, 255, (20, 28), np.uint8)),
        "cmyk": jpeg_bytes(rgb, mode="CMYK"),
        "corrupt": good[: len(good) // 2],
        "rgb2": jpeg_bytes(rng.integers(0, 255, (16, 16, 3), np.uint8)),
    }


def test_device_decode_falls_back_per_image_and_drops_corrupt(jpegs):
    from components.data.loading.decode import decode_batch, decode_images, decode_rgb

    names = list(jpegs)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs.values()]
    as_list = decode_images(tensors, torch.device("cpu"), device_decode=NvjpegStandIn())
    assert [im is None for im in as_list] == [n == "corrupt" for n in names]
    dev = NvjpegStandIn()
    out = decode_batch(tensors, torch.device("cpu"), device_decode=dev)
    assert [names[i] for i in out.kept] == ["rgb", "gray", "cmyk", "rgb2"]
    assert [names[i] for i, _ in out.failed] == ["corrupt"] and out.on_cpu == 1  # only the CMYK went to the CPU
    assert dev.calls[0] == 5 and dev.calls[1:] == [1] * 5  # the batch, then each image alone (not the batch on CPU)
    for i, img in zip(out.kept, out.images):
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        assert torch.equal(img, decode_rgb(jpegs[names[i]]))
    gray = out.images[1]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    clean = [t for n, t in zip(names, tensors) if n in ("rgb", "gray", "rgb2")]
    dev2 = NvjpegStandIn()
    assert len(decode_batch(clean, torch.device("cpu"), device_decode=dev2).images) == 3 and dev2.calls == [3]


@pytest.mark.gpu
def test_nvjpeg_decodes_grey_and_cmyk_and_drops_corrupt(jpegs):
    """The real thing on CUDA: grey and CMYK JPEGs decode (CMYK on the CPU, alone), a corrupt one is dropped."""
    from components.data.loading.decode import decode_batch, decode_rgb

    names = list(jpegs)
    out = decode_batch([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs.values()],
                        torch.device("cuda"))
    assert [names[i] for i in out.kept] == ["rgb", "gray", "cmyk", "rgb2"] and len(out.failed) == 1
    for i, img in zip(out.kept, out.images):
        assert img.is_cuda and img.shape == decode_rgb(jpegs[names[i]]).shape
        # nvJPEG and libjpeg-turbo may round differently (IDCT, upsampling): close, not equal
        assert (img.cpu().float() - decode_rgb(jpegs[names[i]]).float()).abs().mean() < 3


def test_make_views_drops_the_crops_of_a_dropped_image(jpegs):
    """The views of a batch with a corrupt image equal the views of the same batch without it: the dropped image's
    boxes, flips, coords and augmentation draws went with it."""
    from components.pretrain.augment import TwoViewAugment
    from components.pretrain.crops import sample_two_crops
    from components.pretrain.views import collate_pairs, make_views

    g = torch.Generator().manual_seed(0)
    samples = [{"key": n, "url": "u.tar", "image": b,
                "crops": {**sample_two_crops(20, 28, g), "draws": torch.rand(2, TwoViewAugment.NUM_DRAWS, generator=g)}}
               for n, b in jpegs.items()]
    augment = TwoViewAugment(image_size=32)
    views = make_views(collate_pairs(samples), augment, None, torch.device("cpu"), device_decode=NvjpegStandIn())
    assert views["dropped"][0][:2] == ("u.tar", "corrupt") and views["view1"].shape[0] == 4
    kept = [s for s in samples if s["key"] != "corrupt"]
    ref = make_views(collate_pairs(kept), augment, None, torch.device("cpu"), device_decode=NvjpegStandIn())
    for k in ("view1", "view2", "coords1", "coords2", "flip1", "flip2", "boxes"):
        assert torch.equal(views[k], ref[k]), k


# --------------------------------------------------------------------------------------------------------------------
# pretraining: lost samples reach the metrics; above the threshold, a one-line stop
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_reports_lost_samples_and_stops_above_the_threshold(shards, tmp_path):
    """The damaged-checksum shard under `slotcon pretrain`: a one-line stop naming the shard (default threshold);
    with the threshold raised, the run finishes and its metrics hold the exact loss (12 samples of the shard)."""
    import shutil

    from components.config import PretrainConfig
    from components.data.shards.stage import expected_counts
    from components.errors import UserError
    from components.pretrain.stage import run_pretrain

    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    counts = expected_counts(root, "train2017")
    victim = sorted(counts)[0]
    _damage(victim, "checksum_first_member")  # 12 of its 16 samples are gone
    total = sum(counts.values())
    tiny = dict(image_size=64, num_workers=0, log_every_steps=1, batch_size=8, epochs=1,
                samples_per_epoch=16, slotcon=dict(arch="resnet18", num_prototypes=8, dim_hidden=32, dim_out=16,
                                                   warmup_epochs=0))
    torch.set_num_threads(1)  # tiny steps: a second thread only spins on a busy 2-core box (restored by conftest)
    with pytest.raises(UserError) as err:
        run_pretrain(PretrainConfig(**tiny), root, tmp_path / "m", tmp_path / "ck", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"12 of {total} samples" in msg and victim in msg and "max_lost_fraction=0.001" in msg
    metrics = run_pretrain(PretrainConfig(**tiny, max_lost_fraction=0.5), root, tmp_path / "m", tmp_path / "ck",
                           tmp_path / "metrics.json", progress=False)
    assert metrics["lost_samples"] == 12 and metrics["lost_fraction"] == pytest.approx(12 / total)
    assert json.loads((tmp_path / "metrics.json").read_text())["lost_samples"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "sim"])
def test_every_pretraining_method_counts_lost_samples(shards, tmp_path, method):
    """MoCo v2 and SIM read through the same counting loader as SlotCon: the same damaged shard stops them with the
    same one-line error (their crop draws differ: independent crops, SIM's block mask)."""
    import shutil

    from components.config import PretrainConfig
    from components.data.shards.stage import expected_counts
    from components.errors import UserError
    from components.pretrain.stage import run_pretrain

    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    counts = expected_counts(root, "train2017")
    victim = sorted(counts)[0]
    _damage(victim, "checksum_first_member")
    sub = {"mocov2": dict(arch="resnet18", dim_hidden=32, dim=16, queue_size=16, bn_splits=2),
           "sim": dict(decoder_dim=32, decoder_heads=2, predictor_depth=1, warmup_epochs=0)}[method]
    cfg = PretrainConfig(method=method, image_size=64, num_workers=0, log_every_steps=1, batch_size=8, epochs=1,
                         samples_per_epoch=16, **{method: sub})
    torch.set_num_threads(1)
    with pytest.raises(UserError) as err:
        run_pretrain(cfg, root, tmp_path / "m", tmp_path / "ck", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"12 of {sum(counts.values())} samples" in msg and victim in msg


# --------------------------------------------------------------------------------------------------------------------
# fewer than 2 kept slot queries on a rank
# --------------------------------------------------------------------------------------------------------------------
def _scores(n_kept: int, b: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) one-pixel score maps of ``b`` images where exactly ``n_kept`` queries survive the masks."""
    s, t = torch.zeros(b, k, 1, 1), torch.zeros(b, k, 1, 1)
    for i in range(b):
        s[i, 0 if i < n_kept else 1] = 1.0
        t[i, 0 if i < n_kept else 2] = 1.0
    return s, t


class _Toy(torch.nn.Module):
    """Slots from a Linear layer and SlotCon's BatchNorm predictor: the parameters DDP must see on every rank."""

    def __init__(self, d: int = 6):
        super().__init__()
        from components.pretrain.methods.slotcon.heads import MLPPredictor

        self.proj = torch.nn.Linear(d, d)
        self.predictor = MLPPredictor(d, 8, d)

    def forward(self, x, s, t, gather):
        from components.pretrain.methods.slotcon.losses import slot_contrastive_loss

        slots = self.proj(x)
        return slot_contrastive_loss(slots, slots.detach() + 0.1, s, t, predictor=self.predictor, gather=gather)


def _kept_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as tdist

    from components import dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(_Toy())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        losses = []
        # kept queries on (rank 0, rank 1), with unequal batch sizes in the last cases (images dropped at decode)
        for n0, n1, b0, b1 in [(0, 1, 3, 3), (1, 1, 3, 3), (1, 0, 3, 3), (0, 0, 3, 3), (2, 3, 3, 3), (1, 2, 1, 3)]:
            n, b = (n0, b0) if rank == 0 else (n1, b1)
            g = torch.Generator().manual_seed(10 * rank + n)
            s, t = _scores(n, b)
            loss = ddp(torch.randn(b, 4, 6, generator=g), s, t, dist.gather_cat)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
        params = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
        # SyncBN (CUDA only, so not run here): its choice is taken on every rank's query count together
        from components.pretrain.methods.slotcon.heads import MLPPredictor
        from components.pretrain.methods.slotcon.losses import _predictor_plan

        sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(MLPPredictor(6, 8, 6)).train()
        plans = [_predictor_plan(sync, here, lambda e=everywhere: e, synced=True)
                 for here, everywhere in [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 5)]]
        torch.save({"losses": losses, "params": params, "plans": plans}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


@pytest.mark.ddp
def test_fewer_than_two_kept_queries_two_gloo_ranks(tmp_path, free_port):
    """0 or 1 kept queries on a rank (the other rank with 0-3, batches of unequal size): no crash, no hang, and the
    parameters stay identical on both ranks (DDP saw gradients for every parameter on every rank)."""
    import torch.multiprocessing as mp

    mp.spawn(_kept_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
    l0, l1 = ranks[0]["losses"], ranks[1]["losses"]
    assert l0[:4] == [0.0, 0.0, 0.0, 0.0] and l1[1:4] == [0.0, 0.0, 0.0]  # < 2 rows for BN: nothing to contrast
    assert l1[0] == 0.0 and l0[4] > 0 and l1[4] > 0 and l1[5] > 0
    # (run here, join SyncBN's collectives with an empty batch): nobody runs it below 2 queries over all ranks
    assert ranks[0]["plans"] == [(False, False), (False, False), (False, False), (False, True), (True, False),
                                 (True, False)]


def test_fewer_than_two_kept_queries_one_process():
    """The crash ("Expected more than 1 value per channel when training" from the predictor's
    BatchNorm1d on one kept query) is gone; 2 queries still train the predictor; a Linear predictor (no batch
    statistics) still contrasts a single query."""
    from components.pretrain.methods.slotcon.losses import slot_contrastive_loss

    model = _Toy().train()
    x = torch.randn(3, 4, 6)
    for n in (0, 1):
        s, t = _scores(n, 3)
        loss = model(x, s, t, None)
        assert loss.item() == 0.0
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        model.zero_grad()
    s, t = _scores(2, 3)
    loss = model(x, s, t, None)
    assert loss.item() > 0
    loss.backward()
    assert model.predictor.mlp[0].weight.grad.abs().sum() > 0
    s, t = _scores(1, 3)
    assert slot_contrastive_loss(x, x + 0.1, s, t, predictor=torch.nn.Linear(6, 6)).item() > 0
