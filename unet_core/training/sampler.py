"""Patches: which valid input shape a run trains on and the batches of each step.

The batch of step ``s`` is a pure function of ``(seed, s)``: random valid-size patches
(class-balanced centres), one random warp each (flip, rotation, zoom, elastic) for image,
labels and weights, and grey-value changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from unet_core.augment import (
    box_at,
    centre_crop_coordinates,
    grey_values,
    patch_coordinates,
    warp,
)
from unet_core.config import UNetConfig
from unet_core.errors import ConfigError
from unet_core.geometry import Box
from unet_core.mirror import read_mirrored
from unet_core.training.config import TrainConfig
from unet_core.training.data import PreparedData, TrainingPair

#: Default input patch per network dimensionality (rounded up to a valid size).
DEFAULT_PATCH = {2: (252, 252), 3: (116, 132, 132)}


class PatchSampler:
    """Batches of (image, class ids, weights) patches; step ``s`` is a pure function of
    ``(seed, s)``, whatever happened before (resumable, order-independent)."""

    def __init__(
        self,
        data: PreparedData,
        unet: UNetConfig,
        in_shape: tuple[int, ...],
        config: TrainConfig,
    ) -> None:
        self.data = data
        self.config = config
        self.in_shape = in_shape
        self.out_shape = unet.output_shape(in_shape)
        self.trainable = [i for i, p in enumerate(data.pairs) if p.train_box is not None]
        boxes = [data.pairs[i].train_box for i in self.trainable]
        sizes = np.array([b.size for b in boxes if b is not None], dtype=np.float64)
        self.pair_p = sizes / sizes.sum()
        self.classes = sorted({k for i in self.trainable for k in data.pairs[i].tables})

    def _centre(self, rng: np.random.Generator) -> tuple[TrainingPair, tuple[int, ...]]:
        pairs = self.data.pairs
        if self.config.sampling == "balanced" and self.classes:
            k = self.classes[int(rng.integers(len(self.classes)))]
            holders = [i for i in self.trainable if k in pairs[i].tables]
            counts = np.array([pairs[i].tables[k].size for i in holders], dtype=float)
            pair = pairs[holders[int(rng.choice(len(holders), p=counts / counts.sum()))]]
            table = pair.tables[k]
            box = pair.train_box
            assert box is not None
            flat = int(table[int(rng.integers(table.size))])
            local = np.unravel_index(flat, box.shape)
            return pair, tuple(int(b + i) for b, i in zip(box.begin, local, strict=True))
        pair = pairs[self.trainable[int(rng.choice(len(self.trainable), p=self.pair_p))]]
        box = pair.train_box
        assert box is not None
        return pair, tuple(int(rng.integers(b, e)) for b, e in zip(box.begin, box.end, strict=True))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pair, centre = self._centre(rng)
        lead = len(pair.spatial) - len(self.in_shape)
        image, classes, weight = pair.image, pair.classes, pair.weight
        if lead:  # a 2D network on a volume: the patch lies in one slice
            z = centre[0]
            image, classes, weight = image[:, z], classes[z], weight[z]
            centre = centre[1:]
        aug = self.config.augment
        coords = patch_coordinates(centre, self.in_shape, rng, aug)
        if coords is None:
            box = box_at(centre, self.in_shape)
            out_box = Box(box.begin + (box.shape - self.out_shape) // 2, self.out_shape)
            x = read_mirrored(image, box, classes.shape, leading=1)
            y = read_mirrored(classes, out_box, classes.shape)
            w = read_mirrored(weight, out_box, classes.shape)
        else:
            inner = centre_crop_coordinates(coords, self.out_shape)
            x = warp(image, coords, 3, leading=1)
            y = warp(classes, inner, 0)
            w = np.clip(warp(weight, inner, 1), 0.0, None)
            x = grey_values(x, rng, aug)
        return (
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.int64),
            np.ascontiguousarray(w, dtype=np.float32),
        )

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.config.seed, step])
        parts = [self.sample(rng) for _ in range(self.config.batch_size)]
        return (
            torch.from_numpy(np.stack([p[0] for p in parts])),
            torch.from_numpy(np.stack([p[1] for p in parts])),
            torch.from_numpy(np.stack([p[2] for p in parts])),
        )


def patch_shape(config: TrainConfig, unet: UNetConfig, data: PreparedData) -> tuple[int, ...]:
    """The valid input patch: the requested (or default) one, shrunk where every training
    region is smaller than its output (a larger patch would only see mirrored data)."""
    want = config.patch or DEFAULT_PATCH[config.ndim]
    if len(want) == 1:
        want = want * config.ndim
    if len(want) != config.ndim:
        raise ConfigError(f"patch {want} has {len(want)} axes for a {config.ndim}D network")
    extents = [0] * config.ndim
    for p in data.pairs:
        if p.train_box is not None:
            net = p.train_box.shape[-config.ndim :]
            extents = [max(e, n) for e, n in zip(extents, net, strict=True)]
    shape = []
    for a, n in enumerate(want):
        size = unet.valid_input_size_1d(n)
        if unet.output_shape((size,) * config.ndim)[0] > extents[a]:
            lost = size - unet.output_shape((size,) * config.ndim)[0]
            size = min(size, unet.valid_input_size_1d(extents[a] + lost))
        shape.append(size)
    return tuple(shape)


def batches(
    sampler: PatchSampler, start: int, stop: int, prefetch: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of steps ``start .. stop - 1``. With ``prefetch`` (on a GPU) the next
    batch is cut and augmented in a thread while the device computes; on a CPU that thread
    would only compete with PyTorch's for the same cores."""
    if not prefetch:
        for step in range(start, stop):
            yield sampler.batch(step)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="segflow-patches") as pool:
        pending = pool.submit(sampler.batch, start) if start < stop else None
        for step in range(start, stop):
            assert pending is not None
            ahead = pool.submit(sampler.batch, step + 1) if step + 1 < stop else None
            yield pending.result()
            pending = ahead


__all__ = ["DEFAULT_PATCH", "PatchSampler", "batches", "patch_shape"]
