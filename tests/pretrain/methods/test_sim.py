"""SIM's parts on small tensors: UniGrad (per-token reference, explicit gradient, global/dense split), relative
positions (hand-computed boxes, scales and flips; the authors' parametrisation), the block mask, the encoding of
visible tokens only, the model, its params and the method's hooks."""
from __future__ import annotations

import math

import pytest
import torch

from components.pretrain.methods.sim.losses import correlation, sim_loss, target_health, unigrad
from components.pretrain.methods.sim.masking import DrawCropsAndMask, block_mask, default_min_block, num_masked_patches
from components.pretrain.methods.sim.positions import grid_positions, relative_embedding, relative_positions, sincos_2d

TINY = dict(arch="vit_demo_16", image_size=64, decoder_dim=32, decoder_heads=2, projector_depth=1, predictor_depth=1)


# --------------------------------------------------------------------------------------------------------------------
# UniGrad
# --------------------------------------------------------------------------------------------------------------------
def _unigrad_loop(p: torch.Tensor, t: torch.Tensor, lam: float) -> float:
    """The paper's formula token by token, in float64: F = (1/N) Σ t tᵀ; L = [(1/N) Σ ‖p − t‖² + λ (1/N) Σ pᵀFp] / D."""
    n, d = p.shape
    p, t = p.double(), t.double()
    corr = torch.zeros(d, d, dtype=torch.float64)
    for i in range(n):
        corr += torch.outer(t[i], t[i]) / n
    pos = neg = 0.0
    for i in range(n):
        pos += float(((p[i] - t[i]) ** 2).sum()) / n
        neg += sum(float(p[i, a] * corr[a, b] * p[i, b]) for a in range(d) for b in range(d)) / n
    return (pos + lam * neg) / d


@pytest.mark.parametrize("n,d", [(1, 3), (7, 5), (16, 4)])
@pytest.mark.parametrize("lam", [0.0, 0.02, 0.7])
def test_unigrad_matches_per_token_formula(n, d, lam):
    g = torch.Generator().manual_seed(n * 10 + d)
    p, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    loss, parts = unigrad(p, t, lam)
    assert loss.item() == pytest.approx(_unigrad_loop(p, t, lam), rel=1e-5, abs=1e-6)
    assert (parts["pos"] + lam * parts["neg"]).item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(parts["corr"], t.T @ t / n)


@pytest.mark.parametrize("lam", [0.02, 0.5])
def test_unigrad_gradient_is_the_explicit_form(lam):
    """∂L/∂p_n = [2 (p_n − t_n) + 2 λ F p_n] / (N D); the targets (and F) get no gradient."""
    g = torch.Generator().manual_seed(3)
    n, d = 9, 6
    p = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    t = torch.randn(n, d, generator=g).requires_grad_()
    loss, _ = unigrad(p, t, lam)
    loss.backward()
    corr = (t.T @ t / n).detach()
    explicit = (2 * (p - t) + 2 * lam * p @ corr).detach() / (n * d)
    torch.testing.assert_close(p.grad, explicit, rtol=1e-5, atol=1e-7)
    assert t.grad is None


def test_correlation_is_all_reduced_and_detached():
    t = torch.randn(5, 3, requires_grad=True)
    calls = []

    def fake_all_reduce(x):
        calls.append(x.shape)
        return x * 0 + 1.0

    corr = correlation(t, fake_all_reduce)
    assert calls == [(3, 3)] and not corr.requires_grad and torch.equal(corr, torch.ones(3, 3))


def test_sim_loss_released_form_and_paper_split():
    g = torch.Generator().manual_seed(0)
    b, l, d = 3, 5, 8
    pred, target = torch.randn(b, l, d, generator=g), torch.randn(b, l, d, generator=g) * 3 + 1
    t = torch.nn.functional.layer_norm(target, (d,))
    # alpha1 = 0: alpha2 * UniGrad over the raw tokens against LayerNormed targets (the released code)
    loss, stats = sim_loss(pred, target, neg_weight=0.02, global_weight=0.0, dense_weight=2.0)
    assert loss.item() == pytest.approx(2.0 * _unigrad_loop(pred.reshape(-1, d), t.reshape(-1, d), 0.02), rel=1e-5)
    assert stats["loss_global"].item() == 0.0
    # alpha1 > 0: UniGrad on image means + UniGrad on tokens minus their image mean
    loss, stats = sim_loss(pred, target, neg_weight=0.02, global_weight=1.0, dense_weight=4.0)
    pm, tm = pred.mean(1), t.mean(1)
    glob = _unigrad_loop(pm, tm, 0.02)
    dense = _unigrad_loop((pred - pm[:, None]).reshape(-1, d), (t - tm[:, None]).reshape(-1, d), 0.02)
    assert loss.item() == pytest.approx(glob + 4.0 * dense, rel=1e-5)
    assert stats["loss_global"].item() == pytest.approx(glob, rel=1e-5)
    assert stats["loss_dense"].item() == pytest.approx(dense, rel=1e-5)
    # lambda = 0: the split with alpha1 = alpha2 = 1 is exactly the raw dense alignment (the docstring's identity)
    split, _ = sim_loss(pred, target, neg_weight=0.0, global_weight=1.0, dense_weight=1.0)
    raw, _ = sim_loss(pred, target, neg_weight=0.0, global_weight=0.0, dense_weight=1.0)
    assert split.item() == pytest.approx(raw.item(), rel=1e-5)


def test_sim_loss_online_ln_and_fp32():
    pred = (torch.randn(2, 4, 8) * 5).to(torch.bfloat16)
    target = torch.randn(2, 4, 8).to(torch.bfloat16)
    loss, _ = sim_loss(pred, target, online_ln=True)
    assert loss.dtype == torch.float32
    p = torch.nn.functional.layer_norm(pred.float(), (8,))
    t = torch.nn.functional.layer_norm(target.float(), (8,))
    assert loss.item() == pytest.approx(_unigrad_loop(p.reshape(-1, 8), t.reshape(-1, 8), 0.02), rel=1e-5)


def test_target_health_tells_collapse_from_white_targets():
    white = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    h = target_health(white, correlation(white))
    assert h["target_std"].item() == pytest.approx(1.0, abs=0.05) and h["target_erank"].item() > 15
    collapsed = torch.randn(1, 16).expand(100, 16)
    h = target_health(collapsed, correlation(collapsed))
    assert h["target_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert h["target_erank"].item() == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# relative positions
# --------------------------------------------------------------------------------------------------------------------
def _pos(box_a, box_b, flip_a, flip_b, grid=(2, 2)):
    boxes = torch.tensor([[box_a, box_b]], dtype=torch.float32)
    flips = torch.tensor([[flip_a, flip_b]])
    pos, log_scale = relative_positions(boxes, flips, grid)
    return pos[0].reshape(grid[0], grid[1], 2), log_scale[0]


A = (0, 0, 50, 50)  # x0, y0, x1, y1 in a 100 x 100 image
B = (25, 0, 75, 50)  # half a crop to the right: B's patch columns sit at A's columns 1 and 2


@pytest.mark.parametrize("flip_a,flip_b,cols", [
    (False, False, [1.0, 2.0]),  # B's centres at x = 37.5, 62.5 -> 0.75, 1.25 of A -> 2 * . - 0.5
    (False, True, [2.0, 1.0]),  # B flipped: its first displayed column is its right half
    (True, False, [0.0, -1.0]),  # A flipped: A's displayed column = 1 - 0.75, 1 - 1.25
    (True, True, [-1.0, 0.0]),  # both: B's displayed columns at x = 62.5, 37.5 -> 1 - 1.25, 1 - 0.75
])
def test_relative_positions_hand_computed_flips(flip_a, flip_b, cols):
    pos, log_scale = _pos(A, B, flip_a, flip_b)
    torch.testing.assert_close(pos[..., 0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))  # same rows as A
    torch.testing.assert_close(pos[..., 1], torch.tensor([cols, cols]))
    torch.testing.assert_close(log_scale, torch.zeros(2))


def test_relative_positions_hand_computed_scale():
    """B = the whole image (twice A's size in each direction), A = its top-left quarter shifted by 10 px."""
    pos, log_scale = _pos((10, 10, 60, 60), (0, 0, 100, 100), False, False)
    # B's centres at 25 and 75 px -> (25 - 10) / 50 = 0.3 and 1.3 of A -> 0.3 * 2 - 0.5 = 0.1, 2.1
    torch.testing.assert_close(pos[..., 0], torch.tensor([[0.1, 0.1], [2.1, 2.1]]))
    torch.testing.assert_close(pos[..., 1], torch.tensor([[0.1, 2.1], [0.1, 2.1]]))
    torch.testing.assert_close(log_scale, torch.full((2,), math.log(2.0)))
    pos, log_scale = _pos((0, 0, 100, 40), (0, 0, 50, 80), False, True)  # non-square: h x2, w x0.5, B flipped
    torch.testing.assert_close(log_scale, torch.tensor([math.log(2.0), math.log(0.5)]))
    torch.testing.assert_close(pos[0, :, 1], torch.tensor([0.25, -0.25]))  # x = 37.5, 12.5 -> 0.375, 0.125 of A


def test_identical_views_get_a_own_positions_and_table():
    """B = A: integer patch indices (A's own tokens' positions); with A flipped and B not, the columns mirror."""
    grid = (3, 4)
    pos, log_scale = relative_positions(torch.tensor([[[5, 7, 45, 37], [5, 7, 45, 37]]]).float(),
                                        torch.tensor([[False, False]]), grid)
    torch.testing.assert_close(pos[0], grid_positions(grid))
    emb = relative_embedding(pos, log_scale, 16)
    assert emb.shape == (1, 12, 32)
    torch.testing.assert_close(emb[0, :, :16], sincos_2d(grid_positions(grid), 16))  # A's own 2-D table
    torch.testing.assert_close(emb[0, :, 16:], sincos_2d(torch.zeros(12, 2), 16))  # log-scale 0
    pos, _ = relative_positions(torch.tensor([[[5, 7, 45, 37], [5, 7, 45, 37]]]).float(),
                                torch.tensor([[True, False]]), grid)
    torch.testing.assert_close(pos[0, :, 1], 3.0 - grid_positions(grid)[:, 1])


def _authors_positions(box_a, box_b, flip_a, flip_b, width, n):
    """The released code's parametrisation: each view's (i, j) in its own (flipped-first) image, then
    ``get_2d_sincos_pos_embed_relative``'s grid arithmetic (grid units, before the sin-cos)."""
    def ij(box, flip):
        x0, y0, x1, y1 = box
        return y0, (width - x1 if flip else x0), y1 - y0, x1 - x0

    i1, j1, h1, w1 = ij(box_a, flip_a)
    i2, j2, h2, w2 = ij(box_b, flip_b)
    d_i, d_j, d_h, d_w = (i2 - i1) / h1 * n, (j2 - j1) / w1 * n, h2 / h1, w2 / w1
    rel_flip, flip_dj = flip_a != flip_b, (width - j1 - j2) / w1 * n
    raw = torch.arange(n, dtype=torch.float64) + 0.5
    rows = d_h * raw + d_i - 0.5
    cols = (-d_w * raw + flip_dj if rel_flip else d_w * raw + d_j) - 0.5
    return rows, cols


def test_relative_positions_equal_the_authors_parametrisation():
    g = torch.Generator().manual_seed(0)
    width, n = 200, 5
    for _ in range(20):
        a = torch.randint(0, 100, (2,), generator=g).tolist()
        b = torch.randint(0, 100, (2,), generator=g).tolist()
        box_a = (a[0], a[1], a[0] + int(torch.randint(20, 100, (), generator=g)), a[1] + 60)
        box_b = (b[0], b[1], b[0] + int(torch.randint(20, 100, (), generator=g)), b[1] + 45)
        for flip_a in (False, True):
            for flip_b in (False, True):
                pos, _ = _pos(box_a, box_b, flip_a, flip_b, grid=(n, n))
                rows, cols = _authors_positions(box_a, box_b, flip_a, flip_b, width, n)
                torch.testing.assert_close(pos[:, 0, 0].double(), rows, rtol=0, atol=1e-4)
                torch.testing.assert_close(pos[0, :, 1].double(), cols, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# block mask
# --------------------------------------------------------------------------------------------------------------------
def _components(mask: torch.Tensor) -> int:
    """4-connected components of the masked patches (flood fill)."""
    seen = torch.zeros_like(mask)
    h, w = mask.shape
    count = 0
    for i in range(h):
        for j in range(w):
            if mask[i, j] and not seen[i, j]:
                count += 1
                stack = [(i, j)]
                while stack:
                    y, x = stack.pop()
                    if 0 <= y < h and 0 <= x < w and mask[y, x] and not seen[y, x]:
                        seen[y, x] = True
                        stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return count


def _neighbour_share(mask: torch.Tensor) -> float:
    """Share of masked patches with a masked 4-neighbour."""
    m = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
    nb = m[:-2, 1:-1] + m[2:, 1:-1] + m[1:-1, :-2] + m[1:-1, 2:]
    return float(((nb > 0) & mask).sum() / mask.sum())


@pytest.mark.parametrize("grid,ratio", [((14, 14), 118 / 196), ((12, 12), 0.6), ((4, 4), 0.5), ((6, 9), 0.3)])
def test_block_mask_exact_count_and_contiguous(grid, ratio):
    g = torch.Generator().manual_seed(1)
    n = num_masked_patches(grid, ratio)
    comps, shares, rand_shares = [], [], []
    for _ in range(30):
        m = block_mask(grid, n, g)
        assert m.shape == grid and m.dtype == torch.bool and int(m.sum()) == n
        comps.append(_components(m))
        shares.append(_neighbour_share(m))
        r = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
        r[torch.randperm(r.numel(), generator=g)[:n]] = True
        rand_shares.append(_neighbour_share(r.view(grid)))
    if grid == (14, 14):
        assert n == 118
        # blocks: a few large rectangles, nearly every masked patch touches another (random masking: far fewer)
        assert sum(comps) / len(comps) < 8 and min(shares) > 0.95
    assert sum(shares) / len(shares) > sum(rand_shares) / len(rand_shares) or grid == (4, 4)


def test_block_mask_is_seeded_and_scales_min_block():
    a = block_mask((14, 14), 118, torch.Generator().manual_seed(5))
    b = block_mask((14, 14), 118, torch.Generator().manual_seed(5))
    c = block_mask((14, 14), 118, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert default_min_block((14, 14)) == 16 and default_min_block((12, 12)) == 12 and default_min_block((2, 2)) == 1
    with pytest.raises(ValueError):
        block_mask((4, 4), 16)
    assert num_masked_patches((4, 4), 0.999) == 15 and num_masked_patches((4, 4), 0.001) == 1


def test_loader_map_fn_adds_a_seeded_mask_that_collates():
    from components.pretrain.views import collate_pairs

    def sample(key):
        return {"key": key, "url": "shard-0.tar", "image": torch.zeros(3, 40, 50, dtype=torch.uint8)}

    draw = DrawCropsAndMask(0, 1, 0, (0.08, 1.0), grid=(4, 4), num_masked=9)
    s1, s2, s1b = draw(sample("a")), draw(sample("b")), draw(sample("a"))  # "a" again: a new occurrence
    batch = collate_pairs([s1, s2, s1b])
    assert batch["mask"].shape == (3, 16) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(1).tolist() == [9, 9, 9] and batch["boxes"].shape == (3, 2, 4)
    again = DrawCropsAndMask(0, 1, 0, (0.08, 1.0), grid=(4, 4), num_masked=9)(sample("a"))
    assert torch.equal(again["crops"]["mask"], s1["crops"]["mask"])  # a restarted epoch redraws the same mask


# --------------------------------------------------------------------------------------------------------------------
# encoding only the visible tokens
# --------------------------------------------------------------------------------------------------------------------
def _reference_masked_encoder(net, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """torchvision's encoder on the FULL sequence, masked patches excluded from attention as keys (their own
    outputs are junk): the visible tokens' outputs must equal encoding the visible tokens alone."""
    tokens = net._process_input(x)
    seq = torch.cat([net.class_token.expand(x.shape[0], -1, -1), tokens], 1) + net.encoder.pos_embedding
    pad = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.bool), masked], 1)
    for block in net.encoder.layers:
        y = block.ln_1(seq)
        y, _ = block.self_attention(y, y, y, key_padding_mask=pad, need_weights=False)
        seq = seq + y
        seq = seq + block.mlp(block.ln_2(seq))
    return net.encoder.ln(seq)


def test_visible_token_encoding_equals_reference_paths():
    from components.backbone import build_vit, vit_tokens
    from components.pretrain.methods.sim.model import visible_indices

    torch.manual_seed(0)
    net = build_vit("vit_demo_16", 64, head="identity").eval()
    x = torch.randn(3, 3, 64, 64)
    # no mask: exactly torchvision's VisionTransformer forward (class token) and its encoder (every token)
    full = vit_tokens(net, x)
    torch.testing.assert_close(full[:, 0], net(x), rtol=0, atol=1e-5)
    ref = net.encoder(torch.cat([net.class_token.expand(3, -1, -1), net._process_input(x)], 1))
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-5)
    # a block mask: only the visible tokens enter == the full sequence with the masked ones out of attention
    g = torch.Generator().manual_seed(0)
    masked = torch.stack([block_mask((4, 4), 9, g).flatten() for _ in range(3)])
    keep = visible_indices(masked, 7)
    assert torch.equal(torch.sort(keep, 1).values, keep) and not masked.gather(1, keep).any()
    enc = vit_tokens(net, x, keep)
    ref = _reference_masked_encoder(net, x, masked)
    torch.testing.assert_close(enc[:, 0], ref[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(enc[:, 1:], ref[:, 1:].gather(1, keep[..., None].expand(-1, -1, ref.shape[-1])),
                               rtol=0, atol=1e-5)


def test_vit_runs_other_sizes_and_strict_loader_resizes_positions():
    from components.backbone import build_vit, load_trunk, resize_pos_embedding, vit_feature_map, vit_image_size
    from components.errors import UserError

    net = build_vit("vit_demo_16", 64)
    assert vit_feature_map(net, torch.randn(2, 3, 96, 80)).shape == (2, 192, 6, 5)
    pos = net.encoder.pos_embedding
    assert resize_pos_embedding(pos, (4, 4)) is pos and resize_pos_embedding(pos, (6, 5)).shape == (1, 31, 192)
    sd = net.state_dict()
    assert vit_image_size("vit_demo_16", sd) == 64
    other = build_vit("vit_demo_16", 128)
    load_trunk(other, sd, arch="vit_demo_16", source="b.pt")  # 4x4 positions -> 8x8
    torch.testing.assert_close(other.encoder.pos_embedding, resize_pos_embedding(pos, (8, 8)))
    with pytest.raises(UserError, match=r"b\.pt: .*missing 1 keys: class_token"):
        load_trunk(other, {k: v for k, v in sd.items() if k != "class_token"}, arch="vit_demo_16", source="b.pt")
    with pytest.raises(UserError, match="not a multiple"):
        build_vit("vit_demo_16", 30)


# --------------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------------
def _inputs(b: int, size: int, num_masked: int, grid, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([[10, 10, 60, 70], [30, 0, 90, 50]], dtype=torch.float32).repeat(b, 1, 1)
    boxes += torch.randint(0, 10, (b, 2, 4), generator=g).float()
    return {"view1": torch.randn(b, 3, size, size, generator=g), "view2": torch.randn(b, 3, size, size, generator=g),
            "mask": torch.stack([block_mask(grid, num_masked, g).flatten() for _ in range(b)]), "boxes": boxes,
            "flip1": torch.rand(b, generator=g) < 0.5, "flip2": torch.rand(b, generator=g) < 0.5}


def test_model_step_predictions_ignore_masked_pixels_and_grads_reach_the_student_only():
    from components.pretrain.methods.sim.model import SIM

    torch.manual_seed(0)
    model = SIM(**TINY, norm="ln")
    inputs = _inputs(4, 64, model.num_masked, model.grid)
    out = model(**inputs)
    assert set(out) == {"loss", "loss_dense", "loss_global", "loss_pos", "loss_neg", "target_std", "target_erank"}
    out["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("teacher_") or name in ("student_encoder.encoder.pos_embedding",) \
                or name.startswith(("student_encoder.conv_proj", "student_encoder.encoder.ln")):
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the masked patches of view A never reach the encoder: changing their pixels changes no prediction
    from components.pretrain.methods.sim.model import visible_indices

    keep = visible_indices(inputs["mask"], model.num_patches - model.num_masked)
    flips = torch.stack([inputs["flip1"], inputs["flip2"]], 1)
    pred = model.predict(inputs["view1"], keep, inputs["boxes"], flips)
    pix = inputs["mask"].view(4, 1, 4, 1, 4, 1).expand(4, 3, 4, 16, 4, 16).reshape(4, 3, 64, 64)
    noisy = torch.where(pix, torch.randn_like(inputs["view1"]) * 10, inputs["view1"])
    torch.testing.assert_close(model.predict(noisy, keep, inputs["boxes"], flips), pred, rtol=0, atol=1e-5)
    # ... while a visible patch does
    vis = ~inputs["mask"][0].view(4, 4)
    i, j = vis.nonzero()[0].tolist()
    poked = inputs["view1"].clone()
    poked[0, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16] += 5
    assert not torch.allclose(model.predict(poked, keep, inputs["boxes"], flips)[0], pred[0], atol=1e-3)


def _released_encoder(net, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The released SIM encoder (MAE's ``forward_encoder`` structure), sample by sample: patch projection + sin-cos
    positions, the visible patches only, the class token (position 0) in front, the blocks -- and no norm after them:
    its output goes straight into ``decoder_embed``."""
    out = []
    for i in range(images.shape[0]):
        patches = net.conv_proj(images[i:i + 1]).flatten(2).transpose(1, 2)[0]  # (L, D)
        patches = patches + net.encoder.pos_embedding[0, 1:]
        if keep is not None:
            patches = patches[keep[i]]
        seq = torch.cat([net.class_token[0] + net.encoder.pos_embedding[0, :1], patches])[None]
        for block in net.encoder.layers:
            seq = block(seq)
        out.append(seq[0])
    return torch.stack(out)


def _released_forward(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) of the released ``forward_sim`` on the model's weights: online = encoder (visible
    tokens of A) -> decoder_embed -> projector -> [class + position 0, visible + their positions, a mask token +
    linear(relative embedding) per patch of B] -> predictor -> decoder_pred; target = EMA encoder (all of B) ->
    decoder_embed -> projector, class dropped."""
    from components.pretrain.methods.sim.model import visible_indices

    keep = visible_indices(inputs["mask"], model.num_patches - model.num_masked)
    z = model.projector(model.decoder_embed(_released_encoder(model.student_encoder, inputs["view1"], keep)))
    flips = torch.stack([inputs["flip1"], inputs["flip2"]], 1)
    pos, log_scale = relative_positions(inputs["boxes"], flips, model.grid)
    rel = model.position_mlp(relative_embedding(pos, log_scale, model.decoder_pos.shape[-1]))
    dec_pos = model.decoder_pos
    vis_pos = torch.stack([dec_pos[1:][k] for k in keep])
    x = torch.cat([z[:, :1] + dec_pos[:1], z[:, 1:] + vis_pos, model.mask_token + rel], dim=1)
    pred = model.decoder_pred(model.predictor(x))[:, -model.num_patches:]
    with torch.no_grad():
        tokens = _released_encoder(model.teacher_encoder, inputs["view2"])
        target = model.teacher_projector(model.teacher_decoder_embed(tokens))[:, 1:]
    return pred, target


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_forward_equals_the_released_structure_without_a_final_encoder_norm(norm):
    """Predictions, targets and loss equal a plain re-statement of the released forward (no LayerNorm between the
    encoder blocks and ``decoder_embed``, in either branch); torchvision's final ``encoder.ln`` stays frozen at its
    init (the downstream trunk's per-token standardisation) and is in no optimiser group."""
    from components.pretrain.methods.sim.method import param_groups
    from components.pretrain.methods.sim.model import SIM, visible_indices

    torch.manual_seed(0)
    model = SIM(**TINY, norm=norm)
    with torch.no_grad():  # a trained-looking final norm: with it applied, the outputs could not match
        model.student_encoder.encoder.ln.weight.uniform_(0.5, 2.0)
        model.teacher_encoder.encoder.ln.weight.copy_(model.student_encoder.encoder.ln.weight)
    inputs = _inputs(4, 64, model.num_masked, model.grid, seed=3)
    ref_pred, ref_target = _released_forward(model, inputs)
    keep = visible_indices(inputs["mask"], model.num_patches - model.num_masked)
    pred = model.predict(inputs["view1"], keep, inputs["boxes"], torch.stack([inputs["flip1"], inputs["flip2"]], 1))
    torch.testing.assert_close(pred, ref_pred, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.target(inputs["view2"]), ref_target, rtol=0, atol=1e-5)
    loss, _ = sim_loss(ref_pred, ref_target, **model.loss_kwargs)
    assert model(**inputs)["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    ln = model.student_encoder.encoder.ln
    assert not ln.weight.requires_grad and not ln.bias.requires_grad
    in_groups = {id(p) for group in param_groups(model, 0.05) for p in group["params"]}
    assert id(ln.weight) not in in_groups and id(ln.bias) not in in_groups
    assert SIM(**TINY).student_encoder.encoder.ln.weight.eq(1).all()  # at init: a plain standardisation


def test_ema_pairs_skip_frozen_tensors_and_follow_the_student():
    from components.pretrain.methods.sim.model import SIM
    from components.engine.ema import ema_update_

    model = SIM(**TINY)
    teacher, student = model.ema_parameters()
    n_trainable = sum(1 for m in model.student_modules() for p in m.parameters() if p.requires_grad)
    assert len(teacher) == len(student) == n_trainable
    assert all(not t.requires_grad for t in teacher)
    with torch.no_grad():
        for s in student:
            s.add_(1.0)
    ema_update_(teacher, student, 0.0)
    for t, s in zip(teacher, student):
        assert torch.equal(t, s)
    torch.testing.assert_close(model.teacher_encoder.encoder.pos_embedding, model.student_encoder.encoder.pos_embedding)


def test_token_batchnorm_and_features_for_downstream():
    from components.pretrain.methods.sim.method import SimMethod
    from components.pretrain.methods.sim.model import SIM, TokenBatchNorm

    bn = TokenBatchNorm(4)
    x = torch.randn(3, 5, 4) * 2 + 1
    y = bn(x)
    torch.testing.assert_close(y.reshape(-1, 4).mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    model = SIM(**TINY).eval()
    feats = SimMethod.dense_features(model, torch.randn(2, 3, 128, 96))
    assert feats.shape == (2, 192, 8, 6)
    assert SimMethod.prototype_scores(model, torch.randn(1, 3, 64, 64)) is None


def test_param_groups_decay_tokens_as_released_and_keep_it_off_norms_and_biases():
    from components.pretrain.methods.sim.method import param_groups
    from components.pretrain.methods.sim.model import SIM

    model = SIM(**TINY, train_patch_embed=True)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in no_decay["params"]}
    assert "student_encoder.class_token" in dec and "mask_token" in dec and "decoder_embed.bias" in nod
    assert "student_encoder.conv_proj.weight" in dec and "decoder_pred.weight" in dec
    assert all(not n.startswith("teacher_") for n in dec | nod)
    assert not any(("ln" in n or "bn" in n) and n.endswith("weight") for n in dec)
    assert "student_encoder.encoder.pos_embedding" not in dec | nod  # frozen sin-cos table


def test_sim_params_validation():
    from components.config import ConfigError, PretrainConfig, parse_section

    cfg = PretrainConfig(method="sim", image_size=96)
    assert cfg.arch == "vit_demo_16" and cfg.method_params.global_weight == 1.0
    with pytest.raises(ConfigError, match=r"pretrain.*image_size=100 is not a multiple of vit_demo_16's patch size 16"):
        parse_section("pretrain", {"method": "sim", "image_size": 100})
    parse_section("pretrain", {"method": "slotcon", "image_size": 100})  # the sim subsection is not in use
    with pytest.raises(ConfigError, match=r"pretrain\.sim\.decoder_dim"):
        parse_section("pretrain", {"sim": {"decoder_dim": 30}})
    with pytest.raises(ConfigError, match=r"pretrain\.sim\.arch='resnet50'"):
        parse_section("pretrain", {"method": "sim", "sim": {"arch": "resnet50"}})
    with pytest.raises(ConfigError, match=r"unknown key pretrain\.sim\.mask_raito"):
        parse_section("pretrain", {"sim": {"mask_raito": 0.5}})


def test_prepare_drops_the_mask_of_an_undecodable_image():
    """An image no decoder accepts is dropped with its crops by make_views; SIM drops its mask row too (and counts
    it), so view A, its mask and the boxes stay aligned."""
    import io

    from PIL import Image

    from components.config import PretrainConfig
    from components.pretrain.methods.sim.method import SimMethod
    from components.pretrain.plan import Plan
    from components.pretrain.views import collate_pairs

    cfg = PretrainConfig(method="sim", image_size=64, sim=dict(decoder_dim=32, decoder_heads=2))
    plan = Plan(urls=("s.tar",), num_images=3, samples_per_epoch=3, world_size=1, rank=0, global_batch=3,
                rank_batch=3, steps_per_epoch=1, total_steps=1, warmup_steps=0, data_signature="x", shard_samples=(3,))
    method = SimMethod(cfg, plan, torch.device("cpu"))
    buf = io.BytesIO()
    Image.new("RGB", (96, 80), (120, 30, 200)).save(buf, format="JPEG")
    jpeg, garbage = buf.getvalue(), b"\xff\xd8\xff" + bytes(range(200)) + b"\xff\xd9"
    draw = DrawCropsAndMask(0, 0, 0, (0.08, 1.0), grid=method.grid, num_masked=method.num_masked)
    samples = [draw({"key": k, "url": "s.tar", "image": data, "meta": {"image": {"height": 80, "width": 96}}})
               for k, data in (("a", jpeg), ("b", garbage), ("c", jpeg))]
    batch = collate_pairs(samples)
    views = method.prepare(batch, torch.device("cpu"))
    assert views["view1"].shape == (2, 3, 64, 64) and views["boxes"].shape == (2, 2, 4)
    assert torch.equal(views["mask"], batch["mask"][[0, 2]])
    assert method.lost.lost == 1
