"""Validation: predict each held-out region with the inference machinery (the same tiles
and numerics as ``segflow segment``) and score it (Dice / IoU per class).

The prediction is made from the full image (context reaches across the split), exactly as
segmenting the whole image would make it, so a checkpoint reproduces its validation
prediction bit for bit on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from unet_core.geometry import Box, plan_tiles
from unet_core.metrics import confusion_matrix, report_from_confusion
from unet_core.mirror import read_mirrored
from unet_core.model import UNet
from unet_core.predict import Predictor, plan_box, softmax
from unet_core.training.data import PreparedData


@dataclass
class ValidationPrediction:
    """Held-out region of one training image and the best model's prediction of it."""

    pair: int
    box: Box
    target: np.ndarray  # class ids
    probabilities: np.ndarray  # (n_classes, *box.shape), float32


def validate(
    model: UNet, data: PreparedData, device: torch.device, amp: bool
) -> tuple[dict[str, Any], list[ValidationPrediction]]:
    """Predict every validation region (as segmenting the whole image would) and score it."""
    precision: Literal["auto", "fp32"] = "auto" if amp else "fp32"
    predictor = Predictor(model, device=device, precision=precision)
    cm = np.zeros((data.n_classes, data.n_classes), dtype=np.int64)
    preds = []
    for i, pair in enumerate(data.pairs):
        if pair.val_box is None:
            continue
        probs = predict_region(predictor, pair.image, pair.val_box)
        target = pair.classes[pair.val_box.to_slices()]
        cm += confusion_matrix(np.argmax(probs, axis=0), target, data.n_classes)
        preds.append(ValidationPrediction(i, pair.val_box, target, probs))
    return report_from_confusion(cm, data.class_names), preds


def predict_region(predictor: Predictor, image: np.ndarray, box: Box) -> np.ndarray:
    """Class probabilities over ``box`` of a normalised (C, *spatial) image, read with the
    network's context around it (mirrored only at the image border)."""
    spatial = image.shape[1:]
    spec = predictor.spec(len(spatial))
    if predictor.mode == "invariant":  # the tiles `segflow segment` computes these voxels with
        read, tiles = plan_box(spec, spatial, box, "invariant")
    else:
        tile = spec.default_tile_shape() if box.size > 2_000_000 else None
        read, tiles = plan_tiles(spec, box, tile)
    data = read_mirrored(image, read, spatial, leading=1)
    return softmax(predictor.logits(np.ascontiguousarray(data), read, tiles, box))


__all__ = ["ValidationPrediction", "predict_region", "validate"]
