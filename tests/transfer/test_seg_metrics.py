import numpy as np
import pytest
import torch

from components.transfer.seg_metrics import (
    confusion_matrix,
    hungarian_match,
    majority_match,
    matched_metrics,
    metrics_from_confusion,
)


def test_confusion_and_metrics_equal_hand_computed_values():
    # 3 classes; 255 ignored. Hand count of [pred, label] pairs below.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion_matrix(pred, target, 3, 3)
    # pairs (pred,label): (0,0) (1,0) (1,1) (1,1) (2,2) (0,2) [ignored] (2,1)
    expected = torch.tensor([[1, 0, 1], [1, 2, 0], [0, 1, 1]])
    assert torch.equal(conf, expected)
    m = metrics_from_confusion(conf, ["a", "b", "c"])
    # IoU_a = 1 / (2 + 2 - 1) = 1/3 ; IoU_b = 2 / (3 + 3 - 2) = 1/2 ; IoU_c = 1 / (2 + 2 - 1) = 1/3
    assert m["per_class"]["a"]["IoU"] == pytest.approx(1 / 3)
    assert m["per_class"]["b"]["IoU"] == pytest.approx(1 / 2)
    assert m["per_class"]["c"]["IoU"] == pytest.approx(1 / 3)
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m["pixel_acc"] == pytest.approx(4 / 7)
    # acc_a = 1/2, acc_b = 2/3, acc_c = 1/2
    assert m["mAcc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_left_out_of_the_mean_and_bad_labels_raise():
    conf = np.array([[5, 0, 0], [0, 3, 0], [0, 0, 0]])
    m = metrics_from_confusion(conf)
    assert m["per_class"]["2"]["IoU"] is None
    assert m["mIoU"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3, 3)


def _permuted(num_classes=4, shape=(3, 16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    target[0, :2] = 255
    perm = torch.randperm(num_classes, generator=g)
    return target, perm


def test_hungarian_recovers_a_permuted_labeling_exactly():
    target, perm = _permuted()
    pred = perm[target.clamp(max=3)]  # cluster id = a permutation of the class
    conf = confusion_matrix(pred, target, 4, 4)
    mapping = hungarian_match(conf)
    assert [int(mapping[int(perm[c])]) for c in range(4)] == [0, 1, 2, 3]
    m = matched_metrics(conf, mapping)
    assert m["mIoU"] == pytest.approx(1.0) and m["pixel_acc"] == pytest.approx(1.0)


def test_hungarian_not_fooled_by_an_unused_cluster():
    target, perm = _permuted()
    # 6 clusters: cluster 5 is never predicted (an empty row), cluster 4 too; the real ones are a permutation.
    pred = perm[target.clamp(max=3)]
    conf = confusion_matrix(pred, target, 6, 4)
    assert conf[4:].sum() == 0
    mapping = hungarian_match(conf)
    assert set(mapping[4:].tolist()) == {-1}
    assert matched_metrics(conf, mapping)["mIoU"] == pytest.approx(1.0)
    # the unused cluster sits first: still matched correctly
    conf2 = torch.cat([torch.zeros(1, 4, dtype=torch.int64), confusion_matrix(pred, target, 4, 4)])
    assert matched_metrics(conf2, hungarian_match(conf2))["mIoU"] == pytest.approx(1.0)


def test_hungarian_is_one_to_one_and_majority_many_to_one():
    # 3 clusters over 2 classes: clusters 0 and 1 both split class 0; cluster 2 is class 1.
    conf = np.array([[60, 0], [40, 0], [0, 50]])
    hung = matched_metrics(conf, hungarian_match(conf))
    # class 0: TP 60, FN 40 -> IoU 0.6; class 1: IoU 1 -> mIoU 0.8; pixel acc 110/150
    assert hung["mIoU"] == pytest.approx(0.8)
    assert hung["pixel_acc"] == pytest.approx(110 / 150)
    assert majority_match(conf).tolist() == [0, 0, 1]
    maj = matched_metrics(conf, majority_match(conf))
    assert maj["mIoU"] == pytest.approx(1.0) and maj["pixel_acc"] == pytest.approx(1.0)


def test_fewer_clusters_than_classes_gives_zero_iou_to_unmatched_classes():
    conf = np.array([[10, 0, 0], [0, 10, 10]])  # class 2 shares cluster 1 with class 1
    m = matched_metrics(conf, hungarian_match(conf))
    ious = [v["IoU"] for v in m["per_class"].values()]
    assert ious[0] == pytest.approx(1.0) and sorted(ious[1:]) == pytest.approx([0.0, 0.5])
