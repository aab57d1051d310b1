"""Pretraining throughput (SlotCon or SIM): end-to-end from shards vs the model alone on synthetic device tensors.

Prints three figures (images per second, one image = one two-view pair) and their ratio:

- ``end_to_end``: shards -> loader workers (read + crop parameters; JPEG decode too on CPU) -> nvJPEG batch decode
  (CUDA) -> TwoViewAugment on the device -> the method's step (SlotCon: forward, backward, LARS, EMA; SIM: the same
  with block masks drawn in the workers, AdamW and gradient clipping) -- exactly the stage's code (the method
  object's loader and ``prepare``, the engine's :class:`components.engine.loop.Trainer` step).
- ``model_only``: the same step on ready-made normalised views already on the device (the bound the input pipeline
  can at best reach).
- ``data_only``: loader + decode + augmentation without the model (the input pipeline's own ceiling).
- ``ratio`` = end_to_end / model_only (1.0 = the input pipeline costs nothing).

Defaults follow the method and the device. SlotCon: on CUDA the paper's setting (ResNet-50, 224 px, batch 256,
K = 256, hidden 4096, D = 256, bf16, channels_last); on CPU the demo's (ResNet-18, 64 px, batch 32, K = 32, hidden 256,
D = 64). SIM (``--method sim``): ViT-B/16 at 224 px with the released decoder (768-d, 16 heads, projector 2 and
predictor 4 blocks, 118/196 masked), batch 256 on CUDA and 8 on CPU (``--arch vit_demo_16 --image-size 96
--batch-size 32`` for the CPU demo's model and decoder). Without ``--shards`` (or if ``data/shards`` is missing) it writes synthetic COCO-sized JPEG shards
to a temp dir first.

    python benchmarks/pretrain_throughput.py                       # auto: CUDA paper setting or CPU demo
    python benchmarks/pretrain_throughput.py --arch resnet50 --image-size 224 --batch-size 256 --compile
    python benchmarks/pretrain_throughput.py --method sim          # ViT-B/16, 224 px
    python benchmarks/pretrain_throughput.py --shards data/shards --json metrics/bench_pretrain.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


#: SIM's released ViT-B decoder (configs/pretrain/dist_sim_base_1600ep.sh; docs/presets/imagenet_sim_vitb16_1600ep.yaml)
SIM_PAPER_DECODER = dict(decoder_dim=768, decoder_heads=16, projector_depth=2, predictor_depth=4,
                         mask_ratio=118 / 196, global_weight=0.0, dense_weight=1.0)


def write_synthetic_shards(root: Path, num: int, height: int, width: int, per_shard: int = 256, seed: int = 0) -> Path:
    """COCO-sized JPEGs (smooth colour fields + texture, quality 90) in the shard layout ``read_index`` expects."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    split = "train2017"
    (root / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, num, per_shard):
        name = f"{split}/{split}-{s // per_shard:06d}.tar"
        shards.append(name)
        with wds.TarWriter(str(root / name)) as tar:
            for i in range(s, min(num, s + per_shard)):
                low = rng.uniform(0, 255, size=(height // 32 + 1, width // 32 + 1, 3)).astype(np.uint8)
                img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
                arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(height, width, 3))
                buf = io.BytesIO()
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                meta = {"image": {"id": i, "file_name": f"{i:012d}.jpg", "height": height, "width": width},
                        "annotations": []}
                tar.write({"__key__": f"{i:012d}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()})
    counts = [min(num, s + per_shard) - s for s in range(0, num, per_shard)]
    index = {"source": "synthetic", "splits": {split: {"num_samples": num, "shards": shards, "shard_samples": counts}},
             "pretrain": [split],
             "train": split, "val": split, "categories": [], "semantic_classes": None}
    (root / "index.json").write_text(json.dumps(index))
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_views(batch: int, size: int, device: torch.device, channels_last: bool, seed: int = 0,
                    method=None) -> dict:
    """Ready views as the method's ``prepare`` returns them: (B, 3, S, S) normalised, overlap boxes, flips (SlotCon);
    plus crop boxes and view A's block mask (SIM)."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(batch, 2, 2, generator=g) * 0.5
    hi = lo + 0.25 + torch.rand(batch, 2, 2, generator=g) * 0.25
    coords = torch.cat([lo, hi], dim=2)  # (B, 2, 4)
    flips = torch.rand(batch, 2, generator=g) < 0.5
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = {f"view{v + 1}": torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
             for v in range(2)}
    views.update({f"coords{v + 1}": coords[:, v].to(device) for v in range(2)})
    views.update({f"flip{v + 1}": flips[:, v].to(device) for v in range(2)})
    if getattr(method, "name", "") == "sim":
        from components.pretrain.methods.sim.masking import block_mask

        views["boxes"] = (coords * 400).to(device)  # any overlapping pixel boxes
        views["mask"] = torch.stack([block_mask(method.grid, method.num_masked, g).flatten()
                                     for _ in range(batch)]).to(device)
    return views


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("slotcon", "sim"), default="slotcon")
    p.add_argument("--shards", default="data/shards", help="shard root (index.json); synthetic shards if missing")
    p.add_argument("--arch", default=None, help="default: resnet50 / resnet18 (slotcon, CUDA / CPU), vit_b_16 (sim)")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 (64 for slotcon on CPU)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA; 32 (slotcon) / 8 (sim) on CPU")
    p.add_argument("--num-prototypes", type=int, default=256 if cuda else 32)
    p.add_argument("--dim-hidden", type=int, default=4096 if cuda else 256)
    p.add_argument("--dim-out", type=int, default=256 if cuda else 64)
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1) if cuda else 1)
    p.add_argument("--steps", type=int, default=30 if cuda else 4, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10 if cuda else 1, help="untimed steps first (cudnn autotune...)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA (default: bf16 autocast)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--synthetic", type=int, default=0, help="force N synthetic images (default: only if needed)")
    p.add_argument("--synthetic-size", default="480x640", help="HxW of synthetic JPEGs (COCO-like)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = as the loop: on CPU, the cores "
                   "left after one per loader worker)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    sim = args.method == "sim"
    args.arch = args.arch or ("vit_b_16" if sim else "resnet50" if cuda else "resnet18")
    args.image_size = args.image_size or (224 if cuda or sim else 64)
    args.batch_size = args.batch_size or (256 if cuda else 8 if sim else 32)

    from components.config import PretrainConfig
    from components.engine.loop import RunSpec, Trainer
    from components.pretrain.registry import method_class
    from components.pretrain.plan import make_plan
    from components.pretrain.stage import cpu_threads

    if args.threads:
        torch.set_num_threads(args.threads)
    elif not cuda:  # as the stage does on CPU: leave a core per loader worker
        torch.set_num_threads(cpu_threads(torch.get_num_threads(), args.num_workers))
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    steps_needed = args.warmup + args.steps
    tmp = None
    shards = Path(args.shards)
    if args.synthetic or not (shards / "index.json").is_file():
        h, w = (int(v) for v in args.synthetic_size.split("x"))
        n = args.synthetic or max(256, args.batch_size * 4)
        tmp = tempfile.TemporaryDirectory(prefix="bench_shards_")
        t0 = time.perf_counter()
        shards = write_synthetic_shards(Path(tmp.name), n, h, w)
        print(f"wrote {n} synthetic {h}x{w} JPEGs in {time.perf_counter() - t0:.1f} s -> {shards}", file=sys.stderr)

    sim_decoder = {} if args.arch == "vit_demo_16" else SIM_PAPER_DECODER  # the demo's own decoder (params.yaml)
    method_params = {"sim": dict(arch=args.arch, warmup_epochs=0, **sim_decoder)} if sim else {
        "slotcon": dict(arch=args.arch, num_prototypes=args.num_prototypes, dim_hidden=args.dim_hidden,
                        dim_out=args.dim_out, warmup_epochs=0)}
    cfg = PretrainConfig(
        method=args.method, image_size=args.image_size, batch_size=args.batch_size, epochs=1,
        **method_params,
        num_workers=args.num_workers, compile=args.compile, amp=not args.no_amp,
        channels_last=not args.no_channels_last, samples_per_epoch=steps_needed * args.batch_size,
    )
    plan = make_plan(cfg, shards, world_size=1, rank=0)
    # exactly the stage's code: the method object and the engine's step (forward, all-reduce, backward, LARS, EMA)
    method = method_class(cfg.method)(cfg, plan, device)
    model = method.build(device)
    trainer = Trainer(method, model, method.optimizer(model), RunSpec(
        total_steps=plan.total_steps, amp=cfg.amp, channels_last=cfg.channels_last, compile=cfg.compile), device)
    trainer.wrapped.train()
    decode = method.decode
    B = cfg.batch_size

    def timed(fn, n_warm: int, n: int) -> float:
        for i in range(n_warm):
            fn(i)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            fn(n_warm + i)
        _sync(device)
        return n * B / (time.perf_counter() - t0)

    # model only: fixed device tensors in place of the loader + augmentation
    views = synthetic_views(B, cfg.image_size, device, cuda and cfg.channels_last, method=method)
    prepare = method.prepare
    method.prepare = lambda batch, dev: views
    model_only = timed(lambda i: trainer.step(None, i), args.warmup, args.steps)
    method.prepare = prepare
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0

    # data only: loader + decode + augment
    batches = iter(method.batches(0))
    data_only = timed(lambda i: method.prepare(next(batches), device), args.warmup, args.steps)

    # end to end: a fresh loader (workers start inside the warm-up)
    batches = iter(method.batches(1))
    end_to_end = timed(lambda i: trainer.step(next(batches), i), args.warmup, args.steps)

    res = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "method": cfg.method, "arch": cfg.arch, "image_size": cfg.image_size, "batch_size": B, "num_workers": cfg.num_workers,
        "compile": cfg.compile, "amp": bool(cuda and cfg.amp), "decode": decode, "steps": args.steps,
        "end_to_end_img_s": round(end_to_end, 2), "model_only_img_s": round(model_only, 2),
        "data_only_img_s": round(data_only, 2), "ratio": round(end_to_end / model_only, 3),
        "gpu_mem_gb": round(mem, 2),
    }
    print(f"device            {res['device']}")
    print(f"setting           {cfg.method}, {cfg.arch}, {cfg.image_size} px, batch {B}, workers {cfg.num_workers}, "
          f"compile={cfg.compile}, amp={res['amp']}, decode={decode}")
    print(f"end-to-end img/s  {end_to_end:10.2f}   (shards -> decode -> augment -> step)")
    print(f"model-only img/s  {model_only:10.2f}   (synthetic views on the device)")
    print(f"data-only img/s   {data_only:10.2f}   (loader -> decode -> augment, no model)")
    print(f"ratio             {res['ratio']:10.3f}   (end-to-end / model-only)")
    if args.json:
        from components.io import write_json_atomic

        write_json_atomic(args.json, res)
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
