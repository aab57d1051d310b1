"""Where view B's patches lie in view A: SIM's relative positions and their sin-cos embeddings.

View B's patches in view A's frame (:func:`relative_positions`), the sin-cos tables of A's own tokens
(:func:`sincos_2d`) and of B's mask tokens (:func:`relative_embedding`).
"""
from __future__ import annotations

import torch

__all__ = ["relative_positions", "sincos_1d", "sincos_2d", "relative_embedding", "grid_positions"]

SCALE_FACTOR = 10.0  # the authors multiply log-scales by 10 before the sin-cos (a log-ratio of 0.1 -> 1 radian)


def grid_positions(grid: tuple[int, int], device=None) -> torch.Tensor:
    """``(gh * gw, 2)`` integer (row, col) of a grid's patches, row-major (the order of ViT's patch tokens)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device, dtype=torch.float32),
                                torch.arange(grid[1], device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def relative_positions(boxes: torch.Tensor, flips: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """View B's patch centres in view A's patch grid, and B's log size relative to A.

    Args:
        boxes: ``(B, 2, 4)`` crop boxes ``(x0, y0, x1, y1)`` in original-image pixels, A = index 0, B = index 1.
        flips: ``(B, 2)`` bool, horizontal flip of A / B after cropping.
        grid: ``(n_h, n_w)`` patches per view (both views have the same grid).
    Returns:
        ``pos`` ``(B, n_h * n_w, 2)`` float32 (row, col) in A's grid units, row-major over B's patches;
        ``log_scale`` ``(B, 2)`` float32 ``(log(h_B / h_A), log(w_B / w_A))``.

    The online branch predicts view B's tokens from view A; each mask token is told *where* its patch of B lies, in
    view A's frame (A's top-left corner = origin, unit = one of A's patches), and how much larger B is than A (SIM Sec.
    3.2; the authors' ``get_2d_sincos_pos_embed_relative``). From the crop boxes in original pixels,
    ``(x0, y0, x1, y1)`` of A and B (``h = y1 - y0``, ``w = x1 - x0``), and the horizontal flips applied after cropping,
    patch ``(u, v)`` of B (row, column as displayed, centre at ``((u + ½)/n, (v + ½)/n)`` of B) sits at::

        s   = (v + ½)/n_w,  or 1 − (v + ½)/n_w if B is flipped       # B's column in B's un-flipped crop, [0, 1]
        x   = x0_B + s · w_B,   y = y0_B + (u + ½)/n_h · h_B         # original-image pixels
        a   = (x − x0_A)/w_A,  or 1 − (x − x0_A)/w_A if A is flipped  # A's displayed column, [0, 1] inside A
        row = (y − y0_A)/h_A · n_h − ½,   col = a · n_w − ½           # A's patch-grid units

    so B = A (no flips) gives exactly A's integer patch indices, the positions of A's own tokens. The scale terms are
    ``log(h_B / h_A)`` and ``log(w_B / w_A)`` (flips change nothing there). The authors flip the whole image before
    cropping; their ``(i2 − i1)/h1, (j2 − j1)/w1, relative_flip, (W − j1 − j2)/w1`` parametrisation gives the same
    numbers (``tests/pretrain/methods/test_sim.py`` checks both against hand-computed values).
    """
    boxes = boxes.float()
    flips = flips.bool()
    nh, nw = grid
    x0a, y0a, x1a, y1a = boxes[:, 0].unbind(-1)
    x0b, y0b, x1b, y1b = boxes[:, 1].unbind(-1)
    ha, wa, hb, wb = y1a - y0a, x1a - x0a, y1b - y0b, x1b - x0b
    u = (torch.arange(nh, device=boxes.device, dtype=torch.float32) + 0.5) / nh  # (nh,)
    v = (torch.arange(nw, device=boxes.device, dtype=torch.float32) + 0.5) / nw  # (nw,)
    s = torch.where(flips[:, 1:2], 1.0 - v, v)  # (B, nw): B's columns in its un-flipped crop
    x = x0b[:, None] + s * wb[:, None]
    a = (x - x0a[:, None]) / wa[:, None]
    a = torch.where(flips[:, 0:1], 1.0 - a, a)  # (B, nw): A's displayed column
    row = (y0b[:, None] + u * hb[:, None] - y0a[:, None]) / ha[:, None] * nh - 0.5  # (B, nh)
    col = a * nw - 0.5
    pos = torch.stack([row[:, :, None].expand(-1, nh, nw), col[:, None, :].expand(-1, nh, nw)], dim=-1)
    log_scale = torch.stack([torch.log(hb / ha), torch.log(wb / wa)], dim=-1)
    return pos.reshape(boxes.shape[0], nh * nw, 2), log_scale


def sincos_1d(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``(...,)`` -> ``(..., dim)``: ``[sin(x ω), cos(x ω)]`` with ω_k = 10000^(−k/(dim/2)), k < dim/2."""
    if dim % 2:
        raise ValueError(f"sin-cos width {dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=values.device, dtype=torch.float32) / (dim / 2))
    out = values.float()[..., None] * omega
    return torch.cat([out.sin(), out.cos()], dim=-1)


def sincos_2d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """``(..., 2)`` (row, col) -> ``(..., dim)``: half the width for the row, half for the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos width {dim} must be a multiple of 4")
    return torch.cat([sincos_1d(pos[..., 0], dim // 2), sincos_1d(pos[..., 1], dim // 2)], dim=-1)


def relative_embedding(pos: torch.Tensor, log_scale: torch.Tensor, dim: int) -> torch.Tensor:
    """``pos`` ``(B, L, 2)``, ``log_scale`` ``(B, 2)`` -> ``(B, L, 2 * dim)``: :func:`sincos_2d` of the positions
    (``dim`` values, equal to A's own table at integer positions) then the sin-cos of ``10 · log`` scale of rows and
    of columns (``dim / 2`` each), the same for every patch of a sample.

    Embeddings (MAE/MoCo v3's 1-D sin-cos with ω_k = 10000^(−k/(D/4)), k < D/4): A's own tokens get the fixed 2-D
    table ``[sin(row ω), cos(row ω), sin(col ω), cos(col ω)]`` (D values); B's mask tokens get that at their
    fractional positions plus ``[sin(10 log s_h ω), cos(…), sin(10 log s_w ω), cos(…)]`` (2·D values), which the model
    maps to D with a linear layer (the authors' ``decoder_pos_mlp``). The first D values of B's embedding equal A's
    table at the same positions.
    """
    scale = sincos_2d(SCALE_FACTOR * log_scale, dim)  # (B, dim)
    return torch.cat([sincos_2d(pos, dim), scale[:, None, :].expand(-1, pos.shape[1], -1)], dim=-1)
