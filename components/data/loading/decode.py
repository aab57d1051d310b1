"""Image bytes -> pixels: the CPU decoders of the loader workers (:func:`decode_rgb`, :func:`decode_seg`, the cheap
:func:`check_image_header` for bytes handed through undecoded) and the batched device decode of training
(:func:`decode_batch`), which drops and reports what no decoder accepts so the caller can drop what belongs to it.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg  # imported once here: forked loader workers inherit it

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, but decode_jpeg is still the fast CPU path
# and the nvJPEG path we want on GPUs; silence only that notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

#: ``device_decode(list of 1-D uint8 CPU tensors) -> list of (3, H, W) uint8 tensors on the device``; raises
#: RuntimeError when it refuses an input (as ``torchvision.io.decode_jpeg(..., device="cuda")`` does)
DeviceDecode = Callable[[list[torch.Tensor]], list[torch.Tensor]]


#: libjpeg warnings that mean the scan data is damaged (the pixels decoded are not the image's); others (an unknown
#: JFIF revision, an Adobe transform code) are harmless
_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters", "bad Huffman code")


class CorruptJPEGError(ValueError):
    """libjpeg decoded the image but warned that its data is damaged: the sample is not used."""


class _Stderr:
    """What libjpeg prints to file descriptor 2 while one decode runs: torchvision's decoder reports damaged scan
    data only as a libjpeg warning on stderr (the call succeeds). One reusable temp file per process; a lock keeps
    two threads of one process from capturing at once; anything captured that is not libjpeg's goes back out."""

    def __init__(self):
        self.lock, self.file, self.pid = threading.Lock(), None, None

    @contextlib.contextmanager
    def capture(self):
        with self.lock:
            if self.file is None or self.pid != os.getpid():  # forked worker: a file of its own
                self.file, self.pid = tempfile.TemporaryFile(), os.getpid()
            fd = self.file.fileno()
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                saved = os.dup(2)
            except OSError:  # no stderr at all: nothing to capture
                yield lambda: ""
                return
            out: list[str] = []
            try:
                os.dup2(fd, 2)
                yield lambda: "".join(out)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 1 << 16).decode("utf-8", "replace")
                mine = [ln for ln in text.splitlines() if any(c in ln for c in _CORRUPT)]
                out.extend(mine)
                rest = "".join(ln + "\n" for ln in text.splitlines() if ln not in mine)
                if rest:
                    os.write(2, rest.encode())


_STDERR = _Stderr()


def decode_rgb(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB. libjpeg-turbo via torchvision (grey and CMYK become RGB); PIL for the rest.

    Raises (ValueError, OSError, RuntimeError, ...) on data neither decoder accepts, and :class:`CorruptJPEGError`
    when libjpeg decoded it but warned that the scan data is damaged (flipped or missing bytes)."""
    with _STDERR.capture() as warned:
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            image = None
    if warned():
        raise CorruptJPEGError(f"libjpeg: {warned()[:200]}")
    if image is not None:
        return image
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_seg(data: bytes) -> torch.Tensor:
    """Single-channel PNG -> uint8 (H, W) class ids (255 = ignore)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"semantic map has mode {im.mode}, expected L or P")
        arr = np.asarray(im)
    return torch.from_numpy(arr.copy())


def check_image_header(data: bytes) -> None:
    """ValueError if the bytes are no image (garbage, an empty member, a header PIL cannot parse), without decoding
    the pixels. A JPEG that starts with SOI and ends with EOI passes at once (~1 us); anything else has its header
    parsed by PIL (~50 us). Corrupt scan data behind a good header passes: the device decoder finds that, and
    :func:`decode_batch` drops and reports the image."""
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes: too short for an image")
    if data[:3] == b"\xff\xd8\xff" and data[-2:] == b"\xff\xd9":
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as exc:  # PIL raises UnidentifiedImageError, SyntaxError, OSError ... on garbage
        raise ValueError(f"unreadable image header ({type(exc).__name__}: {exc})") from None
    if w < 1 or h < 1:
        raise ValueError(f"image header gives size {w}x{h}")


@dataclass
class Decoded:
    """What :func:`decode_batch` made of a batch: the images that decoded, which inputs they are, what failed."""

    images: list[torch.Tensor]  # (3, H, W) uint8 RGB on the device, in input order, failures left out
    kept: list[int]  # input index of each image in ``images``
    failed: list[tuple[int, str]] = field(default_factory=list)  # (input index, why) of every dropped input
    on_cpu: int = 0  # images the device refused that the CPU decoded (CMYK, PNG ...)


def nvjpeg_decode(device: torch.device) -> DeviceDecode:
    """The CUDA batch decoder: ``torchvision.io.decode_jpeg(list, device=device, mode=RGB)`` (nvJPEG; grey becomes
    RGB; raises RuntimeError on CMYK and on corrupt data, for the whole batch)."""

    def decode(images: list[torch.Tensor]) -> list[torch.Tensor]:
        return decode_jpeg(images, device=device, mode=ImageReadMode.RGB)

    return decode


def _cpu_one(data: torch.Tensor) -> torch.Tensor:
    return decode_rgb(data.numpy().tobytes())


def decode_batch(images: Sequence[torch.Tensor], device: torch.device,
                 device_decode: DeviceDecode | None = None) -> Decoded:
    """JPEG byte tensors (1-D uint8) or decoded (3, H, W) tensors -> :class:`Decoded` RGB tensors on ``device``.

    Decoded tensors are only moved. Byte tensors: with a device decoder (nvJPEG by default on CUDA, or the
    ``device_decode`` given) the batch is decoded at once; if it refuses the batch, each image is retried alone on the
    device, then on the CPU (:func:`decode_rgb`), so one CMYK JPEG costs one image, not the batch. Without one (CPU
    training) each image is decoded by :func:`decode_rgb`. Images no decoder accepts are left out and listed in
    ``failed`` (index and why), so the caller can drop their crop parameters and keys and count them. The device
    decoder is a parameter, so tests run this path on a CPU with a stand-in that refuses what nvJPEG refuses.
    """
    images = list(images)
    if not images or images[0].ndim != 1:
        return Decoded([im.to(device, non_blocking=True) for im in images], list(range(len(images))))
    if device_decode is None and device.type == "cuda":
        device_decode = nvjpeg_decode(device)
    if device_decode is not None:
        try:
            return Decoded(list(device_decode(images)), list(range(len(images))))
        except RuntimeError:
            pass  # one image spoiled the batch: find it below, image by image
    out, kept, failed, on_cpu = [], [], [], 0
    for i, data in enumerate(images):
        if device_decode is not None:
            try:
                out.append(device_decode([data])[0])
                kept.append(i)
                continue
            except RuntimeError:
                pass
        try:
            img = _cpu_one(data)
        except Exception as exc:  # PIL and libjpeg raise many types on garbage
            failed.append((i, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        on_cpu += device_decode is not None
        out.append(img.to(device, non_blocking=True))
        kept.append(i)
    return Decoded(out, kept, failed, on_cpu)


def decode_images(images: Sequence[torch.Tensor], device: torch.device,
                  device_decode: DeviceDecode | None = None) -> list[torch.Tensor | None]:
    """:func:`decode_batch` as a list in input order, ``None`` where no decoder accepted the image."""
    decoded = decode_batch(images, device, device_decode)
    out: list[torch.Tensor | None] = [None] * len(images)
    for i, img in zip(decoded.kept, decoded.images):
        out[i] = img
    return out
