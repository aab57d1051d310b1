"""Textures of the generated scenes: what tells thing categories (object-local patterns) and stuff (backgrounds) apart.

Colour is random per instance and per image, so texture (with shape, for things) is the reliable cue. The first 12
thing textures and 8 stuff textures are the demo's; the rest serve the "more classes" variant (``scenes.
num_thing_classes`` up to 24, ``num_stuff_classes`` up to 16). Object patterns are evaluated in the object's own
rotated frame, so each must differ from every other one under rotation, not only as drawn.
"""
from __future__ import annotations

import numpy as np

def _value_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth random field in [0, 1], (h, w): random lattice values, smoothstep-interpolated."""
    grid = rng.random((cells_y + 1, cells_x + 1), dtype=np.float32)
    y = ((np.arange(h) + 0.5) / h * cells_y).astype(np.float32)
    x = ((np.arange(w) + 0.5) / w * cells_x).astype(np.float32)
    y0, x0 = np.minimum(y.astype(int), cells_y - 1), np.minimum(x.astype(int), cells_x - 1)
    ty, tx = y - y0, x - x0
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    top = a + (b - a) * tx[None]
    bot = c + (d - c) * tx[None]
    return top + (bot - top) * ty[:, None]


def _thing_pattern(texture: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0, 1] at object-local pixel coords ``u, v`` (rotated with the object), ``period`` px."""
    p = period
    if texture == "stripes":
        return (np.sin(2 * np.pi * u / p) > 0).astype(np.float32)
    if texture == "checker":
        return ((np.floor(u / p * 2) + np.floor(v / p * 2)) % 2).astype(np.float32)
    if texture == "dots":
        du, dv = (u / p) % 1 - 0.5, (v / p) % 1 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if texture == "radial":
        return (np.sin(8 * np.arctan2(v, u)) > 0).astype(np.float32)
    if texture == "grid":
        return (((u / p) % 1 < 0.3) | ((v / p) % 1 < 0.3)).astype(np.float32)
    if texture == "concentric":
        return (np.sin(2 * np.pi * np.hypot(u, v) / p) > 0).astype(np.float32)
    if texture == "zigzag":
        tri = np.abs((u / p) % 1 - 0.5) * p
        return (((v + tri) / p) % 1 < 0.5).astype(np.float32)
    if texture == "crosshatch":
        return ((((u + v) / p) % 1 < 0.25) | (((u - v) / p) % 1 < 0.25)).astype(np.float32)
    if texture == "speckle":
        return (rng.random(u.shape) < 0.35).astype(np.float32)
    if texture == "gradient":
        span = max(float(np.ptp(u)), 1.0)
        return ((u - u.min()) / span).astype(np.float32)
    if texture == "waves":
        return (0.5 + 0.5 * np.sin(2 * np.pi * (v + 0.35 * p * np.sin(2 * np.pi * u / p)) / p)).astype(np.float32)
    if texture == "plaid":
        return (0.5 * (np.sin(2 * np.pi * u / p) > 0) + 0.5 * (np.sin(2 * np.pi * v / (1.7 * p)) > 0)).astype(
            np.float32
        )
    return _thing_pattern_extra(texture, u, v, p)


def _thing_pattern_extra(texture: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """The "more classes" object textures (deterministic: no random draws, so the default images never change)."""
    if texture == "spiral":
        return (np.sin(3 * np.arctan2(v, u) + 2 * np.pi * np.hypot(u, v) / p) > 0).astype(np.float32)
    if texture == "triangles":
        return (((u / p) % 1 + (v / p) % 1) < 1).astype(np.float32)
    if texture == "barcode":
        return (np.sin(2 * np.pi * u / p) + 0.8 * np.sin(6 * np.pi * u / p + 1.0) > 0.3).astype(np.float32)
    if texture == "vignette":
        return np.clip(1.0 - np.hypot(u, v) / (2.5 * p), 0.0, 1.0).astype(np.float32)
    if texture == "dartboard":
        return ((np.sin(2 * np.pi * np.hypot(u, v) / p) > 0) ^ (np.sin(6 * np.arctan2(v, u)) > 0)).astype(np.float32)
    if texture == "scales":
        row = np.floor(v / p)
        du, dv = (u / p + 0.5 * (row % 2)) % 1 - 0.5, (v / p) % 1
        return ((du * du + dv * dv) < 0.25).astype(np.float32)
    if texture == "camo":
        w = np.sin(u / p * 2.1) + np.sin(v / p * 1.7 + 1.3) + np.sin((u + v) / p * 1.3 + 0.7)
        return (w > 0.4).astype(np.float32)
    if texture == "dashes":
        return ((np.sin(2 * np.pi * v / p) > 0.5) & ((u / (1.5 * p)) % 1 < 0.6)).astype(np.float32)
    if texture == "plus_lattice":
        du, dv = np.abs((u / p) % 1 - 0.5), np.abs((v / p) % 1 - 0.5)
        return (((du < 0.08) & (dv < 0.35)) | ((dv < 0.08) & (du < 0.35))).astype(np.float32)
    if texture == "hollow_squares":
        d = np.maximum(np.abs((u / p) % 1 - 0.5), np.abs((v / p) % 1 - 0.5))
        return ((d > 0.22) & (d < 0.36)).astype(np.float32)
    if texture == "weave":
        tile = (np.floor(u / p) + np.floor(v / p)) % 2 == 0
        return np.where(tile, np.sin(4 * np.pi * v / p) > 0, np.sin(4 * np.pi * u / p) > 0).astype(np.float32)
    if texture == "ripple":
        du, dv = (u / p) % 1 - 0.5, (v / p) % 1 - 0.5
        return (np.sin(6 * np.pi * np.hypot(du, dv)) > 0).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _stuff_image(texture: str, base: np.ndarray, rng: np.random.Generator, s: int) -> np.ndarray:
    """One stuff class over the whole (s, s) image -> (s, s, 3) float RGB in [0, 1]."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    if texture == "sky":
        t = 0.75 + 0.35 * (y / s) + 0.1 * _value_noise(rng, s, s, 2, 3)
    elif texture == "grass":
        t = 0.6 + 0.6 * _value_noise(rng, s, s, max(2, s // 24), max(4, s // 3))
    elif texture == "water":
        n = _value_noise(rng, s, s, 3, 3)
        t = 0.8 + 0.25 * np.sin(2 * np.pi * (y / max(4.0, s / 14) + 1.5 * n))
    elif texture == "sand":
        t = 0.85 + 0.3 * rng.random((s, s)) * 0.5 + 0.1 * _value_noise(rng, s, s, 4, 4)
    elif texture == "bricks":
        bh = max(4.0, s / 12)
        row = np.floor(y / bh)
        xs = x + (row % 2) * bh
        mortar = ((y % bh) < 1.2) | ((xs % (2 * bh)) < 1.2)
        t = np.where(mortar, 1.45, 0.85 + 0.1 * _value_noise(rng, s, s, 6, 6))
    elif texture == "wood":
        n = _value_noise(rng, s, s, 2, 4)
        t = 0.8 + 0.25 * np.sin(2 * np.pi * (x / max(3.0, s / 20) + 3.0 * n))
    elif texture == "gravel":
        t = 0.55 + 0.9 * (_value_noise(rng, s, s, max(3, s // 10), max(3, s // 10)) > 0.5) * 0.5 + 0.1 * rng.random(
            (s, s)
        )
    elif texture == "fog":
        t = 0.7 + 0.5 * _value_noise(rng, s, s, 3, 3)
    else:
        t = _stuff_texture_extra(texture, rng, s, y, x)
    return np.clip(t[..., None] * base[None, None], 0.0, 1.0).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random saturated colour (RGB in [0,1]) from random hue/saturation/value."""
    hue, sat, val = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6) % 6
    return (val - val * sat * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _stuff_texture_extra(texture: str, rng: np.random.Generator, s: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The "more classes" stuff textures: brightness field (s, s) around 1 (multiplied by the class's base colour)."""
    if texture == "snow":
        return 0.95 + 0.08 * _value_noise(rng, s, s, 3, 3) + 0.12 * (rng.random((s, s)) < 0.03)
    if texture == "rock":
        n = _value_noise(rng, s, s, max(3, s // 16), max(3, s // 16))
        return 0.6 + 0.8 * n + 0.25 * (np.abs(n - 0.5) < 0.03)
    if texture == "tiles":
        cell = max(6.0, s / 8)
        grout = ((y % cell) < 1.5) | ((x % cell) < 1.5)
        return np.where(grout, 0.55, 1.0 + 0.05 * _value_noise(rng, s, s, 8, 8))
    if texture == "leaves":
        n = _value_noise(rng, s, s, max(4, s // 8), max(4, s // 8))
        return 0.6 + 0.9 * (n > 0.45) * n
    if texture == "carpet":
        return 0.85 + 0.12 * np.sin(2 * np.pi * x / 3.0) * np.sin(2 * np.pi * y / 3.0) + 0.1 * rng.random((s, s))
    if texture == "clouds":
        n = _value_noise(rng, s, s, 3, 4)
        return 0.8 + 0.5 * np.clip((n - 0.4) * 3.0, 0.0, 1.0)
    if texture == "mud":
        return 0.75 + 0.25 * _value_noise(rng, s, s, 5, 5) + 0.15 * _value_noise(rng, s, s, max(3, s // 6), 3)
    if texture == "asphalt":
        lane = np.abs(x - s / 2) < max(1.0, s / 64)
        return np.where(lane & ((y % (s / 6)) < s / 12), 2.6, 0.85 + 0.2 * rng.random((s, s)))
    raise ValueError(f"unknown stuff texture {texture!r}")
