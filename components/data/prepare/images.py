"""One image file of ``prepare``: what it is (format, size, orientation), whether it is usable, and the one-time
transcode that turns every image the loader's decoders would not show upright into a plain JPEG. COCO-layout sources
use :func:`check_image` instead (their JPEG bytes are kept as they are, never rotated).
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from components.data.workers import Meter, worker_pool

# extensions a folder/ImageNet walk treats as images (case-insensitive); anything else is counted as ``not_image``
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
ORIENTATION_TAG = 0x0112
PLAIN_JPEG_MODES = ("RGB", "L")  # what libjpeg-turbo and nvJPEG both decode to the same RGB


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes (not the file name), or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6"):
        return "PPM"
    return None


def _orientation(im) -> int:
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block: the pixels are what they are
        return 1
    return value if 1 <= value <= 8 else 1


def probe_image(path: str, non_jpeg: str = "transcode") -> dict[str, Any]:
    """Read, hash and fully decode one image; never raises (problems become ``reason``).

    Returns ``reason`` (None when usable), ``detail``, ``bytes``, ``sha1`` (of the file), ``format``, ``mode``,
    ``width``/``height`` (as displayed: after EXIF orientation), ``orientation`` (1-8) and ``transcode`` (True when
    the shard stage must store a transcoded JPEG instead of the file's bytes: any non-JPEG, and a JPEG with EXIF
    orientation 2-8 or in CMYK/YCCK; see :func:`transcode`). Reasons: ``unreadable``, ``empty``,
    ``not_image`` (content is no known image format), ``not_jpeg`` (policy ``skip``), ``truncated``,
    ``decode_error``, ``too_large`` (over PIL's decompression-bomb limit).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, not decode as grey
    out: dict[str, Any] = {"reason": None, "detail": "", "bytes": None, "sha1": None, "format": None, "mode": None,
                           "width": None, "height": None, "orientation": None, "transcode": False}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {**out, "reason": "unreadable", "detail": f"{type(exc).__name__}: {exc.strerror or exc}"}
    out.update(bytes=len(data), sha1=hashlib.sha1(data).hexdigest())
    if not data:
        return {**out, "reason": "empty", "detail": "zero bytes"}
    fmt = sniff(data)
    if fmt is None:
        return {**out, "reason": "not_image", "detail": f"content is no known image format (starts {data[:8]!r})"}
    out["format"] = fmt
    if fmt != "JPEG" and non_jpeg == "skip":
        return {**out, "reason": "not_jpeg", "detail": f"{fmt} (data.non_jpeg: skip)"}
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h, mode = im.width, im.height, im.mode
            if fmt == "JPEG":  # libjpeg reads every entropy-coded byte at 1/8 scale too: truncation is still caught
                im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
            orientation = _orientation(im)  # after load: PNG's getexif() loads (and a failed load only fails once)
    except Image.DecompressionBombError as exc:
        return {**out, "reason": "too_large", "detail": str(exc)[:200]}
    except OSError as exc:
        msg = str(exc)
        return {**out, "reason": "truncated" if "truncated" in msg.lower() else "decode_error", "detail": msg[:200]}
    except Exception as exc:  # PIL raises assorted types on garbage (SyntaxError, ValueError, ...)
        return {**out, "reason": "decode_error", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if orientation >= 5:  # 5-8 turn the image by 90 degrees: displayed width and height swap
        w, h = h, w
    out.update(mode=mode, width=w, height=h, orientation=orientation,
               transcode=not (fmt == "JPEG" and mode in PLAIN_JPEG_MODES and orientation == 1))
    if out["transcode"]:
        try:  # prove now that the shard stage will manage (exotic modes fail here, counted, not mid-shard)
            transcode(data, 90)
        except Exception as exc:
            return {**out, "reason": "decode_error", "detail": f"cannot convert {fmt} {mode}: {str(exc)[:150]}"}
    return out


def _to_rgb_or_l(im):
    """Any PIL mode -> RGB or L: alpha composited on white, palette expanded, 16/32-bit scaled to 8-bit."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))  # as a viewer on a white page shows it
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode.startswith("I") or mode == "F":  # 16-bit PNG/TIFF greys (I;16*, or I holding 0..65535), float TIFFs
        arr = np.asarray(im).astype(np.float64)
        scale = 1.0 if mode == "F" else (257.0 if arr.max(initial=0) > 255 else 1.0)
        return Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")  # CMYK (PIL undoes Adobe's inversion), YCbCr, LAB, HSV


def transcode(data: bytes, quality: int) -> bytes:
    """Image bytes -> a plain upright JPEG (baseline, 4:4:4, no EXIF/ICC). Deterministic for a given Pillow build.

    Why: the training loader decodes the ``jpg`` member with ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the
    CPU, nvJPEG on the GPU); neither applies EXIF orientation, nvJPEG cannot decode CMYK/YCCK JPEGs and neither
    reads PNG/WebP/BMP. So, once at shard time, such an image is decoded, converted to RGB (or L: alpha composited on
    white, 16-bit scaled to 8-bit), turned upright and saved as a JPEG at ``quality`` (4:4:4 chroma, so the single
    lossy generation costs as little as possible). Every decode path then sees the same upright pixels; ICC profiles
    are ignored on every path (decode_jpeg ignores them too).
    """
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)  # animated GIF/WebP: the first frame
        upright = ImageOps.exif_transpose(im)  # a copy with the pixels turned and the orientation tag dropped
        rgb = _to_rgb_or_l(upright)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# COCO / scenes: checking one JPEG and its semantic map (bytes are kept as they are, never rotated)
# --------------------------------------------------------------------------------------------------------------------
JPEG_MAGIC = b"\xff\xd8\xff"


def check_image(path: str, seg_path: str | None = None) -> dict[str, Any]:
    """Read, hash and fully decode one image (and its semantic map). Never raises: problems become ``reason``.

    Reasons: ``unreadable`` (OS error), ``empty`` (0 bytes), ``not_jpeg`` (no JPEG SOI marker, e.g. a PNG named .jpg),
    ``truncated`` (the entropy-coded data ends early), ``decode_error`` (anything else the decoder rejects).
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail here, not decode as grey
    out: dict[str, Any] = {"reason": None, "detail": "", "seg_error": None}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return {**out, "reason": "unreadable", "detail": str(exc)}
    out["bytes"] = len(data)
    out["sha1"] = hashlib.sha1(data).hexdigest()
    if not data:
        return {**out, "reason": "empty", "detail": "zero bytes"}
    if not data.startswith(JPEG_MAGIC):
        kind = "PNG" if data.startswith(b"\x89PNG") else "GIF" if data.startswith(b"GIF8") else "unknown format"
        return {**out, "reason": "not_jpeg", "detail": f"no JPEG SOI marker ({kind})"}
    try:
        with Image.open(io.BytesIO(data)) as im:
            out["width"], out["height"], out["mode"] = im.width, im.height, im.mode
            # draft() lets libjpeg decode at 1/8 scale: every entropy-coded byte is still read (so truncation and
            # corruption are still caught), at a fraction of the cost of a full-size decode.
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except OSError as exc:
        msg = str(exc)
        return {**out, "reason": "truncated" if "truncated" in msg else "decode_error", "detail": msg[:200]}
    except Exception as exc:  # PIL raises assorted types on garbage (SyntaxError, ValueError, ...)
        return {**out, "reason": "decode_error", "detail": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if seg_path is not None:
        try:
            with Image.open(seg_path) as seg:
                seg.load()
                if seg.mode not in ("L", "P"):
                    out["seg_error"] = f"mode {seg.mode}, expected single-channel L/P"
                elif seg.size != (out["width"], out["height"]):
                    out["seg_error"] = f"size {seg.size} != image size {(out['width'], out['height'])}"
        except Exception as exc:
            out["seg_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def check_image_star(args: tuple[str, str | None]) -> dict[str, Any]:
    """:func:`check_image` of ``(path, seg_path)``, for a process pool's ``map``."""
    return check_image(*args)


def map_parallel(fn, items: list, workers: int, desc: str, progress: bool) -> Iterator:
    """``fn`` over ``items`` in order, in worker processes that die with this one (see components.data.workers)."""
    meter = Meter(desc, len(items), progress=progress)
    try:
        with worker_pool(1 if len(items) < 2 * workers else workers) as pool:
            results = map(fn, items) if pool is None else pool.map(
                fn, items, chunksize=max(1, min(64, len(items) // (8 * workers))))
            for r in results:
                yield r
                meter.update(1, r.get("bytes") or 0)
    finally:
        meter.close()
