"""Where the two views are made does not change them: each sample's augmentation draws are made with its crops in
the loader workers, so its views are the same in any batch, and the same whether the loader workers make them (CPU
training) or the training process does after the loader (the GPU layout)."""
from __future__ import annotations

import pytest
import torch

from components.data.shards.stage import expected_counts, split_urls
from components.pretrain.augment import TwoViewAugment
from components.pretrain.views import DrawCrops, batch_views, build_loader, collate_pairs, make_views

VIEW_KEYS = ("view1", "view2", "coords1", "coords2", "flip1", "flip2", "boxes")
CPU = torch.device("cpu")


def _images(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (3, 40 + 4 * i, 52 - 2 * i), dtype=torch.uint8, generator=g) for i in range(n)]


def test_a_samples_views_do_not_depend_on_the_rest_of_its_batch():
    """Views of images b, c in the batch [a, b, c] equal their views in [b, c] and in [c, b]: no draw of one sample
    is taken from a stream the others share (a rank-wide generator would shift every row after a)."""
    draw = DrawCrops(seed=5, epoch=1, rank=0)
    samples = [draw({"key": f"k{i}", "url": "s.tar", "image": im}) for i, im in enumerate(_images(3))]
    augment = TwoViewAugment(image_size=24)
    full = make_views(collate_pairs(samples), augment, None, CPU)
    tail = make_views(collate_pairs(samples[1:]), augment, None, CPU)
    swapped = make_views(collate_pairs(samples[:0:-1]), augment, None, CPU)
    for k in VIEW_KEYS:
        assert torch.equal(full[k][1:], tail[k]), k
        assert torch.equal(full[k][1:], swapped[k].flip(0)), k
    # and the draws are real: view 1 of different images got different colour factors (not one shared draw)
    assert not torch.equal(samples[0]["crops"]["draws"], samples[1]["crops"]["draws"])


def test_the_same_key_and_occurrence_redraws_the_same_and_a_repeat_draws_anew():
    image = _images(1)[0]
    a = DrawCrops(seed=5, epoch=1, rank=0)({"key": "k", "url": "s.tar", "image": image})["crops"]["draws"]
    again = DrawCrops(seed=5, epoch=1, rank=0)
    b = again({"key": "k", "url": "s.tar", "image": image})["crops"]["draws"]
    repeat = again({"key": "k", "url": "s.tar", "image": image})["crops"]["draws"]
    other_epoch = DrawCrops(seed=5, epoch=2, rank=0)({"key": "k", "url": "s.tar", "image": image})["crops"]["draws"]
    assert a.shape == (2, TwoViewAugment.NUM_DRAWS) and torch.equal(a, b)
    assert not torch.equal(a, repeat) and not torch.equal(a, other_epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_views_made_in_the_loader_workers_equal_views_made_after_the_loader(shards, workers):
    """CPU training makes the views in the loader workers; the result is the same batch by batch, bit for bit, as
    making them in the training process after the loader (the GPU layout)."""
    urls, expected = split_urls(shards, "train2017"), expected_counts(shards, "train2017")
    augment = TwoViewAugment(image_size=32)
    kw = dict(rank_batch=6, samples_per_epoch=24, seed=2, epoch=0, rank=0, world_size=1, num_workers=workers,
              decode="rgb", expected_counts=expected)
    inside = list(build_loader(urls, augment=augment, **kw))
    after = list(build_loader(urls, **kw))
    assert len(inside) == len(after) == 4
    for b_in, b_after in zip(inside, after):
        assert "views" in b_in and "images" not in b_in and "views" not in b_after
        assert b_in["keys"] == b_after["keys"]
        v_in, v_after = batch_views(b_in, augment, CPU), batch_views(b_after, augment, CPU)
        for k in VIEW_KEYS:
            assert torch.equal(v_in[k], v_after[k]), k
        assert v_in["view1"].shape == (6, 3, 32, 32)


def test_augmenting_in_the_workers_needs_decoded_images(shards):
    with pytest.raises(ValueError, match="decode='rgb'"):
        build_loader(split_urls(shards, "train2017"), rank_batch=4, samples_per_epoch=8, seed=0, epoch=0, rank=0,
                     world_size=1, num_workers=0, decode="bytes", augment=TwoViewAugment(image_size=32))
