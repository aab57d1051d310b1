import numpy as np
import pytest
import torch
from PIL import Image

from components.transfer.unsup.viz import CELL, LABEL_W, PAD, palette, render_slots


def _model():
    """A fitted cluster head on a random SlotCon (its prototypes)."""
    from components.pretrain.methods.slotcon.method import SlotConMethod
    from components.pretrain.methods.slotcon.model import SlotCon
    from components.transfer.unsup.clusters import ClusterHead

    torch.manual_seed(0)
    model = SlotCon(arch="resnet18", num_prototypes=6, dim_hidden=16, dim_out=8).eval()
    return ClusterHead(model, SlotConMethod, 0).fit(lambda: iter([torch.zeros(1, 3, 64, 64)]))


def _samples(n=5, size=(72, 64)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        img = torch.zeros(3, *size, dtype=torch.uint8)
        img[:, : size[0] // 2] = torch.randint(0, 255, (3, 1, 1), generator=g, dtype=torch.uint8)
        img[:, size[0] // 2 :] = torch.randint(0, 255, (3, 1, 1), generator=g, dtype=torch.uint8)
        img = (img.float() + 20 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        out.append({"key": f"{i:04d}", "image": img})
    return out


def test_viz_writes_valid_pngs_of_the_expected_size(tmp_path):
    samples = _samples()
    r = 64
    summary = render_slots(_model(), lambda: iter(samples), tmp_path / "slots", num_images=3, top_prototypes=2,
                           num_neighbors=4, resolution=r, batch_size=2)
    with Image.open(tmp_path / "slots" / "assignments.png") as im:
        im.verify()
    with Image.open(tmp_path / "slots" / "assignments.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert im.size == (3 * r + 4 * PAD, 3 * r + 4 * PAD)  # (width, height): image | map | blend, 3 rows
        arr = np.asarray(im)
    # the map panel of row 0 holds only palette colours
    panel = arr[PAD : PAD + r, 2 * PAD + r : 2 * PAD + 2 * r].reshape(-1, 3)
    pal = {tuple(c) for c in palette(6).tolist()}
    assert {tuple(c) for c in np.unique(panel, axis=0).tolist()} <= pal
    with Image.open(tmp_path / "slots" / "concepts.png") as im:
        assert im.format == "PNG" and im.size == (LABEL_W + 4 * CELL + 5 * PAD, 2 * CELL + 3 * PAD)
    assert summary["num_images"] == 5 and 1 <= summary["clusters_used"] <= 6 and summary["clusters"] == "prototypes"
    assert list(summary["top"]) == ["rank0", "rank1"]
    assert summary["top"]["rank0"]["usage"] >= summary["top"]["rank1"]["usage"]


def test_viz_of_a_model_without_prototypes_draws_kmeans_clusters(tmp_path):
    """MoCo v2 has no prototypes: the figures show k-means clusters (K given) of its query trunk's features."""
    from components.pretrain.methods.mocov2.method import MocoV2Method
    from components.pretrain.methods.mocov2.model import MoCoV2
    from components.transfer.unsup.clusters import ClusterHead
    from components.transfer.unsup.stage import image_batches

    samples = _samples()
    torch.manual_seed(0)
    model = MoCoV2(arch="resnet18", dim_hidden=16, dim=8, queue_size=8).eval()
    head = ClusterHead(model, MocoV2Method, 3).fit(image_batches(lambda: iter(samples), 2, 64, torch.device("cpu")))
    summary = render_slots(head, lambda: iter(samples), tmp_path / "slots", num_images=2, top_prototypes=3,
                           num_neighbors=2, resolution=64, batch_size=2)
    assert summary["clusters"] == "kmeans" and summary["num_clusters"] == 3 and summary["clusters_used"] >= 2
    with Image.open(tmp_path / "slots" / "assignments.png") as im:
        arr = np.asarray(im)
    panel = arr[PAD : PAD + 64, 2 * PAD + 64 : 2 * PAD + 128].reshape(-1, 3)
    assert {tuple(c) for c in np.unique(panel, axis=0).tolist()} <= {tuple(c) for c in palette(3).tolist()}
    assert -1.0 <= summary["neighbor_similarity_mean"] <= 1.0


def test_palette_is_fixed_and_distinct():
    p = palette(32)
    assert p.shape == (32, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p.tolist()}) == 32
    assert np.array_equal(p[:8], palette(8))  # the same prototype keeps its colour whatever K is drawn


@pytest.mark.slow
def test_segment_unsup_seg_and_viz_clis_on_real_shards(tmp_path, mlflow_store, write_coco):
    """The three stages as DVC runs them (CLI, params file, MLflow on), on shards written by `shard`."""
    import json

    import mlflow
    import yaml

    from components.cli import main
    from components.config import DataConfig, ShardConfig
    from components.data.prepare.stage import run_prepare
    from components.data.shards.stage import run_shard
    from components.pretrain.methods.slotcon.model import SlotCon

    root = write_coco(tmp_path / "scenes", n_train=6, n_val=3)
    run_prepare(DataConfig(workers=1), root, tmp_path / "raw", progress=False)
    run_shard(ShardConfig(max_count=4, workers=1), tmp_path / "raw", tmp_path / "shards", progress=False)
    kw = dict(arch="resnet18", num_prototypes=4, dim_hidden=16, dim_out=8)
    torch.manual_seed(0)
    model = SlotCon(**kw)
    torch.save({"model": model.state_dict(), "model_kwargs": kw, "epoch": 1, "step": 1}, tmp_path / "last.pt")
    torch.save({"arch": "resnet18", "state_dict": model.teacher_encoder.backbone.state_dict()}, tmp_path / "bb.pt")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "tracking": {"artifact_location": mlflow_store.artifact_location},
        "segment": {"iters": 2, "batch_size": 2, "crop_size": 32, "head_channels": 8, "compare_random": False},
        "unsup": {"resolution": 64, "batch_size": 2},
        "viz": {"num_images": 2, "top_prototypes": 2, "num_neighbors": 2, "resolution": 64, "batch_size": 2},
    }))
    sh, m = str(tmp_path / "shards"), tmp_path / "metrics"
    common = ["--params", str(params), "--shards", sh]
    assert main(["segment", *common, "--backbone", str(tmp_path / "bb.pt"), "--out", str(tmp_path / "seg"),
                 "--plots", str(tmp_path / "seg_plots"), "--metrics", str(m / "segment.json")]) == 0
    assert main(["unsup_seg", *common, "--checkpoint", str(tmp_path / "last.pt"),
                 "--metrics", str(m / "unsup_seg.json")]) == 0
    assert main(["viz", *common, "--checkpoint", str(tmp_path / "last.pt"), "--out", str(tmp_path / "slots"),
                 "--metrics", str(m / "viz.json")]) == 0
    seg, unsup = json.loads((m / "segment.json").read_text()), json.loads((m / "unsup_seg.json").read_text())
    assert (tmp_path / "seg_plots" / "loss.png").is_file()  # nothing written into the repository's plots/
    assert seg["num_val_images"] == 3 and set(seg["per_class_IoU"]) == {"sky", "disc", "square", "bar"}
    assert unsup["num_images"] == 3 and 0 <= unsup["mIoU"] <= 1 and "random/mIoU" in unsup
    assert (tmp_path / "slots" / "assignments.png").is_file() and (tmp_path / "slots" / "concepts.png").is_file()
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("slotcon-pipeline").experiment_id])
    assert {r.data.tags["slotcon.stage"] for r in runs} == {"segment", "unsup_seg", "viz"}
    viz_run = next(r for r in runs if r.data.tags["slotcon.stage"] == "viz")
    assert {a.path for a in client.list_artifacts(viz_run.info.run_id, "slots")} == {
        "slots/assignments.png", "slots/concepts.png"}
