"""The state of a training run, saved and resumed as one (:class:`RunState`).

A run is deterministic for a seed: the patches of step ``s`` come from a generator seeded
with ``(seed, s)`` and the learning rate is a function of the step, so the model, the
optimizer, the gradient scaler, the step, PyTorch's random state, the history and the best
model so far are everything a run carries. :meth:`RunState.save` writes them to the side
file ``<checkpoint>.state.pt`` (the best model itself is the checkpoint) at the end of each
epoch; :meth:`RunState.resume` continues from there with the same result as an
uninterrupted run. Side files are read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unet_core.checkpoint import load_checkpoint
from unet_core.config import UNetConfig
from unet_core.errors import CheckpointError, ConfigError
from unet_core.model import UNet
from unet_core.training.config import TrainConfig, lr_at

log = logging.getLogger(__name__)

STATE_FORMAT = "segflow-train-state"
STATE_VERSION = 1


def state_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The resume side file of a checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".state.pt")


def model_from(unet: UNetConfig, state: dict[str, torch.Tensor]) -> UNet:
    """A model with these weights, built without touching the global random state (so
    that saving or loading a checkpoint mid-run does not change the dropout masks)."""
    with torch.random.fork_rng(devices=[]):
        model = UNet(unet)
    model.load_state_dict(state)
    return model


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's weights."""
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _load_weights(checkpoint: str | os.PathLike[str]) -> UNet:
    with torch.random.fork_rng(devices=[]):  # leaves the run's random state alone
        model, _ = load_checkpoint(checkpoint)
    return model


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def describe(c: UNetConfig) -> str:
    return (
        f"{c.ndim}D, depth {c.depth}, {c.base_channels} channels, {c.n_classes} classes, "
        f"{c.in_channels} input channel(s), {c.padding}, norm {c.norm}"
    )


@dataclass
class RunState:
    """Everything a training run carries from one step to the next."""

    unet: UNetConfig
    config: TrainConfig
    model: UNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0  # steps done
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    losses: list[float] = field(default_factory=list)  # per step
    best_metric: float | None = None  # validation mean Dice of the best model
    best_step: int = 0
    best_weights: dict[str, torch.Tensor] | None = None  # CPU copy of the best model

    @classmethod
    def start(
        cls, unet: UNetConfig, config: TrainConfig, device: torch.device, fp16: bool
    ) -> RunState:
        """A new run: seeded weights, a fresh optimizer; ``fp16`` scales the gradients."""
        _seed_all(config.seed)
        model = UNet(unet).to(device)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        return cls(unet, config, model, optimizer, scaler)

    @classmethod
    def resume(
        cls,
        checkpoint: str | os.PathLike[str],
        unet: UNetConfig,
        config: TrainConfig,
        device: torch.device,
        fp16: bool,
    ) -> RunState:
        """Continue the run saved beside ``checkpoint``; when it has no side file, start a
        new run from the checkpoint's weights (fine-tuning)."""
        state = cls.start(unet, config, device, fp16)
        side = state_path(checkpoint)
        if not side.is_file():
            loaded = _load_weights(checkpoint)
            if loaded.config != unet:
                raise CheckpointError(
                    f"{checkpoint}: its network ({describe(loaded.config)}) differs from the "
                    f"one configured for this run ({describe(unet)})"
                )
            state.model.load_state_dict(loaded.state_dict())
            return state
        saved = _read_side_file(side)
        saved_unet = UNetConfig.model_validate_json(saved["unet"])
        if saved_unet != unet:
            raise CheckpointError(
                f"{side}: the saved run's network ({describe(saved_unet)}) differs from the one "
                f"configured now ({describe(unet)})"
            )
        saved_config = TrainConfig.model_validate_json(saved["config"])
        if saved_config.seed != config.seed:
            log.warning(
                "resuming a run made with seed %d under seed %d", saved_config.seed, config.seed
            )
        step = int(saved["step"])
        if step > config.steps:
            raise ConfigError(
                f"{side}: the saved run is at step {step}, beyond the {config.steps} steps "
                "asked for"
            )
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        if torch.cuda.is_available() and saved.get("cuda_rng"):
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        best = float(saved["best_metric"])
        state.step = step
        state.history = list(json.loads(saved["history"]))
        state.losses = [float(v) for v in saved["losses"].tolist()]
        state.best_metric = None if best < 0 else best
        state.best_step = int(saved["best_step"])
        if step and state.best_metric is not None:
            # The checkpoint resumed from holds that run's best model so far.
            state.best_weights = cpu_state(_load_weights(checkpoint))
        return state

    def save(self, checkpoint: str | os.PathLike[str]) -> Path:
        """Write the whole state to ``checkpoint``'s side file (atomically); returns it."""
        payload = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "unet": self.unet.model_dump_json(),
            "config": self.config.model_dump_json(),
            "step": self.step,
            "model": cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(self.history),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "best_metric": -1.0 if self.best_metric is None else float(self.best_metric),
            "best_step": self.best_step,
        }
        path = state_path(checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return lr_at(self.step, self.config)

    @property
    def best_report(self) -> dict[str, Any]:
        """The validation report of the best model so far ({} without validation)."""
        return next(
            (
                h["validation"]
                for h in self.history
                if h["step"] == self.best_step and "validation" in h
            ),
            {},
        )

    def mark_best(self) -> dict[str, torch.Tensor]:
        """The current model is the best so far: keep a copy of its weights."""
        self.best_step = self.step
        self.best_weights = cpu_state(self.model)
        return self.best_weights

    def best_model(self) -> UNet:
        """The best model (the current one when none was marked), in eval mode on CPU."""
        weights = self.best_weights if self.best_weights is not None else cpu_state(self.model)
        return model_from(self.unet, weights).eval()


def _read_side_file(side: Path) -> dict[str, Any]:
    try:
        saved = torch.load(side, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{side}: not a readable training state ({type(exc).__name__})"
        ) from exc
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{side}: not a segflow training state")
    if saved.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{side}: training state version {saved.get('version')} is not supported"
        )
    return saved


__all__ = ["STATE_FORMAT", "STATE_VERSION", "RunState", "cpu_state", "model_from", "state_path"]
