"""``make gpu-check``: one prepared run on one GPU (<= 8 minutes) that proves the fast path and prints its figures.

Phases (each timed; one failing phase is recorded and the others still run):

1. ``pytest -m gpu``: nvJPEG decode == CPU decode, the device augmentation on CUDA == on CPU, bf16 loss close to
   fp32 over a few steps, a compiled step == eager (the tests marked ``gpu``).
2. **pretraining throughput** (:mod:`benchmarks.pretrain_throughput`, the stage's own method object and engine step):
   SlotCon ResNet-50, 224 px, batch 256, bf16, channels_last, ``torch.compile`` off and on -- end to end from
   synthetic COCO-size shards, model only, data only, peak memory; SIM ViT-B/16 when that method is registered.
3. **detection** and **segmentation**: N iterations of the stages' own ``train_one`` with AMP on generated scenes;
   seconds per iteration, images per second, peak memory.
4. **nvJPEG** on a colour, a grayscale, a CMYK and a corrupt JPEG through ``components.data.loading.decode.decode_images``:
   what decodes, what is skipped, the largest difference to the CPU decode.

``--dry-run`` runs the same code paths on the CPU at tiny settings (the test suite runs it), so the script is known
to work before a GPU is lent. Writes one JSON (``--json``) and prints one table.

    python benchmarks/gpu_check.py --json gpu_check.json          # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --dry-run                      # anywhere: tiny, CPU
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402


def _peak_gb(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else 0.0


def _phase(results: dict, name: str, fn: Callable[[], Any]) -> None:
    """Run one phase; record its result or its error (one line + the traceback's tail), and its wall time."""
    t0 = time.perf_counter()
    try:
        results[name] = {"ok": True, **(fn() or {})}
    except Exception as exc:  # a failing phase must not hide the figures of the others
        results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                         "trace": traceback.format_exc().splitlines()[-6:]}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu-check] {name}: {'ok' if results[name]['ok'] else 'FAILED'} in {results[name]['seconds']} s",
          file=sys.stderr, flush=True)


def phase_pytest(dry: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120 if dry else 300)
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode not in (0, 5):  # 5: nothing collected (a CPU machine skips or deselects them all)
        raise RuntimeError(f"pytest -m gpu exited {out.returncode}: {last}")
    return {"summary": last}


def phase_pretrain(dry: bool, compile_: bool, method: str = "slotcon") -> dict:
    import pretrain_throughput

    if dry:
        argv = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                "--synthetic", "32", "--synthetic-size", "96x128", "--num-workers", "0"]
    else:
        argv = ["--arch", "resnet50", "--image-size", "224", "--batch-size", "256", "--steps", "30", "--warmup",
                "10", "--synthetic", "3072", "--synthetic-size", "480x640", "--num-workers", "14"]
    if method != "slotcon":
        argv += ["--method", method]
        argv[argv.index("--arch") + 1] = "vit_demo_16" if dry else "vit_b_16"  # the arch table's ViT names
    if compile_:
        argv.append("--compile")
    return pretrain_throughput.main(argv)


def _scenes_shards(root: Path, size: int, n_train: int) -> Path:
    from components.config import DataConfig, ScenesConfig, ShardConfig
    from components.data.prepare.stage import run_prepare
    from components.data.scenes.stage import generate_scenes
    from components.data.shards.stage import run_shard

    generate_scenes(ScenesConfig(num_train=n_train, num_val=8, image_size=size, workers=max(1, os.cpu_count() // 2)),
                    root / "scenes")
    run_prepare(DataConfig(workers=2), root / "scenes", root / "raw", progress=False)
    run_shard(ShardConfig(workers=2, max_count=64), root / "raw", root / "shards", progress=False)
    return root / "shards"


def phase_detect(dry: bool, shards: Path, device: torch.device) -> dict:
    from components.backbone import build_resnet
    from components.io import save_torch_atomic
    from components.config import DetectConfig
    from components.transfer.detect.stage import _check_data, train_one

    arch = "resnet18" if dry else "resnet50"
    iters = 2 if dry else 40
    small = dict(min_size=[64], max_size=96, test_size=64, mask_head=[16], proposals_train=50, proposals_test=50)
    cfg = DetectConfig(iters=iters, batch_size=2 if dry else 16, warmup_iters=1, steps=[iters - 1],
                       compare_random=False, amp=True, **(small if dry else dict(min_size=[640, 672, 704, 736, 768,
                                                                                             800], max_size=1333)))
    data = _check_data(shards, cfg, 1)
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    sd = build_resnet(arch, head="none").state_dict()
    src = shards.parent / "backbone.pt"  # a real file: the run's fingerprint hashes the trunk it starts from
    save_torch_atomic({"arch": arch, "state_dict": sd}, src)
    _, result = train_one(cfg, "pretrained", arch, sd, str(src), data, None, None)
    n = result.steps_this_run
    return {"arch": arch, "iters": n, "batch": cfg.batch_size, "sec_per_iter": round(result.train_time_s / n, 4),
            "img_per_s": round(result.img_per_s, 1), "peak_mem_gb": _peak_gb(device)}


def phase_segment(dry: bool, shards: Path, device: torch.device) -> dict:
    from components.config import SegmentConfig
    from components.data.segmentation.sources import open_source
    from components.transfer.segment.stage import train_one

    arch = "resnet18" if dry else "resnet50"
    cfg = SegmentConfig(iters=2 if dry else 40, batch_size=2 if dry else 16, crop_size=64 if dry else 512,
                        head_channels=16 if dry else 512, output_stride=16 if dry else 8, amp=True)
    src = open_source("", shards, "auto", "train")
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    _, result = train_one(cfg, init="random", arch=arch, state_dict=None, where="random", train_src=src,
                          checkpoints=None, tracker=None, prefix="")
    n = result.steps_this_run
    return {"arch": arch, "iters": n, "batch": cfg.batch_size, "sec_per_iter": round(result.train_time_s / n, 4),
            "img_per_s": round(result.img_per_s, 1), "peak_mem_gb": _peak_gb(device)}


def _jpeg(mode: str) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    img = img.convert("L") if mode == "gray" else img.convert("CMYK") if mode == "cmyk" else img
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def phase_nvjpeg(device: torch.device) -> dict:
    from components.data.loading.decode import decode_images
    from components.data.loading.loader import decode_rgb

    kinds = {"rgb": _jpeg("rgb"), "gray": _jpeg("gray"), "cmyk": _jpeg("cmyk"), "corrupt": _jpeg("rgb")[:300]}
    out: dict[str, Any] = {}
    for name, data in kinds.items():
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            got = decode_images([tensor], device)
        except Exception as exc:  # what the decode path does with it is the figure
            out[name] = f"raised {type(exc).__name__}"
            continue
        if not got or got[0] is None:
            out[name] = "skipped"
            continue
        try:
            ref = decode_rgb(data)
            diff = (got[0].cpu().int() - ref.int()).abs().max().item()
            out[name] = f"decoded {tuple(got[0].shape)}, max |gpu - cpu| = {diff}"
        except Exception:
            out[name] = f"decoded {tuple(got[0].shape)} (no CPU reference)"
    return out


def run(dry: bool, json_path: str | None) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda and not dry:
        raise SystemExit("gpu-check: no CUDA device here; run with --dry-run for the CPU rehearsal")
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
                               "torch": torch.__version__, "dry_run": dry}
    t0 = time.perf_counter()
    _phase(results, "pytest_gpu", lambda: phase_pytest(dry))
    _phase(results, "pretrain_slotcon_eager", lambda: phase_pretrain(dry, False))
    if not dry:  # compile on the CPU costs minutes of C++ builds and proves nothing about the GPU
        _phase(results, "pretrain_slotcon_compiled", lambda: phase_pretrain(dry, True))
    from components.pretrain.registry import METHODS

    if "sim" in METHODS:
        _phase(results, "pretrain_sim_eager", lambda: phase_pretrain(dry, False, "sim"))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        holder: dict[str, Path] = {}
        _phase(results, "scenes_shards",
               lambda: holder.setdefault("s", _scenes_shards(Path(tmp), 64 if dry else 512, 16 if dry else 256))
               and {})
        if "s" in holder:
            _phase(results, "detect", lambda: phase_detect(dry, holder["s"], device))
            _phase(results, "segment", lambda: phase_segment(dry, holder["s"], device))
    _phase(results, "nvjpeg", lambda: phase_nvjpeg(device))
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    print_table(results)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def print_table(r: dict) -> None:
    print(f"\ngpu-check on {r['device']} (torch {r['torch']}){' -- DRY RUN' if r['dry_run'] else ''}")
    print(f"{'phase':<28} {'ok':<4} {'s':>6}  figures")
    for name, v in r.items():
        if not isinstance(v, dict):
            continue
        figs = {k: x for k, x in v.items() if k not in ("ok", "seconds", "trace")}
        keep = ("end_to_end_img_s", "model_only_img_s", "data_only_img_s", "ratio", "gpu_mem_gb", "sec_per_iter",
                "img_per_s", "peak_mem_gb", "summary", "error", "rgb", "gray", "cmyk", "corrupt")
        text = ", ".join(f"{k}={figs[k]}" for k in keep if k in figs)
        print(f"{name:<28} {'yes' if v['ok'] else 'NO':<4} {v['seconds']:>6}  {text}")
    print(f"total {r['total_seconds']} s")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at tiny settings")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(argv)
    return run(args.dry_run, args.json)


if __name__ == "__main__":
    main()
