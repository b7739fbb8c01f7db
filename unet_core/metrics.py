"""Segmentation metrics: Dice and IoU per class, instance matching, ISBI 2012 Rand error.

Conventions for empty cases: a class that is absent from both prediction and ground truth
scores a Dice and IoU of 1 (nothing to find, nothing found); with no objects on either
side instance precision, recall and F1 are 1. Instance matching is one to one: pairs are
taken greedily by decreasing IoU among those with IoU >= the threshold (for thresholds
above 0.5 a match is unique anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from unet_core.errors import InvalidShapeError, InvalidVolumeError
from unet_core.targets import components, relabel_sequential


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise InvalidShapeError(f"prediction {a.shape} and ground truth {b.shape} differ in shape")


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts, rows = ground truth, columns = prediction."""
    p, g = np.asarray(pred), np.asarray(gt)
    _same_shape(p, g)
    for name, a in (("prediction", p), ("ground truth", g)):
        if a.size and (int(a.max()) >= n_classes or int(a.min()) < 0):
            raise InvalidVolumeError(
                f"the {name} holds class ids {int(a.min())}..{int(a.max())}, "
                f"not all in 0..{n_classes - 1}"
            )
    idx = g.reshape(-1).astype(np.int64) * n_classes + p.reshape(-1).astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes)[: n_classes * n_classes].reshape(
        n_classes, n_classes
    )


def dice_from_confusion(cm: np.ndarray) -> list[float]:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)
    return [float(2 * t / d) if d else 1.0 for t, d in zip(tp, denom, strict=True)]


def iou_from_confusion(cm: np.ndarray) -> list[float]:
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    return [float(t / u) if u else 1.0 for t, u in zip(tp, union, strict=True)]


def dice(pred: np.ndarray, gt: np.ndarray, n_classes: int = 2) -> list[float]:
    """Dice ``2|P∩G| / (|P| + |G|)`` per class of two class-id images."""
    return dice_from_confusion(confusion_matrix(pred, gt, n_classes))


def iou(pred: np.ndarray, gt: np.ndarray, n_classes: int = 2) -> list[float]:
    """IoU (Jaccard) ``|P∩G| / |P∪G|`` per class of two class-id images."""
    return iou_from_confusion(confusion_matrix(pred, gt, n_classes))


@dataclass(frozen=True)
class InstanceScores:
    """One-to-one matching of predicted to true objects at an IoU threshold."""

    threshold: float
    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _overlaps(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """(gt ids, pred ids, intersections, gt sizes, pred sizes) of overlapping pairs."""
    g = gt.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    gsize = np.bincount(g)
    psize = np.bincount(p)
    both = (g > 0) & (p > 0)
    key = g[both] * (int(p.max()) + 1) + p[both]
    pairs, inter = np.unique(key, return_counts=True)
    gi, pi = np.divmod(pairs, int(p.max()) + 1)
    return gi, pi, inter, gsize, psize


def match_instances(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> InstanceScores:
    """Precision, recall and F1 of predicted objects (ids > 0) matched one to one to the
    true objects at IoU >= ``threshold``."""
    p = relabel_sequential(np.asarray(pred))
    g = relabel_sequential(np.asarray(gt))
    _same_shape(p, g)
    n_pred, n_true = int(p.max(initial=0)), int(g.max(initial=0))
    gi, pi, inter, gsize, psize = _overlaps(p, g)
    ious = inter / (gsize[gi] + psize[pi] - inter)
    order = np.lexsort((pi, gi, -ious))
    used_g: set[int] = set()
    used_p: set[int] = set()
    matched: list[float] = []
    for k in order:
        if ious[k] < threshold:
            break
        a, b = int(gi[k]), int(pi[k])
        if a in used_g or b in used_p:
            continue
        used_g.add(a)
        used_p.add(b)
        matched.append(float(ious[k]))
    tp = len(matched)
    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else 1.0 if not n_true else 0.0
    recall = tp / n_true if n_true else 1.0 if not n_pred else 0.0
    f1 = 2 * tp / (n_pred + n_true) if (n_pred + n_true) else 1.0
    return InstanceScores(
        threshold=float(threshold),
        n_true=n_true,
        n_pred=n_pred,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        mean_matched_iou=float(np.mean(matched)) if matched else 0.0,
    )


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images split the same foreground into the same objects, whatever
    the ids (a one-to-one correspondence of the ids > 0)."""
    fa, fb = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if fa.shape != fb.shape or not np.array_equal(fa > 0, fb > 0):
        return False
    m = fa > 0
    pairs = np.unique(np.stack([fa[m].astype(np.uint64), fb[m].astype(np.uint64)]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def adapted_rand_error(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """The Rand error of the ISBI 2012 challenge: ``1 - F`` of the foreground-restricted
    Rand index, with its precision and recall.

    Voxels that are background (0) in the ground truth are ignored; predicted background
    voxels count as singletons (each its own segment), so a boundary the prediction draws
    too wide is penalised. Sums run over ordered voxel pairs including each voxel with
    itself (squared joint counts, as in Arganda-Carreras et al. 2015; scikit-image's
    ``adapted_rand_error`` leaves the self-pairs out and differs slightly on small
    images). Returns ``(error, precision, recall)``.
    """
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    g = np.asarray(gt).reshape(-1).astype(np.int64)
    if p.shape != g.shape:
        raise InvalidShapeError(
            f"prediction {np.shape(pred)} and ground truth {np.shape(gt)} differ in shape"
        )
    keep = g > 0
    p, g = p[keep], g[keep]
    n = float(p.size)
    if n == 0:
        return 0.0, 1.0, 1.0
    fg = p > 0
    singles = float(np.count_nonzero(~fg))
    _, pair_counts = np.unique(g[fg] * (int(p.max()) + 1) + p[fg], return_counts=True)
    _, g_counts = np.unique(g, return_counts=True)
    _, p_counts = np.unique(p[fg], return_counts=True)
    sum_ab = float(np.sum(pair_counts.astype(np.float64) ** 2)) + singles
    sum_a = float(np.sum(g_counts.astype(np.float64) ** 2))
    sum_b = float(np.sum(p_counts.astype(np.float64) ** 2)) + singles
    precision = sum_ab / sum_b
    recall = sum_ab / sum_a
    f = 2.0 * precision * recall / (precision + recall)
    return 1.0 - f, precision, recall


def instances_from_mask(mask: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Objects = connected components (face connectivity) of ``mask``; smaller ones dropped."""
    lab = components(np.asarray(mask, dtype=bool))
    if min_size > 1 and lab.max() > 0:
        sizes = np.bincount(lab.reshape(-1))
        small = sizes < min_size
        small[0] = False
        lab[small[lab]] = 0
        lab = relabel_sequential(lab)
    return lab


def class_report(
    pred: np.ndarray, gt: np.ndarray, n_classes: int, names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Dice and IoU per class (by name) and their means over the non-background classes."""
    cm = confusion_matrix(pred, gt, n_classes)
    return report_from_confusion(cm, names)


def report_from_confusion(cm: np.ndarray, names: Sequence[str] | None = None) -> dict[str, Any]:
    k = cm.shape[0]
    names = list(names) if names and len(names) == k else [f"class_{i}" for i in range(k)]
    d, j = dice_from_confusion(cm), iou_from_confusion(cm)
    fg = slice(1, None) if k > 1 else slice(None)
    return {
        "dice": dict(zip(names, d, strict=True)),
        "iou": dict(zip(names, j, strict=True)),
        "mean_dice": float(np.mean(d[fg])),
        "mean_iou": float(np.mean(j[fg])),
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
    }


def instance_report(pred: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Instance precision/recall/F1 at ``threshold``, the ISBI Rand error, foreground Dice."""
    scores = match_instances(pred, gt, threshold)
    err, rp, rr = adapted_rand_error(pred, gt)
    fg = dice(np.asarray(pred) > 0, np.asarray(gt) > 0, 2)[1]
    return {
        **scores.as_dict(),
        "rand_error": err,
        "rand_precision": rp,
        "rand_recall": rr,
        "foreground_dice": fg,
    }


#: More distinct non-zero ids than this are instance ids, not class ids.
MAX_CLASS_IDS = 8
LabelKind = Literal["binary", "classes", "instances"]
EvalMode = Literal["classes", "foreground", "instances"]


def label_kind(labels: np.ndarray) -> tuple[LabelKind, int]:
    """What the ids of a label image are, and how many non-zero ids it holds: ``binary``
    (at most one), ``instances`` (more than :data:`MAX_CLASS_IDS`, or each id one
    connected object) or ``classes`` (a few ids, each in several pieces)."""
    a = np.asarray(labels)
    ids = np.unique(a)
    ids = ids[ids != 0]
    n = int(ids.size)
    if n <= 1:
        return "binary", n
    if n > MAX_CLASS_IDS:
        return "instances", n
    pieces = sum(int(components(a == v).max()) for v in ids)
    return ("instances" if pieces < 1.5 * n else "classes"), n


def _kind_text(kind: LabelKind, n: int) -> str:
    if kind == "binary":
        return "a binary mask" if n else "no foreground"
    return f"{n} {'instance' if kind == 'instances' else 'class'} ids"


def choose_mode(pred: np.ndarray, gt: np.ndarray) -> tuple[EvalMode, str]:
    """The scores that fit two label images, and why: ``instances`` when the prediction
    holds objects and the ground truth objects or a mask; ``classes`` when the ground truth
    holds class ids; ``foreground`` (binary Dice/IoU of ``> 0``) otherwise, e.g. a semantic
    mask against instance ground truth (what ``train`` consumes)."""
    pk, pn = label_kind(pred)
    gk, gn = label_kind(gt)
    why = f"ground truth holds {_kind_text(gk, gn)}, the prediction {_kind_text(pk, pn)}"
    if pk == "instances" and gk != "classes":
        return "instances", why
    if gk == "classes" and pk != "instances":
        return "classes", why
    return "foreground", why


def foreground_report(pred: np.ndarray, gt: np.ndarray) -> dict[str, Any]:
    """Binary scores of the foreground (every id > 0) of a prediction against ground truth."""
    cm = confusion_matrix(np.asarray(pred) > 0, np.asarray(gt) > 0, 2)
    tp, pred_fg, gt_fg = int(cm[1, 1]), int(cm[:, 1].sum()), int(cm[1, :].sum())
    return {
        "dice": dice_from_confusion(cm)[1],
        "iou": iou_from_confusion(cm)[1],
        "precision": tp / pred_fg if pred_fg else 1.0 if not gt_fg else 0.0,
        "recall": tp / gt_fg if gt_fg else 1.0 if not pred_fg else 0.0,
        "pred_voxels": pred_fg,
        "gt_voxels": gt_fg,
    }
