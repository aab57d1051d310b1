"""Generated image trees for the ImageNet / folder source tests: an ILSVRC-2012 layout and a deliberately messy folder.

Both are tiny (32-56 px images, ~0.1 s to write) and every oddity is there on purpose; ``MESSY_SKIPS`` and
``MESSY_OK`` are the exact outcomes ``prepare`` must report for the messy folder (with ``exclude: ["**/thumbs/**"]``).
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def picture(seed: int, w: int = 40, h: int = 32) -> np.ndarray:
    """A smooth image with a bright marker in its top-left corner (so orientation is visible after decoding)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(40, 200, 3)
    img = np.clip(base[None, None] + (x[..., None] * 2 + y[..., None]) * rng.uniform(0.5, 1.5, 3), 0, 255)
    img[: h // 4, : w // 4] = 255
    return img.astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}), **kw)
    return buf.getvalue()


def exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    """JPEG bytes of ``arr`` as stored, tagged with an EXIF orientation (a camera held sideways)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(arr, exif=exif.tobytes())


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# the messy folder's expected outcome
MESSY_SKIPS = {
    "hidden": 2, "symlink_loop": 2, "linked_dir_seen": 1, "broken_symlink": 1, "not_image": 3, "not_regular": 1,
    "bad_name": 1, "empty": 1, "truncated": 1, "decode_error": 1, "duplicate": 3,
}
MESSY_OK = 17
MESSY_TRANSCODE = 9  # 2 rotated JPEGs, 3 PNGs, WebP, BMP, CMYK JPEG, a PNG named .jpg
MESSY_EXCLUDED = 1


def write_messy_folder(root: str | Path) -> Path:
    """Mixed formats, EXIF rotation, duplicates, corrupt files, symlink loops, non-image files, deep nesting,
    unicode and non-UTF-8 names, a fifo. See MESSY_* for what prepare must make of it."""
    root = Path(root)
    plain = [_write(root / "a" / f"img_{i:03d}.jpg", encode(picture(i))) for i in range(3)]
    _write(root / "a" / "b" / "c" / "d" / "e" / "f" / "deep.jpeg", encode(picture(10)))
    _write(root / "a" / "b" / "c" / "shot.JPG", encode(picture(11, 48, 36)))
    _write(root / "photos" / "rotated_6.jpg", exif_jpeg(picture(12, 48, 32), 6))  # stored 48x32, shown 32x48
    _write(root / "photos" / "rotated_3.jpg", exif_jpeg(picture(13, 40, 32), 3))
    _write(root / "photos" / "upright_1.jpg", exif_jpeg(picture(14), 1))  # tagged but upright: kept as is
    rgba = np.concatenate([picture(15), np.full((32, 40, 1), 128, np.uint8)], 2)
    rgba_png = _write(root / "pngs" / "rgba.png", encode(rgba, "PNG"))
    _write(root / "pngs" / "gray16.png", encode((picture(16)[..., 0].astype(np.uint16) * 257), "PNG"))
    pal = Image.fromarray(picture(17)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, format="PNG", transparency=0)
    _write(root / "pngs" / "palette.png", buf.getvalue())
    _write(root / "misc" / "pic.webp", encode(picture(18), "WEBP", lossless=True))
    _write(root / "misc" / "pic.bmp", encode(picture(19), "BMP"))
    _write(root / "misc" / "cmyk.jpg", encode(picture(20), mode="CMYK"))
    _write(root / "misc" / "gray.jpg", encode(picture(21), mode="L"))
    _write(root / "ünïcödé" / "日本語 画像.jpg", encode(picture(22)))
    _write(root / "bad" / "png_named.jpg", encode(picture(23), "PNG"))  # a PNG with a JPEG name: format by content
    # -- skipped, by reason
    _write(root / "dup" / "copy_of_img_000.jpg", plain[0].read_bytes())  # duplicate
    _write(root / "dup" / "copy2.png", rgba_png.read_bytes())  # duplicate
    (root / "link_to_img.jpg").symlink_to(plain[1])  # duplicate (same bytes through a file link)
    _write(root / "bad" / "empty.jpg", b"")  # empty
    full = encode(picture(24, 56, 48))
    _write(root / "bad" / "truncated.jpg", full[: len(full) // 2])  # truncated
    _write(root / "bad" / "garbage.jpg", np.random.default_rng(0).bytes(300))  # not_image (content)
    _write(root / "bad" / "corrupt.png", encode(picture(25), "PNG")[:60] + b"\x00" * 200)  # decode_error
    _write(root / "notes.txt", b"not an image")  # not_image (extension)
    _write(root / "a" / "meta.json", b"{}")  # not_image (extension)
    _write(root / ".DS_Store", b"\x00\x00\x00\x01Bud1")  # hidden
    _write(root / ".cache" / "x.jpg", encode(picture(26)))  # hidden (the folder, not entered)
    (root / "loop").symlink_to(".")  # symlink_loop: back to the root
    (root / "a" / "b" / "up").symlink_to("../..")  # symlink_loop: back to an ancestor
    (root / "linked_a").symlink_to("a")  # linked_dir_seen: a second way into a/
    (root / "broken.jpg").symlink_to("does_not_exist.jpg")  # broken_symlink
    os.mkfifo(root / "pipe.jpg")  # not_regular
    fd = os.open(os.path.join(os.fsencode(root), b"latin1_\xe9t\xe9.jpg"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, encode(picture(27)))  # bad_name: not valid UTF-8
    os.close(fd)
    _write(root / "skip" / "thumbs" / "t.jpg", encode(picture(28)))  # excluded by the glob
    return root


def write_imagenet(root: str | Path, *, classes: int = 3, per_class: int = 4, val: int = 5,
                   kaggle: bool = False, val_folders: bool = False) -> Path:
    """ILSVRC-2012 layout: train/<wnid>/<wnid>_<k>.JPEG, flat val/ILSVRC2012_val_<n>.JPEG + LOC_val_solution.csv
    (labels for all but the last val image), LOC_synset_mapping.txt; ``val_folders``: val/<wnid>/ instead (the last
    image in an unknown class folder). Like the real set, one training "JPEG" is a PNG
    and one is CMYK; val image 1 has the same bytes as a training image; a stray file sits directly in train/."""
    root = Path(root)
    base = root / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else root
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    seed = 0
    first = None
    for c, wnid in enumerate(wnids):
        for k in range(per_class):
            seed += 1
            arr = picture(seed, 40 + 4 * k, 32 + 2 * c)
            data = encode(arr, "PNG") if (c, k) == (1, 0) else encode(arr, mode="CMYK") if (c, k) == (2, 1) \
                else encode(arr)
            p = _write(base / "train" / wnid / f"{wnid}_{k + 1}.JPEG", data)
            first = first or p
    _write(base / "train" / "stray.JPEG", encode(picture(99)))  # no_class
    lines = ["ImageId,PredictionString"]
    for n in range(1, val + 1):
        stem = f"ILSVRC2012_val_{n:08d}"
        data = first.read_bytes() if n == 1 else encode(picture(100 + n, 36, 36))
        folder = (wnids[n % classes] if n < val else "n99999999") if val_folders else ""
        _write(base / "val" / folder / f"{stem}.JPEG", data)
        if n < val:
            lines.append(f"{stem},{wnids[n % classes]} 1 2 30 30")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}, a name\n" for i, w in enumerate(wnids)))
    return root
