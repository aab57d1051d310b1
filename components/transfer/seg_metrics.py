"""Segmentation metrics from a confusion matrix accumulated over the whole split (as mmsegmentation: never averaged
per image, ``ignore_index`` 255 left out), and the cluster -> class matching of unsupervised segmentation (PiCIE /
SlotCon §4): :func:`hungarian_match` one-to-one, :func:`majority_match` many-to-one.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from components.constants import IGNORE_INDEX  # (re-exported: the one ignore value)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_pred: int, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``(num_pred, num_classes)`` int64 counts: entry ``[p, c]`` = pixels predicted ``p`` whose label is ``c``.

    ``pred`` and ``target`` are integer tensors of the same shape (e.g. ``(B, H, W)``); ``target == ignore_index``
    pixels are skipped. A label outside ``[0, num_classes)`` (other than ignore) is a bug upstream: raise.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"label {int(target.max())} outside [0, {num_classes}) and not ignore_index={ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_pred):
        raise ValueError(f"prediction {int(pred.max())} outside [0, {num_pred})")
    idx = pred * num_classes + target
    return torch.bincount(idx, minlength=num_pred * num_classes).reshape(num_pred, num_classes).cpu()


def metrics_from_confusion(conf: torch.Tensor | np.ndarray, class_names: list[str] | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU/accuracy from a square ``(C, C)`` [pred, label] confusion matrix.

    IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU is the mean over the classes with a non-empty union (a class absent from
    both the labels and the predictions is NaN and not averaged); pixel accuracy = sum_c TP_c / labelled pixels.

    Returns ``{"mIoU", "pixel_acc", "mAcc", "per_class": {name: {"IoU", "acc"}}}``; per-class values of classes with
    an empty union are ``None`` (JSON null), and they are left out of the means.
    """
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"need a square confusion matrix, got {conf.shape}")
    tp = np.diag(conf)
    pred_sum = conf.sum(axis=1)  # pixels predicted as c
    gt_sum = conf.sum(axis=0)  # pixels labelled c
    union = pred_sum + gt_sum - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_sum > 0, tp / gt_sum, np.nan)
    total = gt_sum.sum()
    names = class_names or [str(i) for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for {len(tp)} classes")
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class": {
            n: {"IoU": None if np.isnan(i) else float(i), "acc": None if np.isnan(a) else float(a)}
            for n, i, a in zip(names, iou, acc)
        },
    }


def hungarian_match(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class assignment maximising matched pixels on a ``(K, C)`` confusion
    (``scipy.optimize.linear_sum_assignment``); with K > C the unmatched clusters predict "no class" (their pixels are
    false negatives of their true class), with K < C the unmatched classes get IoU 0.

    Returns ``mapping`` of length K: ``mapping[k]`` = class of cluster k, or -1 for a cluster left unmatched
    (K > C). Ties (e.g. an empty cluster) never beat a cluster with pixels: the optimum is unique in matched pixels and
    empty rows add nothing, so they are matched only when there are classes to spare.
    """
    conf = np.asarray(conf, dtype=np.float64)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_match(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """Many-to-one: each cluster -> the class it overlaps most; clusters without labelled pixels -> -1. An upper bound
    that favours over-clustering (reported as a second figure when K > C)."""
    conf = np.asarray(conf)
    mapping = conf.argmax(axis=1).astype(np.int64)
    mapping[conf.sum(axis=1) == 0] = -1
    return mapping


def remap_confusion(conf: torch.Tensor | np.ndarray, mapping: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, C)`` cluster confusion + cluster -> class ``mapping`` -> ``(C, C)`` [pred class, label] confusion.

    Rows of clusters mapped to -1 are dropped from the predictions: their pixels stay in the label totals, so they
    count as false negatives (missed) of their true class, as in a prediction of "no class".
    """
    conf = np.asarray(conf, dtype=np.int64)
    out = np.zeros((num_classes, conf.shape[1]), dtype=np.int64)
    for k, c in enumerate(mapping):
        if c >= 0:
            out[c] += conf[k]
    return out


def matched_metrics(
    conf: torch.Tensor | np.ndarray, mapping: np.ndarray, class_names: list[str] | None = None
) -> dict:
    """Metrics of a ``(K, C)`` cluster confusion under a cluster -> class ``mapping`` (:func:`hungarian_match` or
    :func:`majority_match`); pixels of unmatched clusters count as missed."""
    conf = np.asarray(conf, dtype=np.int64)
    num_classes = conf.shape[1]
    sq = remap_confusion(conf, mapping, num_classes)
    unmatched = conf[np.asarray(mapping) < 0].sum(axis=0)  # (C,) labelled pixels that got "no class"
    # An extra prediction row that no class owns: it adds to every class's label total (FN) and to no class's TP/FP.
    padded = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    padded[:num_classes, :num_classes] = sq
    padded[num_classes, :num_classes] = unmatched
    m = metrics_from_confusion(padded, (class_names or [str(i) for i in range(num_classes)]) + ["__unmatched__"])
    # Recompute the means without the artificial class (its IoU is 0 or NaN: it has no labels, only predictions).
    m["per_class"].pop("__unmatched__")
    ious = [v["IoU"] for v in m["per_class"].values() if v["IoU"] is not None]
    accs = [v["acc"] for v in m["per_class"].values() if v["acc"] is not None]
    m["mIoU"] = float(np.mean(ious)) if ious else 0.0
    m["mAcc"] = float(np.mean(accs)) if accs else 0.0
    return m
