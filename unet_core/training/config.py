"""What decides a training run: :class:`TrainConfig` and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from unet_core.augment import AugmentConfig
from unet_core.config import Norm, Padding
from unet_core.losses import ClassWeighting, LossKind
from unet_core.normalize import Normalization
from unet_core.targets import LabelMode


class TrainConfig(BaseModel):
    """Everything that decides a training run. The defaults train a small 2D net that
    reaches a useful model on one 512×512 image in a few minutes on two CPU cores;
    :meth:`paper` gives the network of Ronneberger et al. (2015)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- the network
    ndim: Literal[2, 3] = Field(2, description="2 (slice by slice on volumes) or 3.")
    depth: int = Field(3, ge=1, le=6, description="Poolings (paper: 4).")
    base_channels: int = Field(16, ge=1, le=512, description="Channels of level 1 (paper: 64).")
    norm: Norm = Field(
        "batch", description="Normalisation after each convolution ('batch' is tile-exact)."
    )
    dropout: float = Field(
        0.2, ge=0.0, lt=1.0, description="Dropout at the end of the contracting path."
    )
    padding: Padding = Field("valid", description="'valid' (paper) or 'same' convolutions.")
    # -- what the labels mean
    label_mode: LabelMode = Field(
        "auto",
        description="How labels become classes: classes, binary, instances (touching objects "
        "separated by a gap), boundary (background/interior/boundary) or auto.",
    )
    n_classes: int | None = Field(
        None, ge=2, le=256, description="Classes for label_mode 'classes' (default: max + 1)."
    )
    class_names: list[str] | None = Field(None, description="Names of the classes.")
    foreground_class: int | None = Field(
        None, ge=0, description="Class whose connected components are objects (default 1)."
    )
    # -- patches
    patch: tuple[int, ...] | None = Field(
        None,
        description="Input patch per network axis, rounded up to a valid size "
        "(default 252² in 2D, 116×132² in 3D; smaller images get smaller patches).",
    )
    batch_size: int = Field(4, ge=1, le=1024, description="Patches per step.")
    sampling: Literal["uniform", "balanced"] = Field(
        "balanced", description="Patch centres: uniform, or on each class equally often."
    )
    # -- optimisation
    steps: int = Field(600, ge=1, le=10_000_000, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate (cosine decay).")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay.")
    warmup: int = Field(20, ge=0, description="Steps of linear learning-rate warm-up.")
    # -- loss
    loss: LossKind = Field("ce", description="Weighted cross-entropy, soft Dice, or both.")
    class_weighting: ClassWeighting = Field(
        "sqrt", description="w_c: balance class frequencies by 1/sqrt(f), 1/f, or not."
    )
    border_weight: bool | None = Field(
        None,
        description="Add the paper's border term w0·exp(-(d1+d2)²/2σ²) (default: on when "
        "the labels have objects, i.e. binary, instances and boundary modes).",
    )
    w0: float = Field(10.0, ge=0, le=1000, description="Border weight w0 (paper: 10).")
    border_sigma: float = Field(5.0, gt=0, le=100, description="Border σ in pixels (paper: 5).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    normalization: Normalization = Field(default_factory=Normalization)
    # -- validation
    val_fraction: float = Field(
        0.15, ge=0.0, lt=1.0, description="Held-out fraction for validation (0: none)."
    )
    val_every: int | None = Field(
        None, ge=1, description="Steps per epoch (validation + checkpoint); default steps/10."
    )
    val_max_voxels: int = Field(
        4_000_000, ge=1, description="Largest validation region per image (centre kept)."
    )
    # -- runtime
    seed: int = Field(0, ge=0, description="Seed of weights, patches and augmentation.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    amp: bool = Field(True, description="bf16/fp16 autocast on CUDA.")

    @field_validator("patch")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or any(n < 1 for n in v)):
            raise ValueError("patch sizes must be positive")
        return v

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's network: depth 4, 64 channels, 572² tiles (388² output), batch 1,
        dropout 0.5. In 3D, the 3D U-Net of Çiçek et al. (2016): depth 3, 32 channels,
        116×132² tiles (28×44² output)."""
        if overrides.get("ndim", 2) == 2:
            values: dict[str, Any] = {"depth": 4, "base_channels": 64, "patch": (572, 572)}
        else:
            values = {"depth": 3, "base_channels": 32, "patch": (116, 132, 132)}
        values.update({"dropout": 0.5, "batch_size": 1, "lr": 3e-4})
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def epoch_steps(self) -> int:
        return self.val_every or max(min(self.steps // 10, 500), 1)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then cosine decay to
    2% of ``lr``. A pure function of the step: the step is the whole scheduler state."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(config.steps - config.warmup, 1)
    t = min(max(step - config.warmup, 0) / span, 1.0)
    return config.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


__all__ = ["TrainConfig", "lr_at"]
