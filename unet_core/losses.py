r"""The paper's loss: pixel-wise softmax cross-entropy with a weight map; Dice as an option.

The weight map of Ronneberger et al. (2015), eq. 2, is pre-computed once per annotation::

    w(x) = w_c(x) + w0 · exp( -(d1(x) + d2(x))² / (2 σ²) )

``w_c`` balances the class frequencies; ``d1`` and ``d2`` are the distances to the nearest
and the second-nearest object. The second term is large only in the narrow background
gaps between two objects that (almost) touch, which forces the network to learn those
separations. The paper uses ``w0 = 10`` and ``σ ≈ 5`` pixels. Like common
implementations, the border term is applied to background pixels only (inside an object
``d1`` is 0 and the term would just up-weight small objects).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from unet_core.errors import ConfigError

ClassWeighting = Literal["none", "sqrt", "inverse"]


def class_frequencies(targets: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
    """Fraction of voxels per class over all ``targets`` (class-id arrays)."""
    counts = np.zeros(n_classes, dtype=np.float64)
    for t in targets:
        counts += np.bincount(t.reshape(-1), minlength=n_classes)[:n_classes]
    total = counts.sum()
    return counts / total if total else np.full(n_classes, 1.0 / n_classes)


def class_weights(frequencies: np.ndarray, kind: ClassWeighting = "sqrt") -> np.ndarray:
    """Per-class weights ``w_c`` that balance class frequencies, scaled so that the average
    voxel weighs 1. ``inverse``: ``1/f`` (full balance); ``sqrt``: ``1/sqrt(f)`` (a milder
    balance that keeps object outlines calibrated); ``none``: all ones. Classes that do not
    occur get the largest weight of those that do; weights are capped at 20."""
    f = np.asarray(frequencies, dtype=np.float64)
    if kind == "none" or not np.any(f > 0):
        return np.ones_like(f)
    present = f > 0
    w = np.zeros_like(f)
    w[present] = 1.0 / (f[present] if kind == "inverse" else np.sqrt(f[present]))
    w /= float((w * f).sum())
    w[~present] = w[present].max()
    return np.minimum(w, 20.0)


def border_weights(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    sampling: Sequence[float] | None = None,
    tolerance: float = 1e-3,
) -> np.ndarray:
    """``w0 · exp(-(d1 + d2)² / (2 σ²))`` on background voxels (0 inside objects), float32.

    ``d1``/``d2`` are Euclidean distances (in the units of ``sampling``, default voxels) to
    the nearest and second-nearest object of ``instances`` (ids > 0). Distances are only
    computed near each object: beyond ``σ · sqrt(2 ln(w0 / tolerance))`` the term is below
    ``tolerance``, so the result is exact up to that tolerance.
    """
    if sigma <= 0:
        raise ConfigError(f"border sigma must be positive, got {sigma}")
    inst = np.asarray(instances)
    out = np.zeros(inst.shape, dtype=np.float32)
    if w0 <= 0 or not np.any(inst):
        return out
    spacing = np.ones(inst.ndim) if sampling is None else np.asarray(sampling, dtype=np.float64)
    reach = sigma * float(np.sqrt(2.0 * np.log(max(w0 / tolerance, 1.0 + 1e-9))))
    grow = np.ceil(reach / spacing).astype(int)
    d1 = np.full(inst.shape, np.inf, dtype=np.float64)
    d2 = np.full(inst.shape, np.inf, dtype=np.float64)
    boxes = ndimage.find_objects(inst)
    for i, box in enumerate(boxes, start=1):
        if box is None:
            continue
        region = tuple(
            slice(max(s.start - g, 0), min(s.stop + g, n))
            for s, g, n in zip(box, grow, inst.shape, strict=True)
        )
        d = ndimage.distance_transform_edt(inst[region] != i, sampling=spacing)
        a, b = d1[region], d2[region]
        closer = d < a
        b[:] = np.where(closer, a, np.minimum(b, d))
        a[:] = np.where(closer, d, a)
    term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    background = inst == 0
    out[background] = term[background]
    return out


def weight_map(
    classes: np.ndarray,
    instances: np.ndarray | None,
    class_weight: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    sampling: Sequence[float] | None = None,
) -> np.ndarray:
    """The paper's ``w(x) = w_c(x) + w0 · exp(-(d1 + d2)² / (2σ²))`` (float32).

    With ``instances=None`` or ``w0=0`` it is the class-balancing term alone.
    """
    w = np.asarray(class_weight, dtype=np.float32)[classes]
    if instances is not None and w0 > 0:
        w += border_weights(instances, w0, sigma, sampling)
    return w


# ------------------------------------------------------------------------ losses


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Softmax cross-entropy weighted per voxel: ``sum(w · ce) / sum(w)``.

    logits ``(N, K, *S)``; target ``(N, *S)`` int64 class ids; weight ``(N, *S)``, where 0
    ignores a voxel (e.g. the validation region).
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1e-6)


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    include_background: bool = False,
    smooth: float = 1.0,
) -> torch.Tensor:
    """``1 - mean soft Dice`` over classes (over the batch pooled), voxels with mask 0 ignored."""
    k = logits.shape[1]
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, k).movedim(-1, 1).to(prob.dtype)
    if mask is not None:
        m = (mask > 0).to(prob.dtype).unsqueeze(1)
        prob, onehot = prob * m, onehot * m
    dims = (0, *range(2, logits.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    if not include_background and k > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()


LossKind = Literal["ce", "dice", "ce+dice"]


def segmentation_loss(
    kind: LossKind, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The training loss: weighted cross-entropy, soft Dice, or their sum."""
    if kind == "ce":
        return weighted_cross_entropy(logits, target, weight)
    if kind == "dice":
        return soft_dice_loss(logits, target, weight)
    return weighted_cross_entropy(logits, target, weight) + soft_dice_loss(logits, target, weight)
